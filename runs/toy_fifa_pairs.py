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

Graded votes (--voters V, for filter_fifa.py --margin_source human): V people vote on each pair under the
same Bradley-Terry; the first is the one whose choice is the label, the other V - 1 are drawn from their own
generator, so the pairs, their labels and the random subsets are the same with or without votes. The share
of the votes for the labelled image estimates sigmoid(margin / T): the margin the proxy only estimates on real
data (here the proxy, redness, is the user's own reward, so it is exact). They are written as a JSONL of pairs
with chosen_votes and rejected_votes (README, "Data formats"), the parquet's own JPEG files beside it: the
format a user's counted votes come in, read into the same fb.vote_share as HPDv3's and Rapidata's, and the
subset filter_fifa.py writes from it holds the very image bytes of the parquet.
"""
import argparse
import glob
import json
import os

import numpy as np
from PIL import Image

from files import atomic_path, fail
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
    p.add_argument("--random_draws", type=int, default=1,
                   help="random subsets of --random_k: the first to --random_out, the others beside it as _1, _2, ...")
    p.add_argument("--voters", type=int, default=0, help="graded votes: people voting on each pair, the labeller included; 0 = none")
    p.add_argument("--votes_out", default="", help="the pairs with their vote counts, a JSONL (images in images/ beside it)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    files = sorted(glob.glob(os.path.join(args.feedback, "kto", "disliked", "*.png")))
    if not files:
        fail(f"no base samples in {args.feedback}/kto/disliked: run python -m toy.red_user first")
    captions, winners, losers, margins, right, p_label = [], [], [], [], [], []
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
            p_label.append(p_first if w == 0 else 1 - p_first)  # P(a voter picks the labelled image)
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
        for j in range(1, args.random_draws):  # more draws, each from its own generator (the first stays as it was)
            other = np.random.default_rng([args.seed, 2, j]).choice(table.num_rows, args.random_k, replace=False)
            pq.write_table(table.take(np.sort(other)), path.replace(".parquet", f"_{j}.parquet"))
        print(f"random subset: {args.random_k} pairs -> {path}" + (f" (and {args.random_draws - 1} more beside it)"
                                                                 if args.random_draws > 1 else ""))
    if args.voters:  # V - 1 more voters a pair, from their own generator: the pairs above stay as they were
        vote_rng = np.random.default_rng([args.seed, 1])
        chosen = 1 + vote_rng.binomial(args.voters - 1, np.array(p_label))  # (N,) the labeller voted for it too
        write_votes(args.votes_out or args.out.replace(".parquet", "_votes.jsonl"), args.out, chosen, args.voters)
    m = np.abs(margins)
    print(f"{len(captions)} pairs from {len(files)} base samples -> {args.out}")
    print(f"|redness margin|: median {np.median(m):.4f}, 10% {np.quantile(m, 0.1):.4f}, 90% {np.quantile(m, 0.9):.4f}; "
          f"labelled against the true reward: {1 - np.mean(right):.1%} of the pairs "
          f"(T = {args.temperature}: a pair with margin T is labelled right {1 / (1 + np.exp(-1)):.0%} of the time)")


def write_votes(path, parquet, chosen, voters):
    """The pairs of `parquet` as JSONL with vote counts; each pair's two JPEGs written as they are in the parquet."""
    import pyarrow.parquet as pq
    t = pq.read_table(parquet, columns=["caption", "jpg_0", "jpg_1", "label_0"]).to_pydict()
    os.makedirs(os.path.join(os.path.dirname(os.path.abspath(path)), "images"), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:  # the images first, the JSONL whole or absent
        for i, caption in enumerate(t["caption"]):
            w = 0 if t["label_0"][i] == 1.0 else 1  # the side the label's winner is on
            rec = {"caption": caption, "chosen": f"images/{i:05d}_chosen.jpg", "rejected": f"images/{i:05d}_rejected.jpg",
                   "chosen_votes": int(chosen[i]), "rejected_votes": int(voters - chosen[i])}
            for key, side in (("chosen", w), ("rejected", 1 - w)):
                with open(os.path.join(os.path.dirname(os.path.abspath(path)), rec[key]), "wb") as img:
                    img.write(t[f"jpg_{side}"][i])
            f.write(json.dumps(rec) + "\n")
    share = chosen / voters
    print(f"votes: {voters} a pair -> {path}; unanimous for the label {np.mean(share == 1):.0%}, majority against it "
          f"{np.mean(share < 0.5):.0%}")


if __name__ == "__main__":
    main()
