"""The one-off cache of VAE latents and text embeddings, its reader, and the no-cache alternative.

Everything that does not change during training is computed once: the VAE posterior of every image (and
of its mirror image) and the text embedding of every caption (for SDXL, SD3 and FLUX.1 also its pooled embedding;
for SDXL each image's time ids). A caption's embedding is what the denoiser attends to, whole: SD1.5 77 x 768,
SDXL 77 x 2048, SD3 (77 + 256) x 4096, 2.6 MB in fp16 (the README tabulates the flow families' sizes). Training
then never runs the VAE or the text encoders. The cache is keyed by the data, the models and the preprocessing
(cache_key), so a stale cache is never read; it is written in chunks, each
whole or absent, so an interrupted pass resumes. What it stores (--latent_cache):
- posterior: mean and std of each image's posterior; every step draws x0 = mean + std * noise afresh,
  exactly as `latent_dist.sample()` would (the default);
- mean: the mean only (`latent_dist.mode()`), half the size; every draw is then the same latent, which
  deviates from sampling (the posterior's std is small next to the noise added for training, but not zero);
- none: nothing is stored; each step encodes its images and prompts on the fly, as the public trainers do.
`--no-random_flip` stores no mirror images (half the size again). `--text_cache none` stores the latents but no
text: each caption is encoded when drawn (the flow families' text states are 2.6 to 12 MB a caption, more than an
image's latents; the text encoders then stay in memory).
"""
import hashlib
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image

from common import barrier
from files import fail, save_safetensors, write_json
from data import read_images
from model import encode_prompts, latent_shape, latents_of, time_ids

CACHE_VERSION = 3
CHUNK = 1024  # images (or captions) per cache file; each file is written whole or not at all
ENCODE_BATCH = 8  # images per VAE forward: a 512 px batch of 8 fits any GPU that trains SD1.5
MODES = ("posterior", "mean", "none")


def to_tensor(img, resolution):
    """Resize the shorter side to `resolution` (bicubic), center-crop a square, scale to [-1, 1].
    Returns ((3,H,W), (crop top, crop left) in the resized image, which SDXL's time ids record)."""
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0, (top, left, w)


def image_time_ids(img, crop, resolution, flipped):
    """SDXL time ids of one preprocessed image: its real size, the crop we took (the mirror image's crop is
    mirrored: its left edge is the resized width minus the right edge), the training size."""
    top, left, resized_w = crop
    if flipped:
        left = resized_w - resolution - left
    return time_ids((img.height, img.width), (top, left), (resolution, resolution))


def cache_key(fb, resolution, flip, models, mode, texts=True):
    """A key that changes whenever the data, the models or the preprocessing change.

    Data: every image reference with the size and modification time of its file, and the captions.
    Models: a hash of the VAE and text-encoder weights themselves (not their path) and of the token
    ids of every caption, so a stale cache is never used for other data, model or resolution.
    """
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "res": resolution, "flip": flip, "mode": mode,
                                   "family": models.family, **({} if texts else {"texts": False})}).encode())
    files = fb.paths if fb.paths is not None else fb.parquet_files
    for p in files:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    if fb.paths is None:
        for a in (fb.file, fb.row, fb.col):
            h.update(np.ascontiguousarray(a).tobytes())
    for c in fb.captions:
        h.update(c.encode() + b"\0")
    for model in (models.vae, models.text_encoder, models.text_encoder_2, models.text_encoder_3):
        for name, t in sorted(model.state_dict().items()) if model is not None else []:
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    tok = models.tokenizer
    ids = tok(fb.captions[:1000] + [""], padding="max_length", truncation=True,
              max_length=min(tok.model_max_length, 512)).input_ids  # (a language model's tokenizer has no length of its own)
    h.update(np.asarray(ids, np.int64).tobytes())
    if models.tokenizer_3 is not None:  # SD3's T5 reads its own tokens
        h.update(json.dumps(models.tokenizer_3(fb.captions[:1000] + [""]).input_ids).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def cache_bytes(models, resolution, flip, mode, device):
    """(bytes per image, bytes per caption) the cache stores, in fp16; a caption's measured on the empty prompt."""
    per_image = int(np.prod(latent_shape(models.vae, resolution))) * 2 * (2 if mode == "posterior" else 1) * (2 if flip else 1)
    emb, pooled = encode_prompts(models, [""], device)
    return per_image, 2 * (emb[0].numel() + (pooled[0].numel() if pooled is not None else 0))


def human(n):
    return next(f"{n / 1024 ** k:.1f} {u}" for k, u in ((3, "GB"), (2, "MB"), (1, "KB"), (0, "B")) if n >= 1024 ** k or not k)


@torch.no_grad()
def encode_images(models, images, resolution, ctx, flipped=False):
    """VAE posteriors (mean, std) of PIL images (None: zeros) in the denoiser's latent space (model.latents_of: the
    VAE's own scaling, SD1.5 0.18215, SDXL 0.13025, and SD3's shift), and SDXL time ids."""
    blank = Image.new("RGB", (resolution, resolution))
    prepared = [to_tensor(im if im is not None else blank, resolution) for im in images]
    x = torch.stack([t for t, _ in prepared])  # (n,3,H,W) in [-1, 1]
    post = models.vae.encode((x.flip(-1) if flipped else x).to(ctx.device, models.vae.dtype)).latent_dist
    ids = torch.stack([image_time_ids(im if im is not None else blank, crop, resolution, flipped)
                       for im, (_, crop) in zip(images, prepared)])
    return (*latents_of(models.vae, post.mean, post.std), ids)


@torch.no_grad()
def build_cache(fb, cache_root, models, resolution, flip, ctx, strict=False, mode="posterior", texts=True):
    """Encode every image and caption once; every rank encodes its share of the chunks in parallel.

    Per image we store the VAE posterior N(mean, std^2) (times the scaling factor), not one sample of
    it (see the module docstring for --latent_cache mean). With `flip`, the posterior of the mirrored
    image is stored too, and training picks one of the two by a coin toss per image per step (the paper
    flips w and l independently). Before encoding it prints the size it will take and stops with one
    line if the disk cannot hold it. Chunks already on disk are kept, so an interrupted pass resumes.
    texts=False (--text_cache none): no caption is stored. models: model.load_models' parts (on ctx.device). Returns
    the cache folder.
    """
    from tqdm import tqdm
    folder = os.path.join(cache_root, cache_key(fb, resolution, flip, models, mode, texts))
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    n_img, n_cap = fb.num_images, (len(fb.captions) + 1) * texts  # the last caption is "" for prompt dropout
    per_image, per_caption = cache_bytes(models, resolution, flip, mode, ctx.device)
    need = n_img * per_image + n_cap * per_caption
    os.makedirs(cache_root, exist_ok=True)
    have = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) if os.path.isdir(folder) else 0
    free = shutil.disk_usage(cache_root).free
    ctx.say(f"cache: {n_img:,} images x {human(per_image)} + {n_cap:,} captions x {human(per_caption)} = {human(need)} "
            f"({mode}{', with mirror images' if flip else ''}{'' if texts else ', captions encoded on the fly'}) in {folder}; "
            f"{human(free)} free")
    if need - have > free:
        fail(f"the cache needs {human(need - have)} more in {cache_root} but only {human(free)} are free: use another "
             f"--cache_dir, --latent_cache mean (half), --no-random_flip (half), or --latent_cache none")
    os.makedirs(folder, exist_ok=True)
    img_chunks = [(f"images-{c:06d}.safetensors", c * CHUNK, min(n_img, (c + 1) * CHUNK)) for c in range((n_img + CHUNK - 1) // CHUNK)]
    cap_chunks = [(f"texts-{c:06d}.safetensors", c * CHUNK, min(n_cap, (c + 1) * CHUNK)) for c in range((n_cap + CHUNK - 1) // CHUNK)]
    # what is still missing, split evenly: a resumed build (some chunks already written) must not leave one rank
    # with most of the work while the others wait at the barrier below (NCCL's watchdog ends a long wait)
    missing = [ch for ch in img_chunks + cap_chunks if not os.path.exists(os.path.join(folder, ch[0]))]
    barrier()  # every rank has listed the folder before any rank writes to it
    todo = missing[ctx.rank::ctx.world]
    bar = tqdm(todo, desc=f"caching latents and embeddings (rank {ctx.rank})", disable=not ctx.master)
    for name, lo, hi in bar:
        if name.startswith("texts"):
            texts, out = (fb.captions + [""])[lo:hi], {}
            parts = [encode_prompts(models, texts[b:b + 64 * ENCODE_BATCH], ctx.device)
                     for b in range(0, len(texts), 64 * ENCODE_BATCH)]
            out["emb"] = torch.cat([e.to(torch.float16).cpu() for e, _ in parts])  # (n, L, d): what the denoiser attends to
            if parts[0][1] is not None:  # SDXL, SD3, FLUX.1
                out["pooled"] = torch.cat([p.to(torch.float16).cpu() for _, p in parts])  # (n, d2)
            save_safetensors(out, os.path.join(folder, name))
            continue
        images = read_images(fb, list(range(lo, hi)))
        valid = torch.tensor([im is not None for im in images], dtype=torch.uint8)
        if strict and not valid.all():
            bad = lo + int((valid == 0).nonzero()[0])
            fail(f"image {fb.describe_image(bad)} is missing or corrupt (drop --strict to skip such pairs)")
        out = {"valid": valid}
        for suffix in ["", "_flip"] if flip else [""]:
            means, stds, ids = [], [], []
            for b in range(0, len(images), ENCODE_BATCH):
                mean, std, tid = encode_images(models, images[b:b + ENCODE_BATCH], resolution, ctx, flipped=bool(suffix))
                means.append(mean.to(torch.float16).cpu())  # (n,4,H/8,W/8)
                stds.append(std.to(torch.float16).cpu())
                ids.append(tid)
            out["mean" + suffix] = torch.cat(means)
            if mode == "posterior":
                out["std" + suffix] = torch.cat(stds)
            if models.family == "sdxl":
                out["time_ids" + suffix] = torch.cat(ids)  # (n, 6)
        save_safetensors(out, os.path.join(folder, name))
    barrier()
    if ctx.master:
        write_json({"images": n_img, "captions": len(fb.captions) + 1, "texts": texts, "resolution": resolution,
                    "flip": flip, "mode": mode, "family": models.family, "source": fb.source}, os.path.join(folder, "meta.json"))
    barrier()
    return folder


def stack_conditions(conds):
    """A list of per-sample condition dicts -> one dict of batched tensors."""
    return {k: torch.stack([c[k] for c in conds]) for k in conds[0]}


class LatentCache:
    """Read-only access to a built cache; files are memory-mapped, so a large cache costs no RAM."""

    def __init__(self, folder, encode_text=None):
        import functools
        from safetensors import safe_open
        self.folder = folder
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        # at most 256 files open at once: a full Pick-a-Pic cache has thousands, more than a process may open
        self.open = functools.lru_cache(maxsize=256)(lambda name: safe_open(os.path.join(folder, name), framework="pt"))
        n_files = (self.meta["images"] + CHUNK - 1) // CHUNK
        self.valid = torch.cat([self.open(f"images-{c:06d}.safetensors").get_tensor("valid") for c in range(n_files)]).bool()
        self.empty_caption = self.meta["captions"] - 1
        self.texts = self.meta.get("texts", True)  # False: captions are encoded when drawn, by encode_text(c)
        self.encode_text = encode_text
        self.sdxl = self.meta["family"] == "sdxl"
        self.pooled = "pooled" in self.open("texts-000000.safetensors").keys() if self.texts else None
        self.posterior = self.meta["mode"] == "posterior"

    def _get(self, prefix, key, i):
        return self.open(f"{prefix}-{i // CHUNK:06d}.safetensors").get_slice(key)[i % CHUNK:i % CHUNK + 1][0]

    def latent(self, i, flipped, noise):
        """One draw x0 = mean + std * noise from image i's stored VAE posterior (or its mirror's). (4,h,w)"""
        suffix = "_flip" if flipped else ""
        mean = self._get("images", "mean" + suffix, i).float()
        return mean + self._get("images", "std" + suffix, i).float() * noise if self.posterior else mean

    def condition(self, c, i, flipped):
        """What the denoiser is conditioned on for caption c with image i: {encoder_hidden_states: (L, d)}, for SDXL
        SD3 and FLUX.1 text_embeds (the pooled embedding, (d2,)), for SDXL the image's time_ids (6,)."""
        if not self.texts:
            emb, pooled = self.encode_text(c)
            cond = {"encoder_hidden_states": emb, **({} if pooled is None else {"text_embeds": pooled})}
        else:
            cond = {"encoder_hidden_states": self._get("texts", "emb", c).float()}
            if self.pooled:
                cond["text_embeds"] = self._get("texts", "pooled", c).float()
        if self.sdxl:
            cond["time_ids"] = self._get("images", "time_ids" + ("_flip" if flipped else ""), i).float()
        return cond

    def latent_shape(self):
        return tuple(self._get("images", "mean", 0).shape)


class TextOnTheFly:
    """Caption c's conditioning (hidden states, pooled embedding or None), encoded when first asked for, in fp32; the
    last 4096 are kept (a caption is drawn again and again: once per epoch for each of its images)."""

    def __init__(self, captions, models, device):
        self.captions, self.models, self.device, self.kept = captions + [""], models, device, {}

    @torch.no_grad()
    def __call__(self, c):
        if c not in self.kept:
            if len(self.kept) >= 4096:
                self.kept.pop(next(iter(self.kept)))
            emb, pooled = encode_prompts(self.models, [self.captions[c]], self.device)
            self.kept[c] = (emb[0].float().cpu(), pooled[0].float().cpu() if pooled is not None else None)
        return self.kept[c]


class OnTheFly:
    """--latent_cache none: the same interface as LatentCache, each image and prompt encoded when drawn, in fp32
    from the VAE's posterior (the cache rounds mean and std to fp16). Every image is decoded once at the start
    to find the unreadable ones, which are skipped and counted like the cache's."""

    def __init__(self, fb, models, resolution, ctx):
        self.fb, self.models, self.resolution, self.ctx = fb, models, resolution, ctx
        self.folder = "none (encoded on the fly)"
        self.valid = torch.tensor([im is not None for k in range(0, fb.num_images, CHUNK)
                                   for im in read_images(fb, list(range(k, min(fb.num_images, k + CHUNK))))])
        self.empty_caption = len(fb.captions)
        self.sdxl = models.family == "sdxl"
        self.text, self._images = TextOnTheFly(fb.captions, models, ctx.device), {}

    def _image(self, i, flipped):
        """(mean, std, time ids) of image i; the last few are kept: a sample asks for its latent, then its time ids."""
        if (i, flipped) not in self._images:
            if len(self._images) >= 4:
                self._images.pop(next(iter(self._images)))
            mean, std, tid = encode_images(self.models, read_images(self.fb, [i]), self.resolution, self.ctx, flipped)
            self._images[i, flipped] = mean[0].float().cpu(), std[0].float().cpu(), tid[0]
        return self._images[i, flipped]

    def latent(self, i, flipped, noise):
        mean, std, _ = self._image(i, flipped)
        return mean + std * noise

    def condition(self, c, i, flipped):
        emb, pooled = self.text(c)
        cond = {"encoder_hidden_states": emb}
        if pooled is not None:
            cond["text_embeds"] = pooled
        if self.sdxl:
            cond["time_ids"] = self._image(i, flipped)[2]
        return cond

    def latent_shape(self):
        return latent_shape(self.models.vae, self.resolution)


def open_cache(fb, args, models, ctx):
    """The trainers' latents and prompts for --latent_cache and --text_cache: a built LatentCache, or OnTheFly."""
    if args.latent_cache == "none":
        return OnTheFly(fb, models, args.resolution, ctx)
    texts = args.text_cache == "store"
    return LatentCache(build_cache(fb, args.cache_dir, models, args.resolution, args.random_flip, ctx, args.strict,
                                   args.latent_cache, texts), None if texts else TextOnTheFly(fb.captions, models, ctx.device))
