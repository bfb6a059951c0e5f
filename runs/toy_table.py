"""The toy world's one table: base and each fine-tuned model as the red user sees them.

    python -m runs.toy_table EVAL_DIR [NOISE_DIR]

EVAL_DIR is an evaluate.py --out folder made with the scorers toy.scorers:redness,toy.scorers:color_acc (base first, then the
fine-tuned models, same prompts and seeds). NOISE_DIR, optional, is a second evaluation of the base alone
with other seeds: its row shows how far a model that has NOT changed moves between two evaluations.

Models named METHOD_s0, METHOD_s1, ... (one training run per seed) make one row: the mean over the runs
and, in brackets, the lowest and highest run, which is the run-to-run noise of training. The table of
every run is written beside it (toy_runs.md).

Columns (every model's images are compared with the base's images of EVAL_DIR, prompt by prompt):
  redness      mean redness over all images (the red user's reward: mean R - mean over channels)
  like-rate    share of images the red user prefers to the base's typical image of the same prompt:
               redness above the median redness of the base's images of that prompt (base: 50% by
               construction when the number of seeds is even)
  color acc    share of images whose dominant color is the caption's (the model still follows captions)
  win redness  evaluate.py's protocol: the model's median-redness image of each prompt against the base's;
               share of prompts it wins, ties half, with a 95% Wilson interval
  win color    the same with the caption color check (mostly ties: a median image is right or wrong)
"""
import json
import os
import re
import sys

import numpy as np

from files import fail
from evaluate import median_index, win_rate  # the protocol's own functions


def load(folder):
    with open(os.path.join(folder, "scores.json")) as f:
        s = json.load(f)
    arr = lambda v: np.array(v, dtype=np.float64)  # nulls (no color word) become nan
    return s["prompts"], {m: {k: arr(v) for k, v in per.items()} for m, per in s["scores"].items()}


def median_scores(scores):
    """(P, N) scores -> (P,) score of each prompt's median image, as evaluate.py picks it."""
    return scores[np.arange(len(scores)), median_index(scores)]


def row(name, s, base):
    red, acc = s["redness"], s["color_acc"]  # (P, N)
    threshold = np.median(base["redness"], axis=1, keepdims=True)  # (P, 1) the base's typical redness
    win_r = win_rate(median_scores(red), median_scores(base["redness"]))
    win_c = win_rate(median_scores(acc), median_scores(base["color_acc"]))
    fmt = lambda w: f"{100 * w['rate']:.0f}% ({100 * w['low']:.0f}-{100 * w['high']:.0f})"
    return dict(model=name, redness=float(red.mean()), like_rate=float((red > threshold).mean()),
                color_acc=float(np.nanmean(acc)), win_redness=fmt(win_r), win_color=fmt(win_c),
                win_redness_rate=win_r["rate"], win_color_rate=win_c["rate"])


def group(rows):
    """Rows of METHOD_sN runs -> one row per method: mean and (min-max) over its runs; others as they are."""
    methods = {}
    for r in rows:
        m = re.fullmatch(r"(.+)_s\d+", r["model"])
        methods.setdefault(m.group(1) if m else r["model"], []).append(r)
    out = []
    for name, runs in methods.items():
        if len(runs) == 1:  # a method trained once: its run's row, with its 95% intervals
            out.append(dict(runs[0], model=name, runs=1))
            continue
        g = dict(model=name, runs=len(runs))
        for k in ("redness", "like_rate", "color_acc", "win_redness_rate", "win_color_rate"):
            v = [r[k] for r in runs]
            g[k], g[k + "_min"], g[k + "_max"] = float(np.mean(v)), min(v), max(v)
        out.append(g)
    return out


def cells(r):
    """The table's cells of a row: one run as is, a group as mean (lowest-highest run)."""
    pct = lambda x: f"{100 * x:.0f}%"
    if r["runs"] == 1:
        return [r["model"], f"{r['redness']:.4f}", pct(r["like_rate"]), pct(r["color_acc"]),
                r["win_redness"], r["win_color"]]
    span = lambda k, f: f"{f(r[k])} ({f(r[k + '_min'])} to {f(r[k + '_max'])})"
    return [f"{r['model']} ({r['runs']} runs)", span("redness", lambda x: f"{x:.4f}"), span("like_rate", pct),
            span("color_acc", pct), span("win_redness_rate", pct), span("win_color_rate", pct)]


def markdown(rows):
    head = ["model", "redness", "like-rate", "color acc", "win redness", "win color"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                      ["| " + " | ".join(cells(r)) + " |" for r in rows])


def main(argv):
    prompts, scores = load(argv[0])
    base = scores["base"]
    rows = [row(m, s, base) for m, s in scores.items()]
    if len(argv) > 1:
        noise_prompts, noise = load(argv[1])
        if noise_prompts != prompts:
            fail(f"{argv[1]} was evaluated on other prompts than {argv[0]}")
        rows.insert(1, row("base, other seeds", noise["base"], base))
    P, N = base["redness"].shape
    grouped = group(rows)
    note = (f"{P} prompts x {N} seeds per model; like-rate and win rates against the base's images; "
            f"'base, other seeds' is the evaluation noise")
    if any(r["runs"] > 1 for r in grouped):
        note += "; a method trained N times: mean over its runs (lowest to highest run)"
    table = note + "\n\n" + markdown(grouped)
    print(table)
    with open(os.path.join(argv[0], "toy_table.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(argv[0], "toy_runs.md"), "w") as f:  # every run, win rates with 95% intervals
        f.write(markdown([dict(r, runs=1) for r in rows]) + "\n")
    return grouped


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
