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

Importable too: the trainers use `generate` and `save_grid` for their validation grids, filter_fifa.py
uses `load_clip`, `clip_image_embeddings`, `clip_text_embeddings` and the PickScore ids.
"""
import argparse
import csv
import functools
import glob
import importlib
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from toy.palette import caption_color, dominant_color, redness

# PickScore's weights, and the processor its authors use with them (its own repo has none)
PICKSCORE_MODEL, PICKSCORE_PROCESSOR = "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def one_line(e):
    """An exception as one line for a SystemExit message: its type and the first line of its text."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


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
    return pipe(prompt=[p for p, _ in batch], num_inference_steps=steps, guidance_scale=guidance,
                generator=[torch.Generator(device="cpu").manual_seed(int(s)) for _, s in batch],
                output_type="pil", **size).images


def generate_each(pipe, jobs, steps=50, guidance=7.5, resolution=None, batch_size=8, desc="generate", progress=True):
    """Yield the image of each (prompt, seed) in jobs, in order, one pipeline call per batch of batch_size.
    One bar over all batches replaces the pipeline's own bar, which stays off after."""
    pipe.set_progress_bar_config(disable=True)
    for start in tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress):
        yield from generate_batch(pipe, jobs[start:start + batch_size], steps, guidance, resolution)


def generate(pipe, prompts, seeds, steps=50, guidance=7.5, resolution=None, batch_size=8, progress=True):
    """Images for every (prompt, seed), as a list indexed [prompt][seed]."""
    flat = list(generate_each(pipe, [(p, s) for p in prompts for s in seeds], steps, guidance, resolution,
                              batch_size, progress=progress))
    return [flat[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]


def save_png(image, path):
    """Write then rename: a reader, or a rerun that skips images on disk, never sees half a PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def save_grid(rows, path):
    """Paste rows of PIL images into one PNG, one row per list; cells are the size of the largest image."""
    cell_w = max(im.width for row in rows for im in row)
    cell_h = max(im.height for row in rows for im in row)
    grid = Image.new("RGB", (cell_w * max(len(row) for row in rows), cell_h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB"), (c * cell_w, r * cell_h))
    save_png(grid, path)


# ------------------------------------------------------------------------------------------------
# CLIP: shared by PickScore, CLIP score, the aesthetic predictor and filter_fifa.py

def load_clip(model, processor=None, device="cpu", dtype=torch.float32):
    """A transformers CLIPModel and its processor from a hub id or a local folder, in eval mode."""
    from transformers import AutoProcessor, CLIPModel
    processor = processor or model
    for name in (model, processor):
        # a path-like name that is not a folder is a typo, not a hub id: say so instead of querying the hub
        if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") != 1):
            raise SystemExit(f"CLIP model or processor folder not found: {name}")
    try:
        clip = CLIPModel.from_pretrained(model, dtype=dtype).to(device).eval()
        proc = AutoProcessor.from_pretrained(processor, backend="pil")  # PIL preprocessing: no torchvision
    except Exception as e:  # offline, a missing repo, a folder without weights: one line, not a traceback
        raise SystemExit(f"cannot load CLIP model {model!r} / processor {processor!r}: {one_line(e)}")
    return clip, proc


@torch.no_grad()
def clip_image_embeddings(model, processor, images, batch_size=32):
    """(N, d) float32, L2-normalised image embeddings (the projected pooled output)."""
    out = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=[im.convert("RGB") for im in images[start:start + batch_size]],
                           return_tensors="pt")["pixel_values"]
        # transformers 5: the feature getters return an output object; the projection is its pooler_output
        emb = model.get_image_features(pixel_values=pixels.to(model.device, model.dtype)).pooler_output
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


@torch.no_grad()
def clip_text_embeddings(model, processor, prompts, batch_size=256):
    """(N, d) float32, L2-normalised text embeddings; prompts longer than 77 tokens are truncated."""
    out = []
    max_len = model.config.text_config.max_position_embeddings
    for start in range(0, len(prompts), batch_size):
        tok = processor(text=list(prompts[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_len, return_tensors="pt")
        emb = model.get_text_features(input_ids=tok["input_ids"].to(model.device),
                                      attention_mask=tok["attention_mask"].to(model.device)).pooler_output
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


@torch.no_grad()
def clip_scores(model, processor, images, prompts, batch_size=32):
    """The PickScore recipe: logit_scale.exp() * cos(image, text), one score per (image, prompt) pair. (N,)

    With PickScore_v1 logit_scale.exp() is 100, so SD1.5 images score about 20-22.
    """
    img = clip_image_embeddings(model, processor, images, batch_size)  # (N, d)
    txt = clip_text_embeddings(model, processor, prompts, batch_size)  # (N, d)
    return model.logit_scale.exp().float().cpu() * (img * txt).sum(-1)  # (N,)


# ------------------------------------------------------------------------------------------------
# scorers: each is loaded once, then score(images, prompts) -> (N,) numpy array per batch

SCORERS = ["pickscore", "clip", "aesthetic", "hpsv2", "imagereward", "redness", "color_acc"]


def load_weights(spec):
    """A state dict from a local file or 'repo_id:filename' on the hub (downloaded once into the hub cache),
    read safely: safetensors, or torch.load(weights_only=True), which refuses pickled code."""
    path = spec
    if not os.path.isfile(spec):
        repo, _, filename = spec.partition(":")
        if not filename:
            raise SystemExit(f"weights file not found: {spec}")
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download(repo, filename)
        except Exception as e:
            raise SystemExit(f"cannot download {filename} from {repo}: {type(e).__name__} (offline? pass a file)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path} is not a plain tensor checkpoint ({type(e).__name__}); not unpickling it")


def optional_import(scorer, module, hint):
    """The module, or None after one line saying why `scorer` is skipped and how to enable it."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or the package failing inside its own imports
        print(f"{scorer}: skipped, {module} does not import ({one_line(e)}); {hint} to enable it")


def aesthetic_mlp(dim=768):
    """The LAION 'improved aesthetic predictor' head: 768-1024-128-64-16-1, trained on SAC+LOGOS+AVA ratings.

    The original has NO activations between its linear layers (its ReLUs are commented out), so it is
    one linear map in effect; the dropouts sit where the original has them so that the checkpoint's
    keys (layers.0, layers.2, layers.4, layers.6, layers.7) line up. They do nothing in eval mode.
    """
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()


def load_scorer(name, args, device, clip):
    """The score function of one scorer, or None (with a printed reason) when its optional package is missing."""
    if name == "pickscore":
        # PickScore (Kirstain et al. 2023): CLIP-H fine-tuned on Pick-a-Pic preferences;
        # logit_scale.exp() * cos(image, prompt), logit_scale.exp() = 100, so SD1.5 scores ~20-22
        model, processor = clip(args.pickscore_model, args.pickscore_processor)
        return lambda images, prompts: clip_scores(model, processor, images, prompts).numpy()
    if name == "clip":
        # CLIP score (Hessel et al. 2021): 100 * max(cos(image, prompt), 0) with OpenAI CLIP ViT-L/14
        model, processor = clip(args.clip_model, None)

        def clip_score(images, prompts):
            img, txt = clip_image_embeddings(model, processor, images), clip_text_embeddings(model, processor, prompts)
            return (100.0 * (img * txt).sum(-1).clamp(min=0)).numpy()
        return clip_score
    if name == "aesthetic":
        # LAION aesthetic predictor v2: MLP(L2-normalised CLIP ViT-L/14 image embedding), ~1-10, SD1.5 ~5.3-5.7;
        # the prompt is not used. The weights are the public checkpoint (also mirrored by TRL's DDPO example).
        model, processor = clip(args.aesthetic_clip, None)
        state = load_weights(args.aesthetic_weights)
        state = {k.removeprefix("layers."): v for k, v in state.items()}  # the original wraps the Sequential
        mlp = aesthetic_mlp(state["0.weight"].shape[1])  # 768 for ViT-L/14; smaller for the tests' tiny CLIP
        mlp.load_state_dict(state)
        mlp.to(device).requires_grad_(False)  # scoring only: no autograd graph

        def aesthetic(images, prompts):
            emb = clip_image_embeddings(model, processor, images)  # (N, d), already normalised
            return mlp(emb.to(device)).squeeze(-1).cpu().numpy()
        return aesthetic
    if name == "hpsv2":
        # HPSv2.1 (Wu et al. 2023): OpenCLIP ViT-H-14 fine-tuned on HPD v2, cos(image, prompt) ~0.25-0.30. As in
        # the official img_score.py: the model's own validation transform and tokenizer, the checkpoint's
        # 'state_dict' over a randomly initialised ViT-H-14 (no second download of the LAION weights).
        open_clip = optional_import("hpsv2", "open_clip", "`pip install open_clip_torch` (it needs torchvision)")
        if open_clip is None:
            return None
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None, device=device)
        state = load_weights(args.hpsv2_weights)
        model.load_state_dict(state.get("state_dict", state))
        model.eval().requires_grad_(False)
        tokenizer = open_clip.get_tokenizer("ViT-H-14")

        def hpsv2(images, prompts):
            pixels = torch.stack([preprocess(im.convert("RGB")) for im in images]).to(device)
            img = F.normalize(model.encode_image(pixels).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(list(prompts)).to(device)).float(), dim=-1)
            return (img * txt).sum(-1).cpu().numpy()
        return hpsv2
    if name == "imagereward":
        # ImageReward (Xu et al. 2023): a BLIP-based reward model from its own package, which pins an old
        # transformers and breaks on transformers 5
        ImageReward = optional_import("imagereward", "ImageReward",
                                      "`pip install image-reward` in an environment with transformers<5")
        if ImageReward is None:
            return None
        model = ImageReward.load(args.imagereward_model, device=str(device))
        return lambda images, prompts: np.array([float(model.score(p, im)) for im, p in zip(images, prompts)])
    if name == "redness":
        # the toy world's red user (KTO paper, appendix C): mean of the red channel minus the mean over channels
        return lambda images, prompts: np.array([redness(im) for im in images])
    # color_acc, the toy world's caption accuracy: 1 if the image's dominant color is the caption's color,
    # else 0; nan when the caption names no color, so that such prompts are left out of its mean and win rates
    return lambda images, prompts: np.array([float(dominant_color(im) == caption_color(p)) if caption_color(p)
                                             else float("nan") for im, p in zip(images, prompts)])


def load_scorers(names, args, device):
    """{name: score function} in the order asked; optional scorers whose package is missing are left out."""
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise SystemExit(f"unknown scorer(s) {unknown}; choose from {SCORERS}")
    # CLIP score and the aesthetic predictor share ViT-L/14: each (model, processor) is loaded once
    clip = functools.lru_cache(maxsize=None)(lambda model, processor: load_clip(model, processor, device))
    scorers = {n: load_scorer(n, args, device, clip) for n in names}
    scorers = {n: fn for n, fn in scorers.items() if fn is not None}
    if not scorers:
        raise SystemExit("no scorer could be loaded (see the messages above)")
    return scorers


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
        raise SystemExit(f"{path}: unsupported prompts file (use .txt, .json, .jsonl, .csv, .tsv or .parquet)")
    if not rows or not isinstance(rows[0], dict):  # .txt lines, or a .json list of strings
        return [str(r).strip() for r in rows if str(r).strip()]
    columns = {k.lower(): k for k in rows[0]}  # PartiPrompts spells it 'Prompt'
    column = next((columns[c] for c in PROMPT_COLUMNS if c in columns), None)
    if column is None:
        raise SystemExit(f"{path}: no column named one of {PROMPT_COLUMNS} (found {list(columns.values())})")
    return [str(r[column]).strip() for r in rows if r[column] and str(r[column]).strip()]


def load_prompts(spec):
    """A prompts file, or a named set downloaded from the hub (once, into the hub cache)."""
    if os.path.isfile(spec):
        return read_prompt_file(spec)
    if spec not in PROMPT_SETS:
        raise SystemExit(f"--prompts {spec}: no such file, and not a named set ({', '.join(PROMPT_SETS)})")
    repo, pattern = PROMPT_SETS[spec]
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(repo, repo_type="dataset", allow_patterns=[pattern])
    except Exception as e:
        raise SystemExit(f"prompt set {spec!r} comes from the hub dataset {repo}, which is not reachable "
                         f"({type(e).__name__}); pass a prompts file (.txt, .jsonl, .csv) instead")
    files = sorted(glob.glob(os.path.join(folder, pattern)))
    if not files:
        raise SystemExit(f"prompt set {spec!r}: no file matching {pattern} in {repo}")
    return [p for f in files for p in read_prompt_file(f)]


# ------------------------------------------------------------------------------------------------
# models

def model_kind(source):
    """What our trainers left in a folder: 'pipeline' (full fine-tune), 'lora', 'unet', or None."""
    if os.path.isfile(os.path.join(source, "model_index.json")):  # checked first: it also has unet/config.json
        return "pipeline"
    if os.path.isfile(os.path.join(source, "pytorch_lora_weights.safetensors")):
        return "lora"
    if os.path.isfile(os.path.join(source, "config.json")):
        return "unet"  # a bare UNet folder: config.json + diffusion_pytorch_model.safetensors
    if os.path.isfile(os.path.join(source, "model.safetensors")) and os.path.isfile(os.path.join(source, "state.json")):
        return "checkpoint"  # a trainer checkpoint, out_dir/checkpoints/step_N: a run part-way
    return None


def load_pipeline(base, source, scheduler, device, dtype):
    """The base pipeline, or the base with a fine-tuned UNet / LoRA, or a whole fine-tuned pipeline.

    Every model gets the base's scheduler, so that only the weights differ between columns.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    common = dict(dtype=dtype, scheduler=scheduler, safety_checker=None, requires_safety_checker=False)
    kind = model_kind(source) if source else "base"
    pipe = StableDiffusionPipeline.from_pretrained(source if kind == "pipeline" else base, **common)
    if kind == "lora":
        pipe.load_lora_weights(source)
    elif kind == "unet":
        pipe.unet = UNet2DConditionModel.from_pretrained(source, dtype=dtype)
    elif kind == "checkpoint":
        from common import load_checkpoint_unet
        load_checkpoint_unet(pipe.unet, source)
    return pipe.to(device)


def load_scheduler(base):
    """The base pipeline's scheduler, whatever its class (PNDM for the SD1.5 release)."""
    import diffusers
    try:
        _, cls = diffusers.DiffusionPipeline.load_config(base)["scheduler"]  # e.g. ["diffusers", "PNDMScheduler"]
        return getattr(diffusers, cls).from_pretrained(base, subfolder="scheduler")
    except Exception as e:
        raise SystemExit(f"cannot load the base pipeline {base!r}: {one_line(e)}")


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
                   help=f"comma-separated, from {', '.join(SCORERS)}; the first picks the grid's images")
    p.add_argument("--pickscore_model", default=PICKSCORE_MODEL, help="PickScore: hub id or folder")
    p.add_argument("--pickscore_processor", default=PICKSCORE_PROCESSOR, help="its processor")
    p.add_argument("--clip_model", default="openai/clip-vit-large-patch14", help="CLIP for the CLIP score")
    p.add_argument("--aesthetic_clip", default="openai/clip-vit-large-patch14", help="CLIP for the aesthetic head")
    p.add_argument("--aesthetic_weights", default="trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth",
                   help="aesthetic MLP weights: a file or repo:filename (.safetensors, or a tensors-only .pth)")
    p.add_argument("--hpsv2_weights", default="xswu/HPSv2:HPS_v2.1_compressed.pt", help="HPSv2.1 checkpoint")
    p.add_argument("--imagereward_model", default="ImageReward-v1.0", help="name passed to ImageReward.load")
    p.add_argument("--score_batch_size", type=int, default=32, help="images per scorer call")
    p.add_argument("--grid_prompts", type=int, default=16, help="rows of grid.png: the first K prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--out", required=True, help="output folder; rerunning with the same folder resumes")
    return p.parse_args(argv)


def parse_models(specs):
    """--model NAME=DIR flags -> {name: absolute folder}, checked before any work is done."""
    models = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        new_name = name not in (*models, "base") and all(c.isalnum() or c in "-_." for c in name)
        if not name or not path or not new_name:
            raise SystemExit(f"--model {spec!r}: want NAME=DIR with a new name of letters, digits, - _ . "
                             "('base' is the pretrained pipeline)")
        if not os.path.isdir(path):
            raise SystemExit(f"--model {name}={path}: no such folder")
        if model_kind(path) is None:
            raise SystemExit(f"--model {name}={path}: not a pipeline folder (model_index.json), a LoRA folder "
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
        changed = [k for k in ("pretrained", "scheduler", "steps", "guidance", "resolution", "batch_size")
                   if old.get(k, run[k]) != run[k]]  # the batch, too: rounding may depend on it (generate_batch)
        changed += ["prompts"] * (old["prompts"][:k] != run["prompts"][:k])
        changed += [f"model {m}" for m, src in old["models"].items() if run["models"].get(m, src) != src]
        if changed:
            raise SystemExit(f"{out} holds images made with another {', '.join(changed)}: "
                             f"use another --out, or delete {os.path.join(out, 'images')}")
        run = dict(run, models=dict(old["models"], **run["models"]))
        run["prompts"] = max(old["prompts"], run["prompts"], key=len)
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(run, f, indent=1)


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
    # fp16 on CUDA: SD1.5 is released in fp16 and samples the same; fp32 on CPU, where fp16 is slow
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    models = dict(base=args.pretrained, **parse_models(args.model))  # name -> where its weights come from
    names = list(models)
    prompts = load_prompts(args.prompts)[:args.max_prompts]
    if not prompts:
        raise SystemExit(f"--prompts {args.prompts}: no prompts in it")
    seeds = list(range(args.seed, args.seed + args.n))
    P, N = len(prompts), len(seeds)
    print(f"{len(names)} models x {P} prompts x {N} seeds = {len(names) * P * N} images; "
          f"{args.steps} steps, guidance {args.guidance}, {device}, {str(dtype).removeprefix('torch.')}")

    # scorers before generation: one that cannot load should stop the run before hours of sampling
    scorers = load_scorers([s.strip() for s in args.scorers.split(",") if s.strip()], args, device)
    scheduler = load_scheduler(args.pretrained)
    check_resume(args.out, dict(pretrained=args.pretrained, scheduler=type(scheduler).__name__, steps=args.steps,
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
        pipe.set_progress_bar_config(disable=True)
        for batch in tqdm(todo, desc=f"generate {name}"):  # saved batch by batch: a killed run loses one batch
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
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    as_lists = lambda d: {m: {s: v.tolist() for s, v in per.items()} for m, per in d.items()}
    result = dict(settings=vars(args), models=models, prompts=prompts, seeds=seeds, scores=as_lists(scores),
                  median_score=as_lists(median), median_seed={m: {s: [seeds[k] for k in v] for s, v in per.items()}
                                                              for m, per in median_at.items()},
                  mean_score=means, win_rate=win_rates)
    with open(os.path.join(args.out, "scores.json.tmp"), "w") as f:
        json.dump(nan_to_none(result), f, indent=1)
    os.replace(os.path.join(args.out, "scores.json.tmp"), os.path.join(args.out, "scores.json"))
    first = next(iter(scorers))  # the grid shows each model's median image under the first scorer
    save_grid([[Image.open(image_path(m, i, seeds[median_at[m][first][i]])) for m in names]
               for i in range(min(P, args.grid_prompts))], os.path.join(args.out, "grid.png"))
    print(f"wrote {args.out}/scores.json, results.md and grid.png (columns: {', '.join(names)}; "
          f"each cell the median image by {first})")
    return result


if __name__ == "__main__":
    main()
