"""Sampling: images from a pipeline with fixed seeds, the labelled grids people look at, the trainers' validation
grid, and the prompts to sample (files or named sets). evaluate.py, label.py --generate, online_kto.py and the
trainers all sample through this file; none of it scores (scorers.py does).

One rule makes a sampled image repeatable: each image's initial noise comes from its own seed, and an image made
again is made in the same batch as the first time (generate_missing), because batched math may round differently
in another batch. One rule for precision, as in every script here: weights in fp32, and --precision (auto: bf16
on CUDA, fp32 on the CPU) decides the autocast the pipeline runs under (common.autocast_for).
"""
import csv
import glob
import json
import os
import re

import torch
from PIL import Image
from tqdm import tqdm

from files import atomic_path, check_model_path, fail
from model import DENOISER, LORA_FILE, family_of, is_flow, load_checkpoint_unet, pipeline_class

# ------------------------------------------------------------------------------------------------
# pipelines to sample with: evaluation, label.py --generate, online KTO and the trainers' validation grids

def sampling_pipeline(models, scheduler):
    """A pipeline over parts already in memory (the trainer's, with the live denoiser), to draw validation images."""
    parts = {name: getattr(models, name) for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                                      "text_encoder_3", "tokenizer_3") if getattr(models, name) is not None}
    parts.update(vae=models.vae, scheduler=scheduler, **{DENOISER[models.family]: models.unet})
    if models.family == "sd":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif models.family == "flux2":
        parts["is_distilled"] = models.options.get("is_distilled", False)  # its pipeline's guidance depends on it
    pipe = pipeline_class(models.family)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_kind(source):
    """What our trainers left in a folder: 'pipeline' (full fine-tune), 'lora', 'unet' (a bare denoiser, UNet or
    transformer), 'checkpoint', or None."""
    if os.path.isfile(os.path.join(source, "model_index.json")):  # checked first: it also has unet/config.json
        return "pipeline"
    if os.path.isfile(os.path.join(source, LORA_FILE)):
        return "lora"
    if os.path.isfile(os.path.join(source, "config.json")):
        return "unet"  # a bare UNet (or transformer) folder: config.json + diffusion_pytorch_model.safetensors
    if os.path.isfile(os.path.join(source, "model.safetensors")) and os.path.isfile(os.path.join(source, "state.json")):
        return "checkpoint"  # a trainer checkpoint, out_dir/checkpoints/step_N: a run part-way
    return None


def load_scheduler(base, kind=None):
    """The base pipeline's scheduler, whatever its class (PNDM for the SD1.5 release), or `kind` from its config."""
    import diffusers
    try:
        _, cls = diffusers.DiffusionPipeline.load_config(base)["scheduler"]  # e.g. ["diffusers", "PNDMScheduler"]
        return getattr(diffusers, kind or cls).from_pretrained(base, subfolder="scheduler")
    except Exception as e:
        fail(f"cannot load the base pipeline {base!r}: {one_line(e)}")


def load_pipeline(base, source, scheduler, device, dtype):
    """The base pipeline, or the base with a fine-tuned UNet (transformer) / LoRA / checkpoint, or a whole fine-tuned
    pipeline. Every model gets the base's scheduler, so that only the weights differ between models."""
    import diffusers
    kind = model_kind(source) if source else "base"
    family = family_of(source if kind == "pipeline" else base)
    common = dict(dtype=dtype, scheduler=scheduler)
    if family == "sd":
        common.update(safety_checker=None, requires_safety_checker=False)
    pipe = pipeline_class(family).from_pretrained(source if kind == "pipeline" else base, **common)
    if kind == "lora":
        pipe.load_lora_weights(source)
    elif kind == "unet":
        net = DENOISER[family]
        cls = getattr(diffusers, type(getattr(pipe, net)).__name__)
        setattr(pipe, net, cls.from_pretrained(source, dtype=dtype))
    elif kind == "checkpoint":
        load_checkpoint_unet(getattr(pipe, DENOISER[family]), source)
    return pipe.to(device)


# ------------------------------------------------------------------------------------------------
# generation

def generate_batch(pipe, batch, steps=50, guidance=7.5, resolution=None):
    """The images of a list of (prompt, seed), in one pipeline call.

    Each image gets its own CPU generator seeded with its seed, so its initial latent depends only on its
    seed (diffusers draws each image's latent from its own generator). The rest of sampling is batched
    math, whose rounding may depend on the batch (measured on one CPU: a regenerated image differed from
    the original in a few pixel values when made in a smaller batch). Callers that must reproduce an image
    exactly therefore make it again in the same batch: see generate_missing's fixed batches.
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


def generate_missing(load_pipe, jobs, path_of, batch_size, steps, guidance, resolution, autocast, desc,
                     pnginfo_of=None, before_save=None):
    """Make every image of `jobs` (a list of (prompt, seed)) that is not on disk at path_of(k), k its place in the
    list. Always in the same batches (the list cut every batch_size jobs), and a batch is made whole if any of its
    images is missing, so an image made after an interruption is the image an uninterrupted run makes; only the
    missing files are written, each renamed once whole. load_pipe(): the pipeline, called once, for the first batch
    to make (never when every image is on disk).
    pnginfo_of(k, image): text chunks for image k; before_save(k): what must be on disk before image k is (a caption).
    Returns how many images were written."""
    batches = [range(k, min(k + batch_size, len(jobs))) for k in range(0, len(jobs), batch_size)]
    todo = [b for b in batches if not all(os.path.exists(path_of(k)) for k in b)]
    made, pipe = 0, None
    for batch in tqdm(todo, desc=desc, disable=not todo):  # saved batch by batch: a killed run loses one batch
        pipe = pipe or load_pipe()
        with autocast():
            images = generate_batch(pipe, [jobs[k] for k in batch], steps, guidance, resolution)
        for k, image in zip(batch, images):
            if before_save:
                before_save(k)
            if not os.path.exists(path_of(k)):  # what is on disk stays as it is
                save_png(image, path_of(k), pnginfo=pnginfo_of(k, image) if pnginfo_of else None)
                made += 1
    return made


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


# each family's classifier-free guidance for sampling: 7.5 for the UNets (as the papers evaluate), the pipelines' own
# defaults for the flow families (FLUX.1 [dev]'s is the distilled guidance input; [schnell] ignores it)
GUIDANCE = {"sd": 7.5, "sdxl": 7.5, "sd3": 7.0, "flux": 3.5, "flux2": 4.0}


def validate(out_dir, step, models, pretrained, prompts, seeds, resolution, ctx, steps=25, guidance=None):
    """The trainers' validation grid: fixed prompts and seeds through the current weights, out_dir/val/step_N.png,
    one row per prompt (its text beside it), one column per seed. A sharded UNet (--shard) needs every rank in its
    forwards: all ranks call this and draw the same images, rank 0 alone writes the grid."""
    import time
    # DDIM for the UNet families (few steps), a flow model's own scheduler (Euler along the velocity)
    pipe = sampling_pipeline(models, load_scheduler(pretrained, None if is_flow(models.family) else "DDIMScheduler"))
    unet = models.unet
    was_training = unet.training
    unet.eval()
    t0 = time.time()
    with ctx.autocast():
        rows = generate(pipe, prompts, seeds, steps=steps, guidance=guidance or GUIDANCE[models.family],
                        resolution=resolution, progress=False)
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
# label.py --generate: images to label for someone who has none yet

def trained_base(out_dir):
    """The --pretrained a trainer's out_dir was trained from (its latest checkpoint's config), or None."""
    try:
        with open(os.path.join(out_dir, "checkpoints", "latest")) as f:
            with open(os.path.join(out_dir, "checkpoints", f.read().strip(), "state.json")) as g:
                return json.load(g)["config"].get("pretrained")
    except (OSError, ValueError, KeyError):
        return None


def generate_folder(folder, model, prompts, n, pretrained=None, steps=30, guidance=None, seed=0, resolution=None,
                    batch_size=4, tag=None, precision="auto"):
    """N images per prompt into folder as TAG_<prompt index>_s<seed>.png, the prompt in an A1111-style `parameters`
    chunk (what data.caption_beside reads back). Images already there are kept, so a rerun only adds; made in the
    same batches as a first run would (sample.generate_missing), with evaluate.py's precision rule."""
    from PIL.PngImagePlugin import PngInfo
    from common import autocast_for, resolve_precision
    kind = model_kind(model) if os.path.isdir(model) else None
    if os.path.isdir(model) and kind is None:
        fail(f"--generate {model}: not a pipeline folder (model_index.json) nor a trainer's out_dir "
             "(pytorch_lora_weights.safetensors, or a full pipeline)")
    check_model_path(model, "--generate")
    base = model if kind in (None, "pipeline") else pretrained or trained_base(model) or "stable-diffusion-v1-5/stable-diffusion-v1-5"
    prompts = load_prompts(prompts)
    if not prompts:
        fail("--prompts: no prompts in it")
    guidance = guidance if guidance is not None else GUIDANCE[family_of(base)]
    tag = tag or re.sub(r"[^\w.-]+", "_", os.path.basename(os.path.normpath(model)))
    os.makedirs(folder, exist_ok=True)
    jobs = [(i, s) for i in range(len(prompts)) for s in range(seed, seed + n)]
    path = lambda k: os.path.join(folder, f"{tag}_{jobs[k][0]:05d}_s{jobs[k][1]}.png")
    missing = sum(not os.path.exists(path(k)) for k in range(len(jobs)))
    print(f"generate: {missing} images with {model} ({kind or 'base'}{', base ' + base if base != model else ''}), "
          f"{len(jobs) - missing} already in {folder}", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = autocast_for(device, resolve_precision(precision, device.type == "cuda"))
    def info(k, image):
        i, s = jobs[k]
        chunk = PngInfo()
        chunk.add_text("parameters", f"{prompts[i]}\nSteps: {steps}, CFG scale: {guidance}, Seed: {s}, "
                                     f"Size: {image.width}x{image.height}, Model: {tag}")
        return chunk
    generate_missing(lambda: load_pipeline(base, model if kind else None, load_scheduler(base), device, torch.float32),
                     [(prompts[i], s) for i, s in jobs], path, batch_size, steps, guidance, resolution,
                     autocast, "generate", pnginfo_of=info)
