"""Feedback data in the formats users have, and the one-off cache of VAE latents and text embeddings.

Two kinds of feedback, one shape in memory:
- pairs (Diffusion-DPO): caption index, winner image index, loser image index
- single images (Diffusion-KTO): caption index, image index, label +1 liked / -1 disliked
Images are referenced, not loaded: a file path, or (parquet file, row, column) for Pick-a-Pic, so a
335 GB dataset is indexed in memory from its small columns and its JPEGs are read once, by the cache.

The cache (see build_cache) holds everything that does not change during training: the VAE posterior
of every image (and of its mirror image) and the text embedding of every caption. Training then never
runs the VAE or the text encoder.
"""
import fnmatch
import glob
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def fail(msg):
    """One clear line for the user instead of a traceback."""
    raise SystemExit(f"error: {msg}")


@dataclass
class Feedback:
    """Captions, image references and the feedback on them, plus counts of what was skipped and why."""
    captions: list  # unique captions
    paths: list = None  # image i -> file path, for folder/JSONL data
    parquet_files: list = None  # for Pick-a-Pic data: image i -> (parquet_files[file[i]], row[i], column col[i])
    file: np.ndarray = None
    row: np.ndarray = None
    col: np.ndarray = None
    caption_idx: np.ndarray = None  # (N,) one per pair or per single image
    winner: np.ndarray = None  # pairs: (N,) image index of the preferred image
    loser: np.ndarray = None  # pairs: (N,) image index of the rejected image
    image: np.ndarray = None  # singles: (N,) image index
    label: np.ndarray = None  # singles: (N,) +1 liked, -1 disliked
    skipped: dict = field(default_factory=dict)  # reason -> count
    source: str = ""
    notes: dict = field(default_factory=dict)  # what -> count: choices made at load time that are not skips

    @property
    def num_images(self):
        return len(self.paths) if self.paths is not None else len(self.row)

    def __len__(self):
        return len(self.caption_idx)

    def skip(self, reason, n=1):
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def summary(self, what="pairs"):
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        labels = f"; {self.label_counts()}" if self.label is not None else ""
        # captions and images that the kept rows use (a skipped row's caption or image is not counted)
        used = [a for a in (self.winner, self.loser, self.image) if a is not None]
        images = len(np.unique(np.concatenate(used))) if used else 0
        captions = len(np.unique(self.caption_idx)) if self.caption_idx is not None else 0
        return f"{len(self)} {what} over {captions} captions and {images} images from {self.source}; skipped {skipped}{labels}"

    def label_counts(self):
        """Single images: "D desirable, U undesirable" and the load-time notes (e.g. images only ever tied)."""
        notes = "".join(f"; {k}: {v}" for k, v in sorted(self.notes.items()))
        return f"{int((self.label > 0).sum())} desirable, {int((self.label < 0).sum())} undesirable{notes}"

    def keep(self, mask, reason):
        """Drop the feedback rows where mask is False, counting them under `reason`."""
        mask = np.asarray(mask, dtype=bool)
        self.skip(reason, int((~mask).sum()))
        for name in ("caption_idx", "winner", "loser", "image", "label"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[mask])


# ------------------------------------------------------------------------------------------------
# pairs: Pick-a-Pic v2 parquet, or a JSONL of {"caption", "chosen", "rejected"} image paths

PICKAPIC_META = ["caption", "label_0", "label_1", "image_0_uid", "image_1_uid"]


def hub_split_patterns(split):
    """File patterns of one split in a hub dataset repo: the parquet export's data/train-00000-of-00645-*.parquet
    (Pick-a-Pic v2's layout: test-* does not match test_unique-*), or a folder per split."""
    return [f"{split}-*.parquet", f"*/{split}-*.parquet", f"{split}/*.parquet", f"*/{split}/*.parquet"]


def parquet_files(path):
    """A parquet file, a folder of them, a glob, or a hub dataset id with an optional split, `ID:SPLIT`
    (default train; downloaded when reachable, that split's files only)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
    elif os.path.exists(path):
        files = [path]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", path) and not path.startswith(".") and not path.endswith(".parquet"):
        repo, _, split = path.partition(":")
        patterns = hub_split_patterns(split or "train")
        try:  # a hub dataset id, e.g. a Pick-a-Pic v2 mirror; needs network and access rights
            from huggingface_hub import snapshot_download
            local = snapshot_download(repo, repo_type="dataset", allow_patterns=patterns)
        except Exception as e:
            fail(f"{path} is not a local file and could not be downloaded from the hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        # the local snapshot may also hold other splits downloaded before: keep this split's files
        found = sorted(glob.glob(os.path.join(local, "**", "*.parquet"), recursive=True))
        files = [f for f in found if any(fnmatch.fnmatch(os.path.relpath(f, local), p) for p in patterns)]
        if not files:
            fail(f"no .parquet files of split {split or 'train'!r} in hub dataset {repo} (looked for {', '.join(patterns)})")
    else:
        fail(f"data not found: {path}")
    if not files:
        fail(f"no .parquet files in {path}")
    return files


def read_pickapic_index(path):
    """Read the small columns of Pick-a-Pic parquet files: one entry per pair, images per (file, row, column)."""
    import pyarrow.parquet as pq
    files = parquet_files(path)
    rows = []
    for fi, f in enumerate(files):
        try:
            schema = pq.read_schema(f)
        except Exception as e:
            fail(f"cannot read parquet file {f}: {e}")
        missing = [c for c in ["caption", "label_0", "label_1", "jpg_0", "jpg_1"] if c not in schema.names]
        if missing:
            fail(f"{f} lacks the Pick-a-Pic column(s) {missing}")
        cols = [c for c in PICKAPIC_META if c in schema.names]
        table = pq.read_table(f, columns=cols).to_pydict()
        n = len(table["caption"])
        uid0, uid1 = table.get("image_0_uid", [None] * n), table.get("image_1_uid", [None] * n)
        rows += zip([fi] * n, range(n), table["caption"], table["label_0"], table["label_1"], uid0, uid1)
    return files, rows


def load_pairs(path):
    """Pairs for Diffusion-DPO. Ties (0.5/0.5) are dropped and counted, as the official code does."""
    if path.endswith(".jsonl") and os.path.exists(path):
        return load_pairs_jsonl(path)
    files, rows = read_pickapic_index(path)
    fb = Feedback(captions=[], parquet_files=files, source=path)
    cap_id, file_, row_, col_, cap, win, lose = {}, [], [], [], [], [], []
    for fi, r, caption, l0, l1, _, _ in rows:
        if not caption or not str(caption).strip():
            fb.skip("no caption"); continue
        if (l0, l1) == (0.5, 0.5):
            fb.skip("tie"); continue
        if (l0, l1) not in ((1.0, 0.0), (0.0, 1.0)):
            fb.skip("label neither 1/0 nor 0/1"); continue
        base = len(row_)  # only kept pairs' images are indexed, so the cache encodes no tie
        file_ += [fi, fi]; row_ += [r, r]; col_ += [0, 1]  # image base is the row's jpg_0, base + 1 its jpg_1
        cap.append(cap_id.setdefault(caption, len(cap_id)))
        win.append(base if l0 == 1.0 else base + 1)  # winner first, whichever side it was shown on
        lose.append(base + 1 if l0 == 1.0 else base)
    fb.captions = list(cap_id)
    fb.file, fb.row, fb.col = np.array(file_, np.int32), np.array(row_, np.int64), np.array(col_, np.int8)
    fb.caption_idx, fb.winner, fb.loser = np.array(cap, np.int64), np.array(win, np.int64), np.array(lose, np.int64)
    return fb


def load_pairs_jsonl(path):
    """One JSON object a line: {"caption": str, "chosen": image path, "rejected": image path}; paths
    relative to the JSONL file's folder. The simple format for a user's own pairs."""
    root = os.path.dirname(os.path.abspath(path))
    fb = Feedback(captions=[], paths=[], source=path)
    cap_id, img_id, cap, win, lose = {}, {}, [], [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                caption, chosen, rejected = rec["caption"], rec["chosen"], rec["rejected"]
            except (ValueError, KeyError, TypeError) as e:
                fail(f"{path}:{n}: expected a JSON object with caption, chosen, rejected ({e})")
            if not caption or not str(caption).strip():
                fb.skip("no caption"); continue
            if chosen == rejected:
                fb.skip("tie (same image twice)"); continue
            paths = [os.path.join(root, p) for p in (chosen, rejected)]
            if not all(os.path.isfile(p) for p in paths):
                fb.skip("missing file"); continue
            ids = [img_id.setdefault(p, len(img_id)) for p in paths]
            cap.append(cap_id.setdefault(caption, len(cap_id)))
            win.append(ids[0]); lose.append(ids[1])
    fb.captions, fb.paths = list(cap_id), list(img_id)
    fb.caption_idx, fb.winner, fb.loser = np.array(cap, np.int64), np.array(win, np.int64), np.array(lose, np.int64)
    return fb


# ------------------------------------------------------------------------------------------------
# reading and preprocessing images

def read_images(fb, indices):
    """Decode the images `indices` (sorted) of fb: a list of PIL images, or None where unreadable."""
    out = [None] * len(indices)
    if fb.paths is not None:
        for k, i in enumerate(indices):
            out[k] = decode(fb.paths[i])
        return out
    import pyarrow.parquet as pq
    by_file = {}
    for k, i in enumerate(indices):
        by_file.setdefault(int(fb.file[i]), []).append(k)
    for fi, ks in by_file.items():  # read only the row groups that hold the wanted rows, once
        pf = pq.ParquetFile(fb.parquet_files[fi])
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        wanted = sorted({int(np.searchsorted(starts, fb.row[indices[k]], side="right") - 1) for k in ks})
        table = pf.read_row_groups(wanted, columns=["jpg_0", "jpg_1"])
        offset = {g: int(sum(starts[h + 1] - starts[h] for h in wanted if h < g)) for g in wanted}
        cols = {c: table.column(f"jpg_{c}") for c in (0, 1)}
        for k in ks:
            i = indices[k]
            g = int(np.searchsorted(starts, fb.row[i], side="right") - 1)
            local = offset[g] + int(fb.row[i] - starts[g])
            out[k] = decode(cols[int(fb.col[i])][local].as_py())
    return out


def decode(src):
    """A path, encoded bytes or a hub image struct {"bytes": ...} -> RGB PIL image, or None if missing or corrupt."""
    if isinstance(src, dict):
        src = src.get("bytes") or src.get("path")
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
        img.load()  # force the full decode now so a truncated file fails here
        return img.convert("RGB")
    except Exception:  # unreadable: the caller counts it and reports it
        return None


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


# ------------------------------------------------------------------------------------------------
# the cache of VAE latents and text embeddings

CACHE_VERSION = 2
CHUNK = 1024  # images (or captions) per cache file; each file is written whole or not at all
ENCODE_BATCH = 8  # images per VAE forward: a 512 px batch of 8 fits any GPU that trains SD1.5


def fingerprint(fb, resolution, flip, vae, text_encoder, tokenizer):
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
    for model in (vae, text_encoder):
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    ids = tokenizer(fb.captions[:1000] + [""], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length).input_ids
    h.update(np.asarray(ids, np.int64).tobytes())
    return h.hexdigest()[:20]


def save_atomic(tensors, path):
    """Write a safetensors file so that it is either complete or absent, never half-written."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def build_cache(fb, cache_root, vae, text_encoder, tokenizer, resolution, flip, device, dtype,
                rank=0, world=1, barrier=lambda: None, strict=False, progress=True):
    """Encode every image and caption once; every rank encodes its share of the chunks in parallel.

    Per image we store the VAE posterior N(mean, std^2) (times the scaling factor), not one sample of
    it: training draws x0 = mean + std * noise afresh each time, exactly as `latent_dist.sample()`
    would on the fly. With `flip`, the posterior of the mirrored image is stored too, and training
    picks one of the two by a coin toss per image per step (the paper flips w and l independently).
    Chunks already on disk are kept, so an interrupted cache pass resumes where it stopped.
    Returns the cache folder.
    """
    from tqdm import tqdm
    key = fingerprint(fb, resolution, flip, vae, text_encoder, tokenizer)
    folder = os.path.join(cache_root, key)
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, "meta.json")):
        return folder
    scale = vae.config.scaling_factor
    n_img, n_cap = fb.num_images, len(fb.captions) + 1  # the last caption is "" for prompt dropout
    img_chunks = [(f"images-{c:06d}.safetensors", c * CHUNK, min(n_img, (c + 1) * CHUNK)) for c in range((n_img + CHUNK - 1) // CHUNK)]
    cap_chunks = [(f"texts-{c:06d}.safetensors", c * CHUNK, min(n_cap, (c + 1) * CHUNK)) for c in range((n_cap + CHUNK - 1) // CHUNK)]
    todo = [ch for ch in (img_chunks + cap_chunks)[rank::world] if not os.path.exists(os.path.join(folder, ch[0]))]
    bar = tqdm(todo, desc=f"caching latents and embeddings (rank {rank})", disable=not progress or rank != 0)
    for name, lo, hi in bar:
        if name.startswith("texts"):
            texts = (fb.captions + [""])[lo:hi]
            ids = tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids.to(device)
            emb = torch.cat([text_encoder(b).last_hidden_state.to(torch.float16).cpu()  # (n, 77, d): what the UNet attends to
                             for b in ids.split(64 * ENCODE_BATCH)])
            save_atomic({"emb": emb}, os.path.join(folder, name))
            continue
        images = read_images(fb, list(range(lo, hi)))
        valid = torch.tensor([im is not None for im in images], dtype=torch.uint8)
        if strict and not valid.all():
            bad = lo + int((valid == 0).nonzero()[0])
            fail(f"image {describe_image(fb, bad)} is missing or corrupt (drop --strict to skip such pairs)")
        out = {"valid": valid}
        for suffix in ["", "_flip"] if flip else [""]:
            means, stds = [], []
            for b in range(0, len(images), ENCODE_BATCH):
                x = torch.stack([to_tensor(im, resolution) if im is not None else torch.zeros(3, resolution, resolution)
                                 for im in images[b:b + ENCODE_BATCH]])  # (n,3,H,W) in [-1, 1]
                post = vae.encode((x.flip(-1) if suffix else x).to(device, dtype)).latent_dist
                means.append((post.mean * scale).to(torch.float16).cpu())  # (n,4,H/8,W/8)
                stds.append((post.std * scale).to(torch.float16).cpu())
            out["mean" + suffix], out["std" + suffix] = torch.cat(means), torch.cat(stds)
        save_atomic(out, os.path.join(folder, name))
    barrier()
    if rank == 0:
        with open(os.path.join(folder, "meta.tmp"), "w") as f:
            json.dump({"images": n_img, "captions": n_cap, "resolution": resolution, "flip": flip,
                       "source": fb.source}, f)
        os.replace(os.path.join(folder, "meta.tmp"), os.path.join(folder, "meta.json"))
    barrier()
    return folder


def describe_image(fb, i):
    if fb.paths is not None:
        return fb.paths[i]
    return f"{fb.parquet_files[fb.file[i]]} row {fb.row[i]} jpg_{fb.col[i]}"


class LatentCache:
    """Read-only access to a built cache; files are memory-mapped, so a large cache costs no RAM."""

    def __init__(self, folder):
        import functools
        from safetensors import safe_open
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


# ------------------------------------------------------------------------------------------------
# single images (Diffusion-KTO): liked/ and disliked/ folders, an image folder with metadata, the
# Diffusion-KTO authors' per-image CSV, or Pick-a-Pic pairs turned into per-image labels

LABELS = {"1": 1, "+1": 1, "true": 1, "yes": 1, "liked": 1, "like": 1, "desirable": 1,
          "0": -1, "-1": -1, "false": -1, "no": -1, "disliked": -1, "dislike": -1, "undesirable": -1}
CLASS_FOLDERS = {"liked": 1, "disliked": -1}
CAPTION_KEYS = ("text", "caption", "prompt")  # the image-folder convention first, then common synonyms


def load_singles(path, pickapic_policy="at_least_once", image_root=None):
    """Labelled single images for Diffusion-KTO: fb.image, fb.label (+1 liked, -1 disliked), fb.caption_idx.

    The layout is read from `path`:
    - a folder with metadata.jsonl or metadata.csv (or any such .jsonl/.csv file): file_name relative to
      the file's folder, label, and the caption in text, caption or prompt;
    - a folder with liked/ and disliked/ subfolders, images at any depth below them;
    - a .csv with file_name, caption, split (the Diffusion-KTO authors' labels), or a folder holding one;
      file_name is relative to image_root, by default the CSV's folder;
    - otherwise Pick-a-Pic v2 parquet (file, folder, glob or hub id), labelled by pickapic_policy.
    An image without a caption in metadata takes the one beside it (see caption_beside). Missing files,
    images without a caption and unknown labels are skipped and counted in fb.skipped.
    """
    if pickapic_policy not in ("at_least_once", "always"):
        fail(f"unknown Pick-a-Pic policy {pickapic_policy!r}: use at_least_once (the paper's) or always")
    if os.path.isdir(path):
        names = {n.lower(): n for n in os.listdir(path)}
        meta = names.get("metadata.jsonl") or names.get("metadata.csv")
        classes = {names[n]: y for n, y in CLASS_FOLDERS.items() if n in names and os.path.isdir(os.path.join(path, names[n]))}
        kto_csvs = sorted(os.path.join(path, n) for n in names.values() if n.lower().endswith(".csv") and is_kto_csv(os.path.join(path, n)))
        if meta:
            fb = singles_from_metadata(os.path.join(path, meta))
        elif classes:
            fb = singles_from_class_folders(path, classes)
        elif len(kto_csvs) > 1:
            fail(f"{path} holds several Diffusion-KTO CSV files ({', '.join(map(os.path.basename, kto_csvs))}): name one")
        elif kto_csvs:
            fb = singles_from_kto_csv(kto_csvs[0], pickapic_policy, image_root)
        elif glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
            fb = singles_from_pickapic(path, pickapic_policy)
        else:
            fail(f"{path} has no liked/ or disliked/ subfolder, no metadata.jsonl or metadata.csv, "
                 f"no Diffusion-KTO CSV and no .parquet files: nothing to read labels from")
    elif path.lower().endswith((".csv", ".jsonl")) and os.path.isfile(path):
        kto = path.lower().endswith(".csv") and is_kto_csv(path)
        fb = singles_from_kto_csv(path, pickapic_policy, image_root) if kto else singles_from_metadata(path)
    else:
        fb = singles_from_pickapic(path, pickapic_policy)
    if len(fb) == 0:
        fail(f"no usable image in {path}: {fb.summary('images')}")
    return fb


def read_csv(path, header_only=False):
    import csv
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a byte-order mark
            return next(csv.reader(f), []) if header_only else list(csv.DictReader(f))
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text; save it as UTF-8 CSV")


def is_kto_csv(path):
    return {"file_name", "caption", "split"} <= set(read_csv(path, header_only=True))


def parse_label(value):
    """+1, -1, or None for a value we do not know. JSON true/false and numbers (1.0, +1, -1) count too."""
    s = str(value).strip().lower()
    try:
        s = {1.0: "1", 0.0: "0", -1.0: "-1"}.get(float(s), s)
    except ValueError:
        pass
    return LABELS.get(s)


def skip_unknown(fb, values, what, expected):
    """Count rows with unknown values under one reason that names a few of them, so the printed summary shows them."""
    if values:
        examples = ", ".join(repr(v) for v in list(dict.fromkeys(values))[:3])
        fb.skip(f"unknown {what} (e.g. {examples}; expected {expected})", len(values))


def singles_from_entries(fb, entries):
    """Fill fb from (image path, caption or None, label) entries. Only the file's existence is checked here:
    the cache decodes every image once anyway and marks the unreadable ones."""
    cap_id, img_id, cap, img, lab = {}, {}, [], [], []
    for p, caption, label in entries:
        if not os.path.isfile(p):
            fb.skip("missing file"); continue
        caption = caption.strip() if isinstance(caption, str) and caption.strip() else caption_beside(p)
        if caption is UNREADABLE:
            fb.skip("unreadable image"); continue  # the same reason the cache gives a corrupt image
        if not caption:
            fb.skip("no caption"); continue
        cap.append(cap_id.setdefault(caption, len(cap_id)))
        img.append(img_id.setdefault(p, len(img_id)))
        lab.append(label)
    fb.captions, fb.paths = list(cap_id), list(img_id)
    fb.caption_idx, fb.image, fb.label = np.array(cap, np.int64), np.array(img, np.int64), np.array(lab, np.int64)
    return fb


def singles_from_metadata(meta):
    """The image-folder convention: one row per image keyed by file_name, with a label and a caption column."""
    root = os.path.dirname(os.path.abspath(meta))
    fb = Feedback(captions=[], paths=[], source=meta)
    if meta.lower().endswith(".jsonl"):
        rows = []
        with open(meta, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    rec = json.loads(line) if line.strip() else None
                except ValueError:
                    rec = "not JSON"
                if rec is not None and not (isinstance(rec, dict) and "file_name" in rec):
                    fail(f"{meta}:{n}: expected a JSON object with file_name, label and text (or caption, prompt)")
                rows += [rec] if rec else []
    else:
        rows = read_csv(meta)
        if rows and "file_name" not in rows[0]:
            fail(f"{meta}: no file_name column (columns: {', '.join(rows[0])})")
    if rows and not any("label" in rec for rec in rows):
        fail(f"{meta}: no label column; expected label = liked/disliked, true/false, 1/0 or desirable/undesirable")
    entries, unknown = [], []
    for rec in rows:
        label = parse_label(rec.get("label"))
        if label is None:
            unknown.append(rec.get("label")); continue
        caption = next((rec[k] for k in CAPTION_KEYS if isinstance(rec.get(k), str) and rec[k].strip()), None)
        entries.append((os.path.join(root, str(rec["file_name"])), caption, label))
    skip_unknown(fb, unknown, "label value", "liked/disliked, true/false, 1/0, desirable/undesirable")
    return singles_from_entries(fb, entries)


def singles_from_class_folders(path, folders):
    """liked/ and disliked/ (any letter case) hold the images at any depth; captions come from beside each image.
    Hidden files and folders are left out: macOS writes ._name.png companions that are not images."""
    path = os.path.abspath(path)
    fb = Feedback(captions=[], paths=[], source=path)
    loose = [f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(path, f))]
    fb.skip("image outside liked/ and disliked/ (no label)", len(loose))
    entries = []
    for name, label in folders.items():
        for root, dirs, files in os.walk(os.path.join(path, name)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            entries += [(os.path.join(root, f), None, label) for f in sorted(files)
                        if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS)]
    return singles_from_entries(fb, entries)


UNREADABLE = object()  # caption_beside's answer for a file PIL cannot open: counted as unreadable, not captionless


def caption_beside(p):
    """The caption of an image that has none in metadata: a .txt file with the same stem (the convention of
    most fine-tuning tools), else the prompt that the SD front end which made the image wrote into it:
    - AUTOMATIC1111 (also Forge, SD.Next): a `parameters` text chunk in a PNG, the EXIF UserComment in a
      JPEG or WebP: "<prompt, maybe several lines>\\nNegative prompt: ...\\nSteps: 20, Sampler: ...";
    - Fooocus: the same `parameters` chunk (or UserComment in IFD0 of a JPEG or WebP) holding JSON with the
      typed prompt under "prompt" (its own scheme, `fooocus_scheme` "fooocus"), or A1111's text (scheme "a1111");
    - ComfyUI: a `prompt` chunk with the node graph as JSON; the prompt is the text of the node wired to a
      sampler's positive input."""
    txt = os.path.splitext(p)[0] + ".txt"
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
        if text:
            return text
    try:
        with Image.open(p) as img:  # reads the header and the text chunks before the pixels, not the pixels
            info = dict(img.info)
            exif = img.getexif() if img.format in ("JPEG", "WEBP") else None
            comment = exif and (exif.get_ifd(0x8769).get(0x9286) or exif.get(0x9286))  # A1111; Fooocus (IFD0)
    except (OSError, SyntaxError, ValueError):  # PIL's errors for a file that is not a readable image
        return UNREADABLE
    if isinstance(comment, bytes):  # an 8-byte charset header, then the text (A1111 writes UTF-16BE)
        info.setdefault("parameters", comment[8:].decode("utf-16-be" if comment.startswith(b"UNICODE") else "utf-8", "ignore"))
    elif isinstance(comment, str):
        info.setdefault("parameters", comment)
    if isinstance(info.get("parameters"), str) and info["parameters"].lstrip().startswith("{"):
        try:  # Fooocus's own scheme: {"prompt": typed prompt, "full_prompt": [after its styles], ...}
            prompt = json.loads(info["parameters"]).get("prompt")
            return (prompt.strip() or None) if isinstance(prompt, str) else None
        except (ValueError, AttributeError):
            pass  # not JSON after all: read it as A1111's text
    if isinstance(info.get("parameters"), str):
        lines = info["parameters"].replace("\0", "").strip().splitlines()
        for marker in ("Negative prompt:", "Steps:"):
            cut = [i for i, line in enumerate(lines) if line.startswith(marker)]
            if cut:
                lines = lines[:cut[0]]
                break
        return "\n".join(lines).strip() or None
    try:
        graph = json.loads(info.get("prompt") or "{}")
        for node in graph.values():
            link = node.get("inputs", {}).get("positive")  # [node id, output index]
            text = graph.get(str(link[0]), {}).get("inputs", {}).get("text") if isinstance(link, list) else None
            if isinstance(text, str) and text.strip():
                return text.strip()
    except (ValueError, AttributeError, TypeError, IndexError):
        pass  # not a ComfyUI graph
    return None


def singles_from_kto_csv(csv_path, policy, image_root=None):
    """The Diffusion-KTO authors' Pick-a-Pic labels (their train_processed_v3.csv), one row per image, split in
    exclusive_win (preferred in all its pairs), exclusive_lose (in none) or intersections (in some).
    at_least_once: win and intersections desirable, lose undesirable (their policy gt_label_wi_l);
    always: intersections skipped and counted (their gt_label_w_l)."""
    root = os.path.abspath(image_root or os.path.dirname(os.path.abspath(csv_path)))
    fb = Feedback(captions=[], paths=[], source=f"{csv_path} (policy {policy})")
    split_label = {"exclusive_win": 1, "exclusive_lose": -1, "intersections": 1}
    entries, unknown = [], []
    for rec in read_csv(csv_path):
        split = (rec.get("split") or "").strip()
        if split not in split_label:
            unknown.append(split); continue
        if split == "intersections" and policy == "always":
            fb.skip("intersections (policy always)"); continue
        entries.append((os.path.join(root, rec["file_name"]), rec.get("caption"), split_label[split]))
    skip_unknown(fb, unknown, "split", "exclusive_win, exclusive_lose, intersections")
    return singles_from_entries(fb, entries)


def singles_from_pickapic(path, policy):
    """Pick-a-Pic pairs -> one labelled entry per unique image (by image_0_uid / image_1_uid).

    at_least_once (the paper's): an image preferred in at least one of its pairs is desirable, every other
    image undesirable. A tie prefers neither image, so an image seen only in ties is undesirable (never
    preferred); fb.notes counts those. always: desirable only if preferred in every pair it is in and never
    tied, undesirable if never preferred, skipped and counted if preferred in some pairs only (like the
    authors' intersections). An image keeps the caption and the parquet copy of its first pair.
    """
    files, rows = read_pickapic_index(path)
    fb = Feedback(captions=[], parquet_files=files, source=f"{path} (pairs -> images, policy {policy})")
    outcome = {(1.0, 0.0): (0, 1), (0.0, 1.0): (1, 0), (0.5, 0.5): (2, 2)}  # which count each image of the pair adds to
    counts = np.zeros((2 * len(rows), 3), np.int64)  # per unique image: pairs won, lost, tied
    key_of, ref, caption = {}, [], []
    for fi, r, cap, l0, l1, u0, u1 in rows:
        if not cap or not str(cap).strip():
            fb.skip("pair with no caption"); continue
        if (l0, l1) not in outcome:
            fb.skip("pair with labels neither 1/0, 0/1 nor 0.5/0.5"); continue
        for col, uid, o in ((0, u0, outcome[l0, l1][0]), (1, u1, outcome[l0, l1][1])):
            k = key_of.setdefault(uid if uid is not None else (fi, r, col), len(key_of))  # no uid column: no de-duplication
            if k == len(ref):
                ref.append((fi, r, col)); caption.append(str(cap).strip())
            counts[k, o] += 1
    won, lost, tied = counts[:len(ref)].T
    always = (won > 0) & (lost == 0) & (tied == 0)
    label = np.where(always if policy == "always" else won > 0, 1, -1)
    keep = (won == 0) | always if policy == "always" else np.ones(len(ref), bool)
    fb.skip("image preferred in some of its pairs only (policy always)", int((~keep).sum()))
    fb.notes["images only ever tied, labelled undesirable"] = int(((won == 0) & (lost == 0)).sum())
    idx = np.flatnonzero(keep)
    cap_id = {}
    fb.caption_idx = np.array([cap_id.setdefault(caption[i], len(cap_id)) for i in idx], np.int64)
    fb.captions = list(cap_id)
    fb.file, fb.row, fb.col = (np.array([ref[i][j] for i in idx], dt) for j, dt in enumerate((np.int32, np.int64, np.int8)))
    fb.image, fb.label = np.arange(len(idx), dtype=np.int64), label[idx].astype(np.int64)
    return fb
