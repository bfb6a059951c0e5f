"""Feedback in one shape in memory, a user's own data formats, and image decoding.

Two kinds of feedback, one shape in memory:
- pairs (Diffusion-DPO): caption index, winner image index, loser image index
- single images (Diffusion-KTO): caption index, image index, label +1 liked / -1 disliked
Images are referenced, not loaded: a file path, or (parquet file, row, column) for Pick-a-Pic, so a
335 GB dataset is indexed in memory from its small columns and its JPEGs are read once, by the cache
(cache.py), which is where latents and text embeddings are made.

This file holds Feedback, the local formats (JSONL pairs, liked/ and disliked/ folders, metadata files,
captions beside images, the Diffusion-KTO authors' CSV), decoding and reading images in batches. The public datasets'
readers (Pick-a-Pic v2, HPDv2, HPDv3, ImageRewardDB, Rapidata) and the hub download live in public_readers.py, and
load_pairs/load_singles, which detect the layout of --data and call the right reader, in public_data.py: both import
this file, never the other way round.
"""
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from files import fail

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Feedback:
    """Captions, image references and the feedback on them, plus counts of what was skipped and why."""
    captions: list  # unique captions
    paths: list = None  # image i -> file path, for folder/JSONL data
    parquet_files: list = None  # for Pick-a-Pic data: image i -> (parquet_files[file[i]], row[i], column col[i])
    row_groups: list = None  # for Pick-a-Pic data: the row-group sizes of each parquet file
    image_columns: tuple = ("jpg_0", "jpg_1")  # parquet data: the columns holding a row's two images (col 0, col 1)
    file: np.ndarray = None
    row: np.ndarray = None
    col: np.ndarray = None
    caption_idx: np.ndarray = None  # (N,) one per pair or per single image
    winner: np.ndarray = None  # pairs: (N,) image index of the preferred image
    loser: np.ndarray = None  # pairs: (N,) image index of the rejected image
    image: np.ndarray = None  # singles: (N,) image index
    label: np.ndarray = None  # singles: (N,) +1 liked, -1 disliked
    vote_share: np.ndarray = None  # pairs, where the data counts votes: (N,) share of the votes for the winner
                                   # (0.5-1 where the winner is the majority's choice; NaN for a pair without counts):
                                   # the human margin filter_fifa.py can use
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
        notes = "".join(f"; {k}: {v}" for k, v in sorted(self.notes.items()))  # pairs: load-time notes (singles: below)
        labels = f"; {self.label_counts()}" if self.label is not None else notes
        # captions and images that the kept rows use (a skipped row's caption or image is not counted)
        used = [a for a in (self.winner, self.loser, self.image) if a is not None]
        images = len(np.unique(np.concatenate(used))) if used else 0
        captions = len(np.unique(self.caption_idx)) if self.caption_idx is not None else 0
        return f"{len(self)} {what} over {captions} captions and {images} images from {self.source}; skipped {skipped}{labels}"

    def label_counts(self):
        """Single images: "D desirable, U undesirable" and the load-time notes (e.g. images only ever tied)."""
        notes = "".join(f"; {k}: {v}" for k, v in sorted(self.notes.items()))
        return f"{int((self.label > 0).sum())} desirable, {int((self.label < 0).sum())} undesirable{notes}"

    def describe_image(self, i):
        """Where image i comes from, for an error message."""
        if self.paths is not None:
            return self.paths[i]
        return f"{self.parquet_files[self.file[i]]} row {self.row[i]} {self.image_columns[self.col[i]]}"

    def keep(self, mask, reason):
        """Drop the feedback rows where mask is False, counting them under `reason`."""
        mask = np.asarray(mask, dtype=bool)
        self.skip(reason, int((~mask).sum()))
        for name in ("caption_idx", "winner", "loser", "image", "label", "vote_share"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[mask])


# ------------------------------------------------------------------------------------------------
# pairs: a JSONL of {"caption", "chosen", "rejected"} image paths (the public datasets: public_readers.py)

def share_of_votes(votes):
    """[votes for image A, votes for image B] (counts, or vote weights) -> A's share of them; None unless they are two
    numbers >= 0 with a positive sum (a NaN fails). HPDv3's choice_dist, Rapidata's weights, JSONL vote counts."""
    if not (isinstance(votes, (list, tuple)) and len(votes) == 2 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in votes) and sum(votes) > 0):
        return None
    return votes[0] / sum(votes)


def load_pairs_jsonl(path):
    """One JSON object a line: {"caption": str, "chosen": image path, "rejected": image path}; paths
    relative to the JSONL file's folder. The simple format for a user's own pairs.

    Optional "chosen_votes", "rejected_votes": how many people (or how much vote weight) preferred each image.
    They give fb.vote_share = chosen / (chosen + rejected), NaN on a line without them (fb.vote_share stays
    None when no line has them); filter_fifa.py --margin_source human ranks pairs by it. A share below 0.5
    is kept: "chosen" is then a label most voters disagree with."""
    root = os.path.dirname(os.path.abspath(path))
    fb = Feedback(captions=[], paths=[], source=path)
    cap_id, img_id, cap, win, lose, share = {}, {}, [], [], [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                caption, chosen, rejected = rec["caption"], rec["chosen"], rec["rejected"]
            except (ValueError, KeyError, TypeError) as e:
                fail(f"{path}:{n}: expected a JSON object with caption, chosen, rejected ({e})")
            votes = [rec.get("chosen_votes"), rec.get("rejected_votes")]
            counted = votes != [None, None]
            if counted and share_of_votes(votes) is None:
                fail(f"{path}:{n}: chosen_votes and rejected_votes must both be numbers >= 0, not both 0 (got {votes})")
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
            share.append(share_of_votes(votes) if counted else np.nan)
    fb.captions, fb.paths = list(cap_id), list(img_id)
    fb.caption_idx, fb.winner, fb.loser = np.array(cap, np.int64), np.array(win, np.int64), np.array(lose, np.int64)
    if not np.isnan(share).all():  # (an empty list is all NaN too: no counts, no vote_share)
        fb.vote_share = np.array(share, np.float64)
    return fb


# ------------------------------------------------------------------------------------------------
# reading and preprocessing images

def pickapic_batches(files, groups, wanted, columns=None, batch_rows=1024):
    """(first row, record batch) of each batch of at most batch_rows rows that holds a wanted row.

    Batches never cross a row group and their row numbers come from the metadata, so a row group
    without a wanted row is not even read. wanted: (N,) bool over all files' rows in order."""
    import pyarrow.parquet as pq
    start = 0
    for f, sizes in zip(files, groups):
        pf = None
        for g, rows in enumerate(sizes):
            at = start
            if wanted[start:start + rows].any():
                pf = pf or pq.ParquetFile(f)
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns):
                    if wanted[at:at + batch.num_rows].any():
                        yield at, batch
                    at += batch.num_rows
            start += rows


def read_images(fb, indices):
    """Decode the images `indices` (sorted) of fb: a list of PIL images, or None where unreadable."""
    out = [None] * len(indices)
    if fb.paths is not None:
        for k, i in enumerate(indices):
            out[k] = decode(fb.paths[i])
        return out
    offsets = np.cumsum([0] + [sum(g) for g in fb.row_groups])  # first global row of each file
    at = {}  # global row -> positions k in `indices` that want an image of it
    for k, i in enumerate(indices):
        at.setdefault(int(offsets[fb.file[i]] + fb.row[i]), []).append(k)
    wanted = np.zeros(offsets[-1], bool)
    wanted[list(at)] = True
    for start, batch in pickapic_batches(fb.parquet_files, fb.row_groups, wanted, list(fb.image_columns)):
        cols = [batch.column(c) for c in fb.image_columns]
        for r in np.flatnonzero(wanted[start:start + batch.num_rows]):
            for k in at[start + int(r)]:
                out[k] = decode(cols[int(fb.col[indices[k]])][int(r)].as_py())
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


def index_prompts(captions):
    """A Pick-a-Pic caption column (pyarrow) -> (unique prompts in order of first appearance, (N,) int64 index of
    each pair's prompt); filter_fifa.py's prompts, each embedded and rated once."""
    enc = captions.combine_chunks().fill_null("").dictionary_encode()
    return enc.dictionary.to_pylist(), enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def pickapic_pair_images(files, groups, batch_rows=1024):
    """Pick-a-Pic parquet's images pair by pair, for scoring (filter_fifa.score_pairs): pair_chunks(wanted) yields
    (first row, rows, images) per batch of at most batch_rows pairs that holds a wanted one, images(rows)
    decoding the (jpg_0, jpg_1) of those rows of the batch (JPEG bytes or an image struct; None if corrupt)."""
    def pair_chunks(wanted):
        for start, batch in pickapic_batches(files, groups, wanted, ["jpg_0", "jpg_1"], batch_rows=batch_rows):
            jpg0, jpg1 = batch.column("jpg_0").to_pylist(), batch.column("jpg_1").to_pylist()
            yield start, batch.num_rows, lambda rows, a=jpg0, b=jpg1: [(decode(a[r]), decode(b[r])) for r in rows]
    return pair_chunks


def feedback_pair_images(fb, batch_rows=1024):
    """The pairs of fb, as pickapic_pair_images gives Pick-a-Pic's: (winner, loser) images read by read_images."""
    def images(idx):
        want = sorted(set(fb.winner[idx].tolist()) | set(fb.loser[idx].tolist()))
        got = dict(zip(want, read_images(fb, want)))
        return [(got[w], got[l]) for w, l in zip(fb.winner[idx], fb.loser[idx])]

    def pair_chunks(wanted):
        for start in range(0, len(fb), batch_rows):
            size = min(batch_rows, len(fb) - start)
            if wanted[start:start + size].any():
                yield start, size, lambda rows, s=start: images(s + np.asarray(rows, np.int64))
    return pair_chunks


# ------------------------------------------------------------------------------------------------
# single images (Diffusion-KTO): liked/ and disliked/ folders, an image folder with metadata, the
# Diffusion-KTO authors' per-image CSV, or Pick-a-Pic pairs turned into per-image labels

LABELS = {"1": 1, "+1": 1, "true": 1, "yes": 1, "liked": 1, "like": 1, "desirable": 1,
          "0": -1, "-1": -1, "false": -1, "no": -1, "disliked": -1, "dislike": -1, "undesirable": -1}
CLASS_FOLDERS = {"liked": 1, "disliked": -1}
CAPTION_KEYS = ("text", "caption", "prompt")  # the image-folder convention first, then common synonyms


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


def image_complete(p):
    """False for an image file cut short (a copy or a save still running, a kill during one): a PNG must end with
    its IEND chunk, a JPEG with its end-of-image marker (a few padding bytes after it are allowed), a WebP must be
    as long as its RIFF header says. Reads the header and the last bytes only; other files count as complete."""
    try:
        with open(p, "rb") as f:
            head = f.read(12)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 64))
            tail = f.read()
    except OSError:
        return False
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return tail.endswith(b"IEND\xaeB`\x82")
    if head.startswith(b"\xff\xd8"):
        return b"\xff\xd9" in tail[-32:]
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 <= size
    return True


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
            text = comfy_text(graph, node.get("inputs", {}).get("positive"))
            if text:
                return text
    except (ValueError, AttributeError, TypeError, IndexError):
        pass  # not a ComfyUI graph
    return None


COMFY_TEXT = ("text", "text_g", "value", "string", "text_l")  # CLIPTextEncode, CLIPTextEncodeSDXL, primitives
COMFY_THROUGH = ("conditioning", "conditioning_1", "conditioning_to", "positive")  # ControlNet, combine, ...


def comfy_text(graph, link, depth=0):
    """The prompt behind a sampler's positive input in ComfyUI's API graph ({node id: {"class_type", "inputs"}},
    a link is [node id, output index]): the node's text (CLIPTextEncode's `text`, CLIPTextEncodeSDXL's `text_g`),
    a text wired in from another node (a primitive or string node) followed to its value, and conditioning
    passed through another node (ControlNet, Conditioning Combine) followed to the text it started from."""
    if not isinstance(link, list) or not link or depth > 20:
        return None
    inputs = graph.get(str(link[0]), {}).get("inputs", {})
    for key in COMFY_TEXT + COMFY_THROUGH:
        value = inputs.get(key)
        text = value.strip() if isinstance(value, str) and key in COMFY_TEXT else comfy_text(graph, value, depth + 1)
        if text:
            return text
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
