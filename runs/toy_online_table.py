"""The toy online experiment's table and plot: online against offline Diffusion-KTO, round by round.

    python -m runs.toy_online_table OUT      # OUT holds online_s0/, offline_s0/, ... from runs/toy_online.sh

Reads each run's rounds.jsonl (online_kto.py) and prints one markdown table, written to OUT/table.md: per round,
for each arm the mean over its runs and, in brackets, the lowest and highest run (the run-to-run noise) of
  redness    the judge's mean on the evaluation set (36 check prompts x 8 seeds, the same in every run and round)
  like-rate  share of evaluation images redder than the base's median image of the same prompt
  color acc  share of evaluation images whose dominant color is the caption's (the fidelity check)
Round 0 is the base (the same images in every run). OUT/online_vs_offline.png plots redness and color accuracy
against the round, each arm's mean with its min-max range, drawn with PIL (no matplotlib here).
"""
import json
import os
import re
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from files import fail

COLUMNS = [("judge_eval_mean", "redness", lambda x: f"{x:.4f}"), ("like_rate", "like-rate", lambda x: f"{100 * x:.0f}%"),
           ("fidelity_eval_mean", "color acc", lambda x: f"{100 * x:.1f}%")]
ARMS = {"online": (214, 96, 24), "offline": (40, 90, 190)}  # line colors of the plot


def load(out):
    """{arm: (runs, rounds) array per metric}, from OUT/ARM_sN/rounds.jsonl."""
    runs = {}
    for name in sorted(os.listdir(out)):
        m = re.fullmatch(r"(online|offline)_s\d+", name)
        path = os.path.join(out, name, "rounds.jsonl")
        if m and os.path.isfile(path):
            with open(path) as f:
                runs.setdefault(m.group(1), []).append([json.loads(line) for line in f if line.strip()])
    if not runs:
        fail(f"no online_sN/rounds.jsonl or offline_sN/rounds.jsonl in {out}")
    n = min(len(r) for arm in runs.values() for r in arm)  # rounds every run has finished
    return {arm: {k: np.array([[rec[k] for rec in r[:n]] for r in rs], dtype=np.float64) for k, _, _ in COLUMNS}
            for arm, rs in runs.items()}, {arm: len(rs) for arm, rs in runs.items()}


def table(data, counts):
    arms = [a for a in ARMS if a in data]
    head = ["round"] + [f"{label} {arm}" for _, label, _ in COLUMNS for arm in arms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rounds = next(iter(data.values()))["judge_eval_mean"].shape[1]
    for r in range(rounds):
        cells = ["0 (base)" if r == 0 else str(r)]
        for key, _, fmt in COLUMNS:
            for arm in arms:
                v = data[arm][key][:, r]
                cells.append(fmt(v.mean()) if r == 0 else f"{fmt(v.mean())} ({fmt(v.min())} to {fmt(v.max())})")
        lines.append("| " + " | ".join(cells) + " |")
    runs = ", ".join(f"{arm} {counts[arm]} runs" for arm in arms)
    return f"mean over runs (lowest to highest run); {runs}\n\n" + "\n".join(lines)


def panel(draw, box, data, key, title, fmt, font, small):
    """One line chart in box (x0, y0, x1, y1): each arm's mean against the round, its min-max range as bars."""
    x0, y0, x1, y1 = box
    left, bottom, top, right = x0 + 70, y1 - 45, y0 + 30, x1 - 15
    values = np.concatenate([d[key].ravel() for d in data.values()])
    lo, hi = float(values.min()), float(values.max())
    pad = (hi - lo) * 0.08 or 1e-3
    lo, hi = lo - pad, hi + pad
    rounds = next(iter(data.values()))[key].shape[1]
    px = lambda r: left + (right - left) * r / max(1, rounds - 1)
    py = lambda v: bottom - (bottom - top) * (v - lo) / (hi - lo)
    draw.text(((left + right) // 2, y0 + 6), title, fill="black", font=font, anchor="mt")
    for k in range(5):  # y grid and ticks
        v = lo + (hi - lo) * k / 4
        draw.line([(left, py(v)), (right, py(v))], fill=(225, 225, 225))
        draw.text((left - 6, py(v)), fmt(v), fill="black", font=small, anchor="rm")
    for r in range(rounds):  # x ticks
        draw.line([(px(r), bottom), (px(r), bottom + 4)], fill="black")
        draw.text((px(r), bottom + 7), str(r), fill="black", font=small, anchor="mt")
    draw.text(((left + right) // 2, bottom + 24), "round (0 = base)", fill="black", font=small, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)
    for shift, (arm, color) in zip((-4, 4), ((a, c) for a, c in ARMS.items() if a in data)):
        v = data[arm][key]
        mean = v.mean(0)
        for r in range(rounds):  # the run-to-run range
            x = px(r) + shift
            draw.line([(x, py(v[:, r].min())), (x, py(v[:, r].max()))], fill=color, width=2)
            draw.line([(x - 4, py(v[:, r].min())), (x + 4, py(v[:, r].min()))], fill=color, width=2)
            draw.line([(x - 4, py(v[:, r].max())), (x + 4, py(v[:, r].max()))], fill=color, width=2)
        draw.line([(px(r) + shift, py(m)) for r, m in enumerate(mean)], fill=color, width=3)
        for r, m in enumerate(mean):
            draw.ellipse([px(r) + shift - 4, py(m) - 4, px(r) + shift + 4, py(m) + 4], fill=color)


def plot(data, counts, path):
    font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=13)
    W, H = 1000, 420
    im = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(im)
    panel(draw, (0, 0, W // 2, H - 40), data, "judge_eval_mean", "redness (the judge), evaluation set",
          lambda v: f"{v:.4f}", font, small)
    panel(draw, (W // 2, 0, W, H - 40), data, "fidelity_eval_mean", "color accuracy (fidelity), evaluation set",
          lambda v: f"{100 * v:.0f}%", font, small)
    x = 90
    for arm, color in ARMS.items():  # the legend, under both panels
        if arm in data:
            draw.line([(x, H - 22), (x + 30, H - 22)], fill=color, width=3)
            text = f"{arm}: mean of {counts[arm]} runs, bar = lowest to highest run"
            draw.text((x + 38, H - 22), text, fill="black", font=small, anchor="lm")
            x += 60 + int(draw.textlength(text, font=small))
    im.save(path)


def main(argv):
    data, counts = load(argv[0])
    text = table(data, counts)
    print(text)
    with open(os.path.join(argv[0], "table.md"), "w") as f:
        f.write(text + "\n")
    plot(data, counts, os.path.join(argv[0], "online_vs_offline.png"))
    print(f"plot: {os.path.join(argv[0], 'online_vs_offline.png')}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
