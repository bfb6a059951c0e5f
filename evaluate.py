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

The scorers themselves are in scorers.py, the pipelines in model.py. This file also draws the trainers'
validation grids (`validate`), with the same generation and the same labelled grid.
"""
import argparse
import csv
import glob
import json
import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common import PRECISIONS, autocast_for, resolve_precision
from files import atomic_path, fail, write_json
from model import load_pipeline, load_scheduler, model_kind, sampling_pipeline
from scorers import SCORERS, add_scorer_args, load_scorers

# ------------------------------------------------------------------------------------------------
# generation

def generate_batch(pipe, batch, steps=50, guidance=7.5, resolution=None):
    """The images of a list of (prompt, seed), in one pipeline call.

    Each image gets its own CPU generator seeded with its seed, so its initial latent depends only on its
    seed (diffusers draws each image's latent from its own generator). The rest of sampling is batched
    math, whose rounding may depend on the batch (measured on one CPU: a regenerated image differed from
    the original in a few pixel values when made in a smaller batch). Callers that must reproduce an image
    exactly therefore make it again in the same batch: see main()'s fixed batches.
    """
    size = dict(height=resolution, width=resolution) if resolution else {}
    pipe.set_progress_bar_config(disable=True)  # the callers' bars count batches
    return pipe(prompt=[p for p, _ in batch], num_inference_steps=steps, guidance_scale=guidance,
                generator=[torch.Generator(device="cpu").manual_seed(int(s)) for _, s in batch],
                output_type="pil", **size).images


def generate(pipe, prompts, seeds, steps=50, guidance=7.5, resolution=None, batch_size=8, progress=True):
    """Images for every (prompt, seed), as a list indexed [prompt][seed], batch_size images per call."""
    jobs = [(p, s) for p in prompts for s in seeds]
    flat = [image for k in tqdm(range(0, len(jobs), batch_size), desc="generate", disable=not progress)
            for image in generate_batch(pipe, jobs[k:k + batch_size], steps, guidance, resolution)]
    return [flat[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]


def save_png(image, path, pnginfo=None):
    """Write then rename: a reader, or a rerun that skips images on disk, never sees half a PNG. pnginfo: text
    chunks to embed (label.py writes the prompt the way AUTOMATIC1111 does)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=pnginfo)


def save_grid(rows, path, columns=None, prompts=None, min_cell=0):
    """Paste rows of PIL images into one PNG, one row per list. Cells are the size of the largest image,
    scaled up by a whole factor (nearest neighbour, so pixels stay sharp) until at least `min_cell` px.
    columns: a header label per column; prompts: a label beside each row (wrapped)."""
    from PIL import ImageDraw, ImageFont
    w = max(im.width for row in rows for im in row)
    h = max(im.height for row in rows for im in row)
    k = max(1, -(-min_cell // max(w, h)))  # ceil(min_cell / side)
    cw, ch = w * k, h * k
    font = ImageFont.load_default(size=14)
    line_h = 18
    left = 220 if prompts else 0
    top = line_h + 8 if columns else 0
    n_cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (left + cw * n_cols, top + ch * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns or []):
        draw.text((left + c * cw + 4, 4), fit(draw, str(name), font, cw - 8), fill="black", font=font)
    for r, row in enumerate(rows):
        if prompts:
            lines = wrap(draw, prompts[r], font, left - 12)[:max(1, ch // line_h)]
            for n, line in enumerate(lines):
                draw.text((6, top + r * ch + 4 + n * line_h), line, fill="black", font=font)
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cw, ch), Image.NEAREST) if k > 1 else im.convert("RGB"),
                       (left + c * cw, top + r * ch))
    save_png(grid, path)


def wrap(draw, text, font, width):
    """Words of `text` in lines no wider than `width` pixels."""
    lines = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(fit(draw, word, font, width))
    return lines or [""]


def fit(draw, text, font, width):
    """`text`, cut with an ellipsis to at most `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def validate(out_dir, step, models, pretrained, prompts, seeds, resolution, ctx, steps=25, guidance=7.5):
    """The trainers' validation grid: fixed prompts and seeds through the current weights, out_dir/val/step_N.png,
    one row per prompt (its text beside it), one column per seed. A sharded UNet (--shard) needs every rank in its
    forwards: all ranks call this and draw the same images, rank 0 alone writes the grid."""
    import time
    from diffusers import DDIMScheduler
    pipe = sampling_pipeline(models, DDIMScheduler.from_pretrained(pretrained, subfolder="scheduler"))
    unet = models.unet
    was_training = unet.training
    unet.eval()
    t0 = time.time()
    with ctx.autocast():
        rows = generate(pipe, prompts, seeds, steps=steps, guidance=guidance, resolution=resolution, progress=False)
    unet.train(was_training)
    path = os.path.join(out_dir, "val", f"step_{step:07d}.png")
    if ctx.master:
        os.makedirs(os.path.join(out_dir, "val"), exist_ok=True)
        save_grid(rows, path, columns=[f"step {step}, seed {s}" for s in seeds], prompts=prompts, min_cell=128)
    return path, time.time() - t0


# ------------------------------------------------------------------------------------------------
# prompts

# named sets: hub dataset, the files to fetch. Pick-a-Pic's captions come from the image-free copy.
PROMPT_SETS = {
    "partiprompts": ("nateraw/parti-prompts", "PartiPrompts.tsv"),  # 1632 prompts
    "pickapic_test_unique": ("yuvalkirstain/pickapic_v2_no_images", "data/test_unique-*.parquet"),  # 500
    "hpsv2": ("zhwang/HPDv2", "benchmark/*.json"),  # anime, concept-art, paintings, photo: 4 x 800
}
PROMPT_COLUMNS = ("prompt", "caption", "text")


def read_prompt_file(path):
    """.txt (one prompt a line), .json (a list), .jsonl/.csv/.tsv/.parquet (a prompt, caption or text column)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".txt", ".json", ".jsonl", ".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            if ext == ".txt":
                rows = f.read().splitlines()
            elif ext == ".json":
                rows = json.load(f)
            elif ext == ".jsonl":
                rows = [json.loads(line) for line in f if line.strip()]
            else:
                rows = list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
    elif ext == ".parquet":
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    else:
        fail(f"{path}: unsupported prompts file (use .txt, .json, .jsonl, .csv, .tsv or .parquet)")
    if not rows or not isinstance(rows[0], dict):  # .txt lines, or a .json list of strings
        return [str(r).strip() for r in rows if str(r).strip()]
    columns = {k.lower(): k for k in rows[0]}  # PartiPrompts spells it 'Prompt'
    column = next((columns[c] for c in PROMPT_COLUMNS if c in columns), None)
    if column is None:
        fail(f"{path}: no column named one of {PROMPT_COLUMNS} (found {list(columns.values())})")
    return [str(r[column]).strip() for r in rows if r[column] and str(r[column]).strip()]


def load_prompts(spec):
    """A prompts file, or a named set downloaded from the hub (once, into the hub cache)."""
    if os.path.isfile(spec):
        return read_prompt_file(spec)
    if spec not in PROMPT_SETS:
        fail(f"--prompts {spec}: no such file, and not a named set ({', '.join(PROMPT_SETS)})")
    repo, pattern = PROMPT_SETS[spec]
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(repo, repo_type="dataset", allow_patterns=[pattern])
    except Exception as e:
        fail(f"prompt set {spec!r} comes from the hub dataset {repo}, which is not reachable "
                         f"({type(e).__name__}); pass a prompts file (.txt, .jsonl, .csv) instead")
    files = sorted(glob.glob(os.path.join(folder, pattern)))
    if not files:
        fail(f"prompt set {spec!r}: no file matching {pattern} in {repo}")
    return [p for f in files for p in read_prompt_file(f)]


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
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
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
    batches = [jobs[k:k + args.batch_size] for k in range(0, len(jobs), args.batch_size)]
    for name in names:
        todo = [b for b in batches if not all(os.path.exists(image_path(name, i, s)) for i, s in b)]
        if not todo:
            print(f"{name}: all {P * N} images already on disk")
            continue
        pipe = load_pipeline(args.pretrained, models[name] if name != "base" else None, scheduler, device, dtype)
        for batch in tqdm(todo, desc=f"generate {name}"):  # saved batch by batch: a killed run loses one batch
            with autocast():
                images = generate_batch(pipe, [(prompts[i], s) for i, s in batch], args.steps, args.guidance, args.resolution)
            for (i, seed), image in zip(batch, images):
                if not os.path.exists(image_path(name, i, seed)):  # what is on disk stays as it is
                    save_png(image, image_path(name, i, seed))
        del pipe  # freed before the next model loads: one pipeline in memory at a time

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
