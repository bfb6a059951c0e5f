"""The one-off cache of VAE latents and text embeddings, and its reader.

Everything that does not change during training is computed once: the VAE posterior of every image (and
of its mirror image) and the text embedding of every caption. Training then never runs the VAE or the
text encoder. The cache is keyed by the data, the models and the preprocessing (cache_key), so a stale
cache is never read; it is written in chunks, each whole or absent, so an interrupted pass resumes.
"""
import hashlib
import json
import os

import numpy as np
import torch
from PIL import Image

from common import barrier, fail, save_safetensors, write_json
from data import read_images

CACHE_VERSION = 2
CHUNK = 1024  # images (or captions) per cache file; each file is written whole or not at all
ENCODE_BATCH = 8  # images per VAE forward: a 512 px batch of 8 fits any GPU that trains SD1.5


def to_tensor(img, resolution):
    """Resize the shorter side to `resolution` (bicubic), center-crop a square, scale to [-1, 1]. (3,H,W)"""
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def cache_key(fb, resolution, flip, models):
    """A key that changes whenever the data, the models or the preprocessing change.

    Data: every image reference with the size and modification time of its file, and the captions.
    Models: a hash of the VAE and text-encoder weights themselves (not their path) and of the token
    ids of every caption, so a stale cache is never used for other data, model or resolution.
    """
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "res": resolution, "flip": flip}).encode())
    files = fb.paths if fb.paths is not None else fb.parquet_files
    for p in files:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    if fb.paths is None:
        for a in (fb.file, fb.row, fb.col):
            h.update(np.ascontiguousarray(a).tobytes())
    for c in fb.captions:
        h.update(c.encode() + b"\0")
    for model in (models.vae, models.text_encoder):
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    tok = models.tokenizer
    ids = tok(fb.captions[:1000] + [""], padding="max_length", truncation=True, max_length=tok.model_max_length).input_ids
    h.update(np.asarray(ids, np.int64).tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def build_cache(fb, cache_root, models, resolution, flip, ctx, strict=False):
    """Encode every image and caption once; every rank encodes its share of the chunks in parallel.

    Per image we store the VAE posterior N(mean, std^2) (times the scaling factor), not one sample of
    it: training draws x0 = mean + std * noise afresh each time, exactly as `latent_dist.sample()`
    would on the fly. With `flip`, the posterior of the mirrored image is stored too, and training
    picks one of the two by a coin toss per image per step (the paper flips w and l independently).
    Chunks already on disk are kept, so an interrupted cache pass resumes where it stopped.
    models: tokenizer, text_encoder, vae (on ctx.device, in ctx.frozen_dtype). Returns the cache folder.
    """
    from tqdm import tqdm
    vae, text_encoder, tokenizer = models.vae, models.text_encoder, models.tokenizer
    folder = os.path.join(cache_root, cache_key(fb, resolution, flip, models))
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    scale = vae.config.scaling_factor
    n_img, n_cap = fb.num_images, len(fb.captions) + 1  # the last caption is "" for prompt dropout
    img_chunks = [(f"images-{c:06d}.safetensors", c * CHUNK, min(n_img, (c + 1) * CHUNK)) for c in range((n_img + CHUNK - 1) // CHUNK)]
    cap_chunks = [(f"texts-{c:06d}.safetensors", c * CHUNK, min(n_cap, (c + 1) * CHUNK)) for c in range((n_cap + CHUNK - 1) // CHUNK)]
    todo = [ch for ch in (img_chunks + cap_chunks)[ctx.rank::ctx.world] if not os.path.exists(os.path.join(folder, ch[0]))]
    bar = tqdm(todo, desc=f"caching latents and embeddings (rank {ctx.rank})", disable=not ctx.master)
    for name, lo, hi in bar:
        if name.startswith("texts"):
            texts = (fb.captions + [""])[lo:hi]
            ids = tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids.to(ctx.device)
            emb = torch.cat([text_encoder(b).last_hidden_state.to(torch.float16).cpu()  # (n, 77, d): what the UNet attends to
                             for b in ids.split(64 * ENCODE_BATCH)])
            save_safetensors({"emb": emb}, os.path.join(folder, name))
            continue
        images = read_images(fb, list(range(lo, hi)))
        valid = torch.tensor([im is not None for im in images], dtype=torch.uint8)
        if strict and not valid.all():
            bad = lo + int((valid == 0).nonzero()[0])
            fail(f"image {fb.describe_image(bad)} is missing or corrupt (drop --strict to skip such pairs)")
        out = {"valid": valid}
        for suffix in ["", "_flip"] if flip else [""]:
            means, stds = [], []
            for b in range(0, len(images), ENCODE_BATCH):
                x = torch.stack([to_tensor(im, resolution) if im is not None else torch.zeros(3, resolution, resolution)
                                 for im in images[b:b + ENCODE_BATCH]])  # (n,3,H,W) in [-1, 1]
                post = vae.encode((x.flip(-1) if suffix else x).to(ctx.device, ctx.frozen_dtype)).latent_dist
                means.append((post.mean * scale).to(torch.float16).cpu())  # (n,4,H/8,W/8)
                stds.append((post.std * scale).to(torch.float16).cpu())
            out["mean" + suffix], out["std" + suffix] = torch.cat(means), torch.cat(stds)
        save_safetensors(out, os.path.join(folder, name))
    barrier()
    if ctx.master:
        write_json({"images": n_img, "captions": n_cap, "resolution": resolution, "flip": flip, "source": fb.source},
                   os.path.join(folder, "meta.json"))
    barrier()
    return folder


class LatentCache:
    """Read-only access to a built cache; files are memory-mapped, so a large cache costs no RAM."""

    def __init__(self, folder):
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

    def _get(self, prefix, key, i):
        return self.open(f"{prefix}-{i // CHUNK:06d}.safetensors").get_slice(key)[i % CHUNK:i % CHUNK + 1][0]

    def latent(self, i, flipped, noise):
        """One draw x0 = mean + std * noise from image i's stored VAE posterior (or its mirror's). (4,h,w)"""
        suffix = "_flip" if flipped else ""
        return self._get("images", "mean" + suffix, i).float() + self._get("images", "std" + suffix, i).float() * noise

    def text(self, c):
        return self._get("texts", "emb", c).float()  # (77, d)

    def latent_shape(self):
        return tuple(self._get("images", "mean", 0).shape)
