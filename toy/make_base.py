"""The toy base model: a tiny Stable-Diffusion-shaped text-to-image model trained from scratch on a CPU.

It renders a captioned dataset of simple scenes (one colored shape on a gray background, captions
like "a big blue triangle"), trains the three trainable parts of an SD pipeline on it, and saves the
pipeline in the diffusers layout, so that `StableDiffusionPipeline.from_pretrained(out)` and the
trainers' `--pretrained out` take it exactly as they take stable-diffusion-v1-5:
  - AutoencoderKL (16, 32, 32): 32x32 RGB images <-> 8x8x4 latents, trained first, on reconstruction;
  - CLIP text encoder (hidden 32, 2 layers) over the toy vocabulary: random and frozen, like SD's
    frozen text encoder; a random transformer still gives each caption distinct token states;
  - UNet2DConditionModel (32, 64), one cross-attention level, eps-prediction on the latents, with 10%
    of captions dropped so that classifier-free guidance works;
  - DDIM scheduler with SD1.5's settings and clip_sample=False (measured: with clipping on every
    sample came out the same color).
At the end it prints a check: the share of samples whose dominant color is the caption's color.

    python -m toy.make_base --out toy/data/base     # color check 86.1%, 5.4 min on an idle 2-core CPU
                                                    # (vae 117 s, unet 411 s; 2 threads)
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from toy.models import build_pipeline
from toy.palette import COLORS, caption_color, dominant_color

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
SIZE_WORDS = {"small": (5.0, 7.0), "big": (9.0, 12.0)}  # shape radius in pixels of a 32x32 image


def world_parser(doc, out):
    """The flags every toy base shares (the world, its VAE, the color check, the run); each base adds its denoiser's."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help="output folder (diffusers layout)")
    p.add_argument("--n_images", type=int, default=8192, help="rendered training scenes")
    p.add_argument("--vae_steps", type=int, default=500, help="autoencoder training steps")
    p.add_argument("--vae_batch", type=int, default=32, help="images per autoencoder step")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="AdamW learning rate of the autoencoder")
    p.add_argument("--kl_weight", type=float, default=1e-6, help="weight of the VAE's KL term (SD's is as small)")
    p.add_argument("--caption_dropout", type=float, default=0.1, help="share of captions replaced by '' (for CFG)")
    p.add_argument("--check_n", type=int, default=72, help="samples of the color check (two per color x shape)")
    p.add_argument("--check_steps", type=int, default=20, help="sampling steps of the color check")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale of the check")
    p.add_argument("--seed", type=int, default=0, help="seed of rendering, initialisation and training")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is faster on a machine busy with other jobs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def get_args(argv=None):
    p = world_parser(__doc__, "toy/data/base")
    p.add_argument("--unet_steps", type=int, default=1800,
                   help="UNet training steps (1800 gave 86%% on the color check in 411 s; with 8 attention heads, "
                        "0.31 s/step instead of 0.23, 1300 gave 71%% and 2400 gave 97%%)")
    p.add_argument("--batch", type=int, default=64, help="images per UNet step")
    p.add_argument("--unet_lr", type=float, default=1e-3, help="AdamW learning rate of the UNet")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# the world's scenes

def shape_polygon(shape, cx, cy, r):
    """Outline of a filled shape as a list of points (square, triangle, cross, star)."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.radians([-90, 30, 150])]
    if shape == "cross":
        w = r * 0.35
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else r * 0.45) * np.cos(np.radians(-90 + 36 * k)),
                 cy + (r if k % 2 == 0 else r * 0.45) * np.sin(np.radians(-90 + 36 * k))) for k in range(10)]
    raise ValueError(shape)


def render_scene(color, shape, radius, center, background, res=32, supersample=4):
    """One shape of a palette color on a uniform gray background, drawn at 4x and box-filtered down."""
    s = supersample
    img = Image.new("RGB", (res * s, res * s), (background,) * 3)
    d = ImageDraw.Draw(img)
    cx, cy, r = center[0] * s, center[1] * s, radius * s
    rgb = COLORS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=rgb, width=int(round(r * 0.4)))
    else:
        d.polygon(shape_polygon(shape, cx, cy, r), fill=rgb)
    return img.resize((res, res), Image.BOX)


def random_scene(rng, res=32):
    """(image, caption): a random color, shape, size, position and background gray.

    Half the captions name the size ("a big red circle"), half do not ("a red circle"); the background
    gray (70..170) is never named, so the model learns to vary it."""
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    size = str(rng.choice(list(SIZE_WORDS)))
    radius = rng.uniform(*SIZE_WORDS[size])
    margin = radius + 1
    center = (rng.uniform(margin, res - margin), rng.uniform(margin, res - margin))
    image = render_scene(color, shape, radius, center, int(rng.integers(70, 171)), res)
    caption = f"a {size} {color} {shape}" if rng.random() < 0.5 else f"a {color} {shape}"
    return image, caption


def check_prompts():
    """The color check's prompts: every color x shape, no size word."""
    return [f"a {c} {s}" for c in COLORS for s in SHAPES]


def to_tensor(images):
    """List of PIL images -> (N, 3, H, W) float in [-1, 1], the VAE's input range."""
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------
# training stages

def warmup_cosine(total, warmup_share=0.05):
    """Learning-rate multiplier: linear warm-up over the first 5% of steps, then a cosine decay to 0."""
    warmup = max(1, int(total * warmup_share))
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_vae(vae, images, args, gen):
    """Reconstruction MSE plus a tiny KL term, on random batches of the rendered images."""
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.vae_steps))
    vae.train()
    bar = tqdm(range(args.vae_steps), desc="vae", disable=args.quiet, mininterval=2.0)
    for step in bar:
        x = images[torch.randint(0, len(images), (args.vae_batch,), generator=gen)]  # (B, 3, 32, 32)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}")  # host-device sync, every 50 steps only
    vae.eval().requires_grad_(False)
    return mse.item()


@torch.no_grad()
def encode_all(vae, images, batch=256):
    """Posterior mean and std of every image, (N, 4, 8, 8) each, unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def embed_captions(pipe, captions):
    """Frozen text encoder states of each caption, (N, 77, hidden), as the pipeline computes them."""
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def train_unet(pipe, lat_mean, lat_std, caption_idx, caption_states, empty_state, args, gen):
    """The denoising loss of SD: predict eps from x_t = add_noise(z, eps, t), conditioned on the caption."""
    unet, scheduler = pipe.unet, pipe.scheduler
    scale = pipe.vae.config.scaling_factor
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.unet_steps))
    unet.train()
    bar = tqdm(range(args.unet_steps), desc="unet", disable=args.quiet, mininterval=2.0)
    for step in bar:
        i = torch.randint(0, len(lat_mean), (args.batch,), generator=gen)
        z = (lat_mean[i] + lat_std[i] * torch.randn(lat_mean[i].shape, generator=gen)) * scale  # (B, 4, 8, 8)
        eps = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        cond = caption_states[caption_idx[i]]  # (B, 77, hidden)
        drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
        cond = torch.where(drop[:, None, None], empty_state.expand_as(cond), cond)
        pred = unet(scheduler.add_noise(z, eps, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")  # host-device sync, every 50 steps only
    unet.eval().requires_grad_(False)
    return loss.item()


@torch.no_grad()
def color_check(pipe, prompts, steps, guidance, seed, batch=72):
    """Share of samples whose dominant color is the caption's color (fixed seeds)."""
    hits, images = 0, []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
        images += out
        hits += sum(dominant_color(im) == caption_color(p) for im, p in zip(out, chunk))
    return hits / len(prompts), images


def save_grid(images, path, cols=12):
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    grid.save(path)


# ------------------------------------------------------------------------------------------------

def start(args):
    """Threads and seeds, then the rendered world: images (N, 3, 32, 32) in [-1, 1], their captions, the distinct
    captions sorted, the generator every later draw takes, and the timings dict with the render's time."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    rng = np.random.default_rng(args.seed)
    scenes = [random_scene(rng) for _ in range(args.n_images)]
    images = to_tensor([im for im, _ in scenes])  # (N, 3, 32, 32)
    captions = [c for _, c in scenes]
    unique = sorted(set(captions))
    timings = {"render": time.time() - t0}
    print(f"rendered {len(scenes)} scenes, {len(unique)} distinct captions, in {timings['render']:.1f}s")
    return images, captions, unique, gen, timings


def finish(pipe, args, timings, t_start, sampler, summary):
    """Save the pipeline, run the color check with its own scheduler, write samples.png and, last, toy_base.json
    (its presence means the base is complete: runs/toy.sh tests for it)."""
    pipe.save_pretrained(args.out, safe_serialization=True)

    t0 = time.time()
    prompts = (check_prompts() * (args.check_n // len(check_prompts()) + 1))[:args.check_n]
    accuracy, samples = color_check(pipe, prompts, args.check_steps, args.guidance, args.seed + 1000)
    timings["check"] = time.time() - t0
    save_grid(samples, os.path.join(args.out, "samples.png"))
    print(f"color check: {accuracy:.1%} of {len(prompts)} samples have the caption's color "
          f"({sampler} {args.check_steps} steps, guidance {args.guidance}; target >= 80%) in {timings['check']:.0f}s")
    timings["total"] = time.time() - t_start
    print(f"total {timings['total'] / 60:.1f} min ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}); "
          f"saved to {args.out}, sample grid {os.path.join(args.out, 'samples.png')}")
    summary = {"color_accuracy": accuracy, **summary, "timings_s": timings, "args": vars(args)}
    with open(os.path.join(args.out, "toy_base.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None):
    args = get_args(argv)
    t_start = time.time()
    images, captions, unique, gen, timings = start(args)

    pipe = build_pipeline(args.out, size="toy", seed=args.seed)  # random weights, SD1.5 scheduler settings
    pipe.set_progress_bar_config(disable=True)
    n_vae = sum(p.numel() for p in pipe.vae.parameters())
    n_unet = sum(p.numel() for p in pipe.unet.parameters())
    print(f"vae {n_vae / 1e6:.2f}M params, unet {n_unet / 1e6:.2f}M params, "
          f"text encoder frozen at random init, threads {torch.get_num_threads()}")

    t0 = time.time()
    vae_mse = train_vae(pipe.vae, images, args, gen)
    timings["vae"] = time.time() - t0
    print(f"vae: {args.vae_steps} steps of {args.vae_batch} in {timings['vae']:.0f}s, reconstruction mse {vae_mse:.4f}")

    t0 = time.time()
    lat_mean, lat_std = encode_all(pipe.vae, images)
    # SD scales latents to about unit variance with vae.config.scaling_factor (0.18215 for SD's VAE);
    # ours is measured on the data and stored in the config, where the trainers read it
    scale = float(1.0 / lat_mean.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    caption_idx = torch.tensor([unique.index(c) for c in captions])
    caption_states = embed_captions(pipe, unique)  # (U, 77, hidden): the text encoder is frozen, so once
    empty_state = embed_captions(pipe, [""])  # (1, 77, hidden)
    timings["encode"] = time.time() - t0
    print(f"encoded latents {tuple(lat_mean.shape[1:])}, scaling_factor {scale:.3f}, in {timings['encode']:.1f}s")

    t0 = time.time()
    unet_loss = train_unet(pipe, lat_mean, lat_std, caption_idx, caption_states, empty_state, args, gen)
    timings["unet"] = time.time() - t0
    print(f"unet: {args.unet_steps} steps of {args.batch} in {timings['unet']:.0f}s, last loss {unet_loss:.4f}")

    return finish(pipe, args, timings, t_start, "DDIM", {"vae_mse": vae_mse, "unet_loss": unet_loss})


if __name__ == "__main__":
    main()
