"""Pairs for the toy FiFA experiment: a noisy red user who is shown two red-boosted versions of one image.

    python -m runs.toy_fifa_pairs --feedback toy/data/feedback --out runs/out/toy_fifa/pairs.parquet

toy/red_user.py's pairs are all easy (boosted vs original, always labelled right), so every subset of
them is as informative as any other and data selection has nothing to find. Real feedback is not like
that: in Pick-a-Pic many pairs are two similar images and their label is close to a coin toss. Here each
of the red user's base samples (its disliked/ folder: the toy base's own images) is shown twice, each time
as a pair of two versions boosted by independent amounts a, b ~ U(0, --max_boost); the user prefers the
redder one with the Bradley-Terry probability sigmoid((redness(x_a) - redness(x_b)) / --temperature), so
a pair whose versions are nearly equally red gets a nearly random label. The pairs are written in the
Pick-a-Pic schema with toy.red_user's own writer; nothing is sampled from a model, so this takes seconds.
"""
import argparse
import glob
import os

import numpy as np
from PIL import Image

from files import fail
from toy.palette import redness
from toy.red_user import boost_red, write_pickapic_parquet


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--feedback", default="toy/data/feedback", help="toy.red_user's output folder")
    p.add_argument("--out", required=True, help="output parquet")
    p.add_argument("--pairs_per_image", type=int, default=2, help="pairs made from each base sample")
    p.add_argument("--max_boost", type=float, default=0.4, help="boost amounts drawn from U(0, max_boost)")
    p.add_argument("--temperature", type=float, default=0.02, help="label noise: P(redder wins) = sigmoid(margin / T)")
    p.add_argument("--random_k", type=int, default=0, help="also write a uniformly random subset of this many pairs")
    p.add_argument("--random_out", default="", help="where the random subset goes (default: OUT with _random_K)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    files = sorted(glob.glob(os.path.join(args.feedback, "kto", "disliked", "*.png")))
    if not files:
        fail(f"no base samples in {args.feedback}/kto/disliked: run python -m toy.red_user first")
    captions, winners, losers, margins, right = [], [], [], [], []
    for path in files:
        image = Image.open(path).convert("RGB")
        with open(path[:-4] + ".txt") as f:
            caption = f.read().strip()
        for _ in range(args.pairs_per_image):
            x = [boost_red(image, a) for a in rng.uniform(0, args.max_boost, 2)]
            r = [redness(im) for im in x]
            p_first = 0.5 * (1 + np.tanh((r[0] - r[1]) / (2 * args.temperature)))  # sigmoid(margin / T): P(x[0] wins)
            w = 0 if rng.random() < p_first else 1
            captions.append(caption)
            winners.append(x[w])
            losers.append(x[1 - w])
            margins.append(r[w] - r[1 - w])  # the true reward margin of the label the user gave
            right.append(r[w] >= r[1 - w])
    write_pickapic_parquet(args.out, captions, winners, losers, rng, winner_model="toy-base+boost",
                           loser_model="toy-base+boost")
    if args.random_k:  # FiFA's baseline: a subset of the same size drawn without looking at the pairs
        import pyarrow.parquet as pq
        table = pq.read_table(args.out)
        if args.random_k > table.num_rows:
            fail(f"--random_k {args.random_k} > {table.num_rows} pairs")
        keep = np.sort(rng.choice(table.num_rows, args.random_k, replace=False))
        path = args.random_out or args.out.replace(".parquet", f"_random_{args.random_k}.parquet")
        pq.write_table(table.take(keep), path)
        print(f"random subset: {args.random_k} pairs -> {path}")
    m = np.abs(margins)
    print(f"{len(captions)} pairs from {len(files)} base samples -> {args.out}")
    print(f"|redness margin|: median {np.median(m):.4f}, 10% {np.quantile(m, 0.1):.4f}, 90% {np.quantile(m, 0.9):.4f}; "
          f"labelled against the true reward: {1 - np.mean(right):.1%} of the pairs "
          f"(T = {args.temperature}: a pair with margin T is labelled right {1 / (1 + np.exp(-1)):.0%} of the time)")


if __name__ == "__main__":
    main()
