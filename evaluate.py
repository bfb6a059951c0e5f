"""Generate with fixed seeds and score like the Diffusion-DPO and -KTO papers do.

    python evaluate.py --pretrained BASE --model A=DIR --model B=DIR --prompts FILE_OR_SET --n 5 --out DIR

Protocol (the Diffusion-KTO paper's): every model (the base and each fine-tuned result) makes N
images per prompt with the same seeds, scheduler, steps and guidance. For each scorer, each model's
median-scoring image of a prompt stands for it; the higher of two models' medians wins the prompt,
ties count half. Win rates come with a 95% Wilson score interval over prompts (a tie counts as half
a success, which makes the interval slightly conservative). Mean scores are over all P x N images.

A DIR may be a whole pipeline folder (full fine-tune), a folder with pytorch_lora_weights.safetensors
(LoRA), a bare UNet folder (config.json + diffusion_pytorch_model.safetensors) or a trainer checkpoint
(OUT_DIR/checkpoints/step_N: model.safetensors + state.json), to follow a run part-way.
Writes to --out: images/<model>/<prompt>_s<seed>.png (a rerun skips images already there),
scores.json (every score), results.md (the tables, also printed) and grid.png (one row per prompt,
one column per model, each cell the model's median image under the first scorer).

The scorers themselves are in scorers.py, the pipelines in model.py, generation and the grids in sample.py.
"""
import argparse
import json
import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common import PRECISIONS, autocast_for, resolve_precision
from files import atomic_path, fail, write_json
from model import family_of
from sample import GUIDANCE, PROMPT_SETS, generate_missing, load_pipeline, load_prompts, load_scheduler, model_kind, save_grid
from scorers import SCORERS, add_scorer_args, load_scorers

# ------------------------------------------------------------------------------------------------
# the protocol: median image per prompt, win rates, interval

def median_index(scores):
    """(P, N) scores -> (P,) index of each prompt's median-scoring image (the lower median when N is even)."""
    return np.argsort(scores, axis=1, kind="stable")[:, (scores.shape[1] - 1) // 2]


def wilson_interval(successes, n, z=1.96):
    """95% Wilson score interval for a proportion; better than p +- z*se near 0 or 1 and for small n."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def win_rate(a, b):
    """Share of prompts on which a beats b, ties counting half. a, b: (P,) per-prompt scores.

    Prompts where either score is nan (e.g. color accuracy for a caption without a color) are left out.
    """
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    wins, ties, n = int((a > b).sum()), int((a == b).sum()), len(a)
    rate = (wins + 0.5 * ties) / n if n else float("nan")
    low, high = wilson_interval(wins + 0.5 * ties, n)
    return dict(rate=rate, low=low, high=high, wins=wins, ties=ties, losses=n - wins - ties, n=n)


def results_table(names, scorers, means, win_rates, header):
    """The markdown report: mean scores, win rates against the base, then between the other models."""
    fmt = lambda w: f"{100 * w['rate']:.1f}% ({100 * w['low']:.1f}-{100 * w['high']:.1f})"
    row = lambda cells: "| " + " | ".join(cells) + " |"
    head = lambda first: [row([first] + scorers), row(["---"] * (1 + len(scorers)))]
    lines = [header, "", "Mean score over all images:", ""] + head("model")
    lines += [row([m] + [f"{means[m][s]:.4g}" for s in scorers]) for m in names]
    lines += ["", "Win rate against base (median image per prompt, ties count half, 95% Wilson interval):", ""]
    lines += head("model") + [row([m] + [fmt(win_rates[s][f"{m}_vs_base"]) for s in scorers]) for m in names[1:]]
    pairs = [(a, b) for i, a in enumerate(names[1:], 1) for b in names[i + 1:]]  # those not involving the base
    if pairs:
        lines += ["", "Pairwise win rate of the first model against the second (same protocol):", ""] + head("pair")
        lines += [row([f"{a} vs {b}"] + [fmt(win_rates[s][f"{a}_vs_{b}"]) for s in scorers]) for a, b in pairs]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# main

def parse_args(argv):
    p = argparse.ArgumentParser(description="Generate with fixed seeds, score, report win rates against the base.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="base pipeline (hub id or folder): the 'base' column, and the scheduler every model uses")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="a fine-tuned result to compare (repeatable): pipeline, LoRA or UNet folder")
    p.add_argument("--prompts", required=True,
                   help=f"a .txt/.json/.jsonl/.csv/.tsv/.parquet file, or a named set: {', '.join(PROMPT_SETS)}")
    p.add_argument("--max_prompts", type=int, default=None, help="use only the first K prompts")
    p.add_argument("--n", type=int, default=5, help="images per prompt and model (the KTO paper: 5)")
    p.add_argument("--seed", type=int, default=0, help="seeds seed..seed+n-1, for every prompt and model")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the family's, sample.GUIDANCE: 7.5 for SD1.5 and SDXL, the pipeline's own for SD3 7.0, FLUX.1 3.5, FLUX.2 [klein] 4.0)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the pipeline's)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="images per pipeline call; a rerun must keep it to reuse images (rounding may depend on it)")
    p.add_argument("--scorers", default="pickscore,clip,aesthetic,hpsv2,imagereward",
                   help=f"comma-separated, from {', '.join(SCORERS)}, or module:function, your own "
                        f"f(images, prompts) -> one number per image; the first picks the grid's images")
    add_scorer_args(p)  # where each named scorer's weights come from
    p.add_argument("--score_batch_size", type=int, default=32, help="images per scorer call")
    p.add_argument("--grid_prompts", type=int, default=16, help="rows of grid.png: the first K prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 on CUDA, fp32 on the CPU; bf16: sample under bf16 autocast (also on the CPU); fp32")
    p.add_argument("--out", required=True, help="output folder; rerunning with the same folder resumes")
    return p.parse_args(argv)


def parse_models(specs):
    """--model NAME=DIR flags -> {name: absolute folder}, checked before any work is done."""
    models = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        new_name = name not in (*models, "base") and all(c.isalnum() or c in "-_." for c in name)
        if not name or not path or not new_name:
            fail(f"--model {spec!r}: want NAME=DIR with a new name of letters, digits, - _ . "
                             "('base' is the pretrained pipeline)")
        if not os.path.isdir(path):
            fail(f"--model {name}={path}: no such folder")
        if model_kind(path) is None:
            fail(f"--model {name}={path}: not a pipeline folder (model_index.json), a LoRA folder "
                             "(pytorch_lora_weights.safetensors), a UNet folder (config.json) or a trainer checkpoint "
                             "(model.safetensors + state.json)")
        models[name] = os.path.abspath(path)
    return models


def check_resume(out, run):
    """Images already in --out are reused, so they must have been made with the same settings.

    More prompts or more models than last time are fine; another setting, another prompt at the same
    position or another folder under a model's name is not. run: the settings of this run."""
    path = os.path.join(out, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        k = min(len(old["prompts"]), len(run["prompts"]))
        changed = [k for k in ("pretrained", "scheduler", "steps", "guidance", "resolution", "batch_size", "precision")
                   if old.get(k, run[k]) != run[k]]  # the batch, too: rounding may depend on it (generate_batch)
        changed += ["prompts"] * (old["prompts"][:k] != run["prompts"][:k])
        changed += [f"model {m}" for m, src in old["models"].items() if run["models"].get(m, src) != src]
        if changed:
            fail(f"{out} holds images made with another {', '.join(changed)}: "
                             f"use another --out, or delete {os.path.join(out, 'images')}")
        run = dict(run, models=dict(old["models"], **run["models"]))
        run["prompts"] = max(old["prompts"], run["prompts"], key=len)
    os.makedirs(out, exist_ok=True)
    write_json(run, path, indent=1)


def nan_to_none(x):
    """JSON has no NaN: undefined scores (color accuracy of a colorless caption) are written as null."""
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def main(argv=None):
    args = parse_args(argv)
    if args.guidance is None:
        args.guidance = GUIDANCE[family_of(args.pretrained)]
    device = torch.device(args.device)
    # weights in fp32; --precision bf16 (auto on CUDA) samples under bf16 autocast, on the CPU too
    precision = resolve_precision(args.precision, device.type == "cuda")
    dtype, autocast = torch.float32, autocast_for(device, precision)
    models = dict(base=args.pretrained, **parse_models(args.model))  # name -> where its weights come from
    names = list(models)
    prompts = load_prompts(args.prompts)[:args.max_prompts]
    if not prompts:
        fail(f"--prompts {args.prompts}: no prompts in it")
    seeds = list(range(args.seed, args.seed + args.n))
    P, N = len(prompts), len(seeds)
    print(f"{len(names)} models x {P} prompts x {N} seeds = {len(names) * P * N} images; "
          f"{args.steps} steps, guidance {args.guidance}, {device}, {precision}")

    # scorers before generation: one that cannot load should stop the run before hours of sampling
    scorers = load_scorers([s.strip() for s in args.scorers.split(",") if s.strip()], args, device)
    scheduler = load_scheduler(args.pretrained)
    check_resume(args.out, dict(pretrained=args.pretrained, scheduler=type(scheduler).__name__, steps=args.steps,
                                precision=precision,
                                guidance=args.guidance, resolution=args.resolution, batch_size=args.batch_size,
                                prompts=prompts, models=models))
    image_path = lambda m, i, seed: os.path.join(args.out, "images", m, f"{i:05d}_s{seed}.png")

    # --- generate what is not on disk yet, always in the same batches (prompt-major, --batch_size each), so
    # that an image regenerated after an interruption is the image an uninterrupted run makes
    jobs = [(i, s) for i in range(P) for s in seeds]
    for name in names:  # one pipeline in memory at a time: generate_missing drops it when it returns
        load = lambda: load_pipeline(args.pretrained, models[name] if name != "base" else None, scheduler, device, dtype)
        made = generate_missing(load, [(prompts[i], s) for i, s in jobs], lambda k: image_path(name, *jobs[k]),
                                args.batch_size, args.steps, args.guidance, args.resolution, autocast,
                                f"generate {name}")
        print(f"{name}: {made} images made, {P * N - made} already on disk")

    # --- score: every model's images in the same batches, so identical images get identical scores
    jobs = [(i, j) for i in range(P) for j in range(N)]
    scores = {m: {s: np.zeros((P, N)) for s in scorers} for m in names}  # [model][scorer] (P, N)
    for name in names:
        for start in tqdm(range(0, len(jobs), args.score_batch_size), desc=f"score {name}"):
            batch = jobs[start:start + args.score_batch_size]
            images = [Image.open(image_path(name, i, seeds[j])).convert("RGB") for i, j in batch]
            for s, score in scorers.items():
                for (i, j), value in zip(batch, score(images, [prompts[i] for i, _ in batch])):
                    scores[name][s][i, j] = value

    # --- the protocol: each model's median image per prompt, win rates between the medians
    median_at = {m: {s: median_index(scores[m][s]) for s in scorers} for m in names}  # (P,) image index
    median = {m: {s: scores[m][s][np.arange(P), median_at[m][s]] for s in scorers} for m in names}  # (P,)
    means = {m: {s: float(np.nanmean(scores[m][s])) if not np.isnan(scores[m][s]).all() else float("nan")
                 for s in scorers} for m in names}
    win_rates = {s: {f"{a}_vs_{b}": win_rate(median[a][s], median[b][s]) for a in names for b in names if a != b}
                 for s in scorers}

    # --- report
    header = (f"# {', '.join(names)}: {P} prompts ({args.prompts}) x {N} seeds, {args.steps} steps, "
              f"guidance {args.guidance}, {type(scheduler).__name__}")
    table = results_table(names, list(scorers), means, win_rates, header)
    print(table)
    with atomic_path(os.path.join(args.out, "results.md")) as tmp, open(tmp, "w") as f:
        f.write(table)
    as_lists = lambda d: {m: {s: v.tolist() for s, v in per.items()} for m, per in d.items()}
    result = dict(settings=vars(args), models=models, prompts=prompts, seeds=seeds, scores=as_lists(scores),
                  median_score=as_lists(median), median_seed={m: {s: [seeds[k] for k in v] for s, v in per.items()}
                                                              for m, per in median_at.items()},
                  mean_score=means, win_rate=win_rates)
    write_json(nan_to_none(result), os.path.join(args.out, "scores.json"), indent=1)
    first = next(iter(scorers))  # the grid shows each model's median image under the first scorer
    shown = range(min(P, args.grid_prompts))
    save_grid([[Image.open(image_path(m, i, seeds[median_at[m][first][i]])) for m in names] for i in shown],
              os.path.join(args.out, "grid.png"), columns=names, prompts=[prompts[i] for i in shown], min_cell=128)
    print(f"wrote {args.out}/scores.json, results.md and grid.png (columns: {', '.join(names)}; "
          f"each cell the median image by {first})")
    return result


if __name__ == "__main__":
    main()
