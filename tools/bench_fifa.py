"""Time FiFA's selection stage at Pick-a-Pic scale, with the scores and embeddings already computed.

    python tools/bench_fifa.py                                  # 1,000,000 pairs, 60,000 prompts, 768-d
    python tools/bench_fifa.py --pairs 100000 --prompts 6000    # a quick look

The stages are the functions filter_fifa.py runs after scoring: index the prompts of every pair,
the k-th nearest neighbour log distance of every unique prompt (the only O(U^2) step: 60,000 x 60,000
dot products of 768-d vectors, 5.5 TFLOP, in chunks of 1024 rows), and the normalise-score-cap-top-K
selection. The inputs are synthetic: random unit vectors cost the same matrix products as CLIP's.
Target: under 2 minutes and 8 GB on a 2-core CPU. Peak memory is the process's peak resident set
(ru_maxrss), so it includes the inputs and the torch import. The CPU time is printed beside the wall
time: on a machine shared with other jobs the wall time grows, the CPU time does not.
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: tools/..
from data import index_prompts
from filter_fifa import knn_log_distance, select


def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1_000_000, help="pairs N (Pick-a-Pic v2 train: 959,040)")
    p.add_argument("--prompts", type=int, default=60_000, help="unique prompts U (Pick-a-Pic v2 train: ~59,000)")
    p.add_argument("--dim", type=int, default=768, help="text embedding size (CLIP-L 768, PickScore's CLIP-H 1024)")
    p.add_argument("--k", type=int, default=5000, help="pairs to keep")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default (all cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    # --- synthetic inputs (not timed): every prompt used at least once, the rest drawn at random
    rng = np.random.default_rng(0)
    which = np.concatenate([np.arange(args.prompts), rng.integers(0, args.prompts, args.pairs - args.prompts)])
    captions = pa.chunked_array([pa.array([f"a prompt numbered {i}" for i in rng.permutation(which)])])
    emb = torch.nn.functional.normalize(torch.randn(args.prompts, args.dim, generator=torch.Generator().manual_seed(0)), dim=1)
    margin = rng.normal(size=args.pairs).astype(np.float32)  # PickScore margins are O(1)
    quality = rng.uniform(0, 10, args.prompts).astype(np.float32)
    eligible = rng.random(args.pairs) > 0.12  # ~12% ties in Pick-a-Pic
    print(f"{args.pairs:,} pairs over {args.prompts:,} prompts, {args.dim}-d embeddings, "
          f"{torch.get_num_threads()} torch threads; inputs built, peak memory so far {peak_gb():.2f} GB")

    # --- the selection stage, timed: (wall, cpu) seconds at each step
    clock = [(time.perf_counter(), time.process_time())]
    prompts, pid = index_prompts(captions)
    clock.append((time.perf_counter(), time.process_time()))
    diversity = knn_log_distance(emb, k=5, floor=0.01)
    clock.append((time.perf_counter(), time.process_time()))
    kept, _, capped = select(margin, eligible, pid, quality, diversity, args.k, 0.5, 0.5, 2)
    clock.append((time.perf_counter(), time.process_time()))
    assert len(prompts) == args.prompts and len(kept) == args.k
    (w0, c0), (w1, c1), (w2, c2), (w3, c3) = clock
    print(f"{'':18} {'wall':>8} {'cpu':>8}\n"
          f"index prompts      {w1 - w0:7.1f}s {c1 - c0:7.1f}s\n"
          f"k-NN log distance  {w2 - w1:7.1f}s {c2 - c1:7.1f}s\n"
          f"score, cap, top-K  {w3 - w2:7.1f}s {c3 - c2:7.1f}s  ({capped:,} pairs over the cap of 2 per prompt)\n"
          f"total              {w3 - w0:7.1f}s {c3 - c0:7.1f}s  (target < 120 s wall; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n"
          f"peak memory        {peak_gb():7.2f} GB (target < 8 GB)")


if __name__ == "__main__":
    main()
