"""The toy world's one table: base and each fine-tuned model as the red user sees them.

    python -m runs.toy_table EVAL_DIR [NOISE_DIR]

EVAL_DIR is an evaluate.py --out folder made with the scorers redness,color_acc (base first, then the
fine-tuned models, same prompts and seeds). NOISE_DIR, optional, is a second evaluation of the base alone
with other seeds: its row shows how far a model that has NOT changed moves between two evaluations.

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
import sys

import numpy as np

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
                color_acc=float(np.nanmean(acc)), win_redness=fmt(win_r), win_color=fmt(win_c))


def main(argv):
    prompts, scores = load(argv[0])
    base = scores["base"]
    rows = [row(m, s, base) for m, s in scores.items()]
    if len(argv) > 1:
        noise_prompts, noise = load(argv[1])
        if noise_prompts != prompts:
            raise SystemExit(f"{argv[1]} was evaluated on other prompts than {argv[0]}")
        rows.insert(1, row("base, other seeds", noise["base"], base))
    P, N = base["redness"].shape
    lines = [f"{P} prompts x {N} seeds per model; like-rate and win rates against the base's images "
             f"(95% interval); 'base, other seeds' is the evaluation noise", "",
             "| model | redness | like-rate | color acc | win redness | win color |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['redness']:.4f} | {100 * r['like_rate']:.0f}% | {100 * r['color_acc']:.0f}% | "
              f"{r['win_redness']} | {r['win_color']} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(argv[0], "toy_table.md"), "w") as f:
        f.write(table + "\n")
    return rows


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
