"""The public preference datasets, their download, and load_pairs / load_singles, which read any format.

load_pairs (Diffusion-DPO) and load_singles (Diffusion-KTO) detect the layout of --data and call its
reader: the public datasets here (Pick-a-Pic v2 parquet, HPDv2's JSON annotations with their image
folders) or a user's own formats in data.py (JSONL pairs, liked/ and disliked/ folders, metadata files,
the Diffusion-KTO authors' CSV). This module imports data.py (Feedback, decoding, the local formats);
data.py never imports it, so there is no import circle. Where to get each dataset: README, "Where to get
preference data". write_pairs writes pairs back out, as Pick-a-Pic parquet or as JSONL, and
write_pickapic_subset the kept rows of streamed Pick-a-Pic parquet (filter_fifa.py's subsets).
"""
import fnmatch
import glob
import hashlib
import io
import json
import os
import re

import numpy as np

from files import atomic_path, fail, one_line
from data import (Feedback, decode, is_kto_csv, load_pairs_jsonl, pickapic_batches, read_images, singles_from_class_folders,
                  singles_from_kto_csv, singles_from_metadata, CLASS_FOLDERS)

GET_DATA = ("options: a local copy (a file or folder), a mirror in the same schema (its hub id), or another "
            "supported dataset such as HPDv2 (README, 'Where to get preference data')")


def load_pairs(path):
    """Pairs for Diffusion-DPO: a JSONL of pairs, HPDv2 (a folder with train.json or test.json, or one of
    them), otherwise Pick-a-Pic v2 parquet (file, folder, glob or hub id). Ties are dropped and counted."""
    kind = pairs_format(path)
    return load_pairs_jsonl(path) if kind == "jsonl" else pairs_from_hpdv2(hpdv2_file(path)) if kind == "hpdv2" \
        else pairs_from_pickapic(path)


def pairs_format(path):
    """Which of load_pairs' readers takes `path`: "jsonl", "hpdv2" or "pickapic" (anything else, checked there)."""
    if path.lower().endswith(".jsonl") and os.path.isfile(path):
        return "jsonl"
    return "hpdv2" if hpdv2_file(path) else "pickapic"


def load_singles(path, pickapic_policy="at_least_once", image_root=None):
    """Labelled single images for Diffusion-KTO: fb.image, fb.label (+1 liked, -1 disliked), fb.caption_idx.

    The layout is read from `path`:
    - a folder with metadata.jsonl or metadata.csv (or any such .jsonl/.csv file): file_name relative to
      the file's folder, label, and the caption in text, caption or prompt;
    - a folder with liked/ and disliked/ subfolders, images at any depth below them;
    - a .csv with file_name, caption, split (the Diffusion-KTO authors' labels), or a folder holding one;
      file_name is relative to image_root, by default the CSV's folder;
    - HPDv2 (a folder with train.json or test.json, or one of them), labelled by pickapic_policy;
    - otherwise Pick-a-Pic v2 parquet (file, folder, glob or hub id), labelled by pickapic_policy.
    An image without a caption in metadata takes the one beside it (data.caption_beside). Missing files,
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
        elif hpdv2_file(path):
            fb = singles_from_hpdv2(hpdv2_file(path), pickapic_policy)
        elif glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
            fb = singles_from_pickapic(path, pickapic_policy)
        else:
            fail(f"{path} has no liked/ or disliked/ subfolder, no metadata.jsonl or metadata.csv, no Diffusion-KTO "
                 f"CSV, no HPDv2 train.json or test.json and no .parquet files: nothing to read labels from")
    elif path.lower().endswith((".csv", ".jsonl")) and os.path.isfile(path):
        kto = path.lower().endswith(".csv") and is_kto_csv(path)
        fb = singles_from_kto_csv(path, pickapic_policy, image_root) if kto else singles_from_metadata(path)
    elif hpdv2_file(path):
        fb = singles_from_hpdv2(path, pickapic_policy)
    else:
        fb = singles_from_pickapic(path, pickapic_policy)
    if len(fb) == 0:
        fail(f"no usable image in {path}: {fb.summary('images')}")
    return fb


def label_images(fb, comparisons, policy):
    """Pairwise comparisons -> one labelled image per unique key; fills fb's captions and singles, returns the
    kept images' references. comparisons: (caption, key_0, ref_0, key_1, ref_1, outcome), outcome 0 or 1 the
    preferred side, 2 a tie. An image keeps the caption and the reference of its first comparison.

    at_least_once (the paper's): an image preferred in at least one comparison is desirable, every other image
    undesirable. A tie prefers neither image, so an image seen only in ties is undesirable (never preferred);
    fb.notes counts those. always: desirable only if preferred in every comparison it is in and never tied,
    undesirable if never preferred, skipped and counted if preferred in some only (like the KTO authors'
    intersections)."""
    counts = np.zeros((2 * len(comparisons), 3), np.int64)  # per unique image: comparisons won, lost, tied
    key_of, ref, caption = {}, [], []
    for cap, k0, r0, k1, r1, outcome in comparisons:
        for side, key, r in ((0, k0, r0), (1, k1, r1)):
            k = key_of.setdefault(key, len(key_of))
            if k == len(ref):
                ref.append(r); caption.append(cap)
            counts[k, 2 if outcome == 2 else 0 if outcome == side else 1] += 1
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
    fb.image, fb.label = np.arange(len(idx), dtype=np.int64), label[idx].astype(np.int64)
    return [ref[i] for i in idx]


# ------------------------------------------------------------------------------------------------
# Pick-a-Pic v2 parquet: columns caption, jpg_0, jpg_1 (JPEG bytes), label_0, label_1 (1/0, 0/1 or 0.5/0.5),
# image_0_uid, image_1_uid, ... (PAPERS.md, section 4). The hub copy yuvalkirstain/pickapic_v2 is gone.

PICKAPIC_REQUIRED = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
PICKAPIC_META = ["caption", "label_0", "label_1", "image_0_uid", "image_1_uid"]  # what the loaders read up front


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
        except Exception as e:  # gone (yuvalkirstain/pickapic_v2 answers 404 since April 2025), private or offline
            fail(f"hub dataset {repo} is not a local file and could not be downloaded from the hub "
                 f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); {GET_DATA}")
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


def read_pickapic(files, columns, same_schema=False):
    """The columns `columns` of Pick-a-Pic parquet files as one arrow table (rows in file order, a column a
    file lacks as nulls), and each file's row-group sizes (to read images later without scanning).
    Every file must have the columns a pair needs; same_schema: also the same schema as the first file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tables, groups, first = [], [], None
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            fail(f"cannot read parquet file {f}: {one_line(e)}")
        names = pf.schema_arrow.names
        missing = [c for c in PICKAPIC_REQUIRED if c not in names]
        if missing:
            fail(f"{f} lacks the Pick-a-Pic column(s) {missing}; it has {names}")
        first = first or pf.schema_arrow
        if same_schema and not pf.schema_arrow.equals(first):
            fail(f"{f} has another schema than {files[0]}; use them separately")
        t = pf.read(columns=[c for c in columns if c in names])
        for c in columns:
            if c not in names:
                t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
        tables.append(t.select(columns))
        groups.append([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    return pa.concat_tables(tables), groups


def read_pickapic_index(path):
    """The small columns of Pick-a-Pic parquet files: one entry per pair, images per (file, row, column)."""
    files = parquet_files(path)
    table, groups = read_pickapic(files, PICKAPIC_META)
    sizes = [sum(g) for g in groups]
    file_of = np.repeat(np.arange(len(files)), sizes).tolist()
    row_of = np.concatenate([np.arange(n) for n in sizes]).tolist() if sizes else []
    t = table.to_pydict()
    rows = list(zip(file_of, row_of, t["caption"], t["label_0"], t["label_1"], t["image_0_uid"], t["image_1_uid"]))
    return files, groups, rows


def pairs_from_pickapic(path):
    """Pick-a-Pic pairs. Ties (0.5/0.5) are dropped and counted, as the official code does."""
    files, groups, rows = read_pickapic_index(path)
    fb = Feedback(captions=[], parquet_files=files, row_groups=groups, source=path)
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


def singles_from_pickapic(path, policy):
    """Pick-a-Pic pairs -> one labelled entry per unique image (by image_0_uid / image_1_uid; without uid
    columns every image is its own), labelled by label_images' policy."""
    files, groups, rows = read_pickapic_index(path)
    fb = Feedback(captions=[], parquet_files=files, row_groups=groups, source=f"{path} (pairs -> images, policy {policy})")
    outcome = {(1.0, 0.0): 0, (0.0, 1.0): 1, (0.5, 0.5): 2}
    comparisons = []
    for fi, r, cap, l0, l1, u0, u1 in rows:
        if not cap or not str(cap).strip():
            fb.skip("pair with no caption"); continue
        if (l0, l1) not in outcome:
            fb.skip("pair with labels neither 1/0, 0/1 nor 0.5/0.5"); continue
        refs = (fi, r, 0), (fi, r, 1)
        comparisons.append((str(cap).strip(), refs[0] if u0 is None else u0, refs[0],
                            refs[1] if u1 is None else u1, refs[1], outcome[l0, l1]))
    refs = label_images(fb, comparisons, policy)
    fb.file, fb.row, fb.col = (np.array([r[j] for r in refs], dt) for j, dt in enumerate((np.int32, np.int64, np.int8)))
    return fb


# ------------------------------------------------------------------------------------------------
# HPDv2, the HPSv2 authors' Human Preference Dataset v2 (hub ymhao/HPDv2, Apache-2.0; 798k pairwise choices
# over 430k images and 107k prompts, 645k of them training pairs). Its dataset card documents:
#   train.json: [{'human_preference': list[int],  # 1 for preference
#                 'prompt': str, 'file_path': list[str]}, ...]
#   test.json:  [{'prompt': str, 'image_path': list[str],
#                 'rank': list[int],  # averaged ranking result for image at the same index in image_path
#                 'raw_annotations': list[{'rank', 'user_hash'}]}, ...]  # raw ranking result from each annotator
# and the images come as train.tar.gz / test.tar.gz, unpacked into train/ and test/ beside the JSON files.
# Read here, beyond the card: a train entry's images may be under 'image_path' as in test.json (loaders of the
# released file read that key), so either key is taken; a lower rank is better (the HPSv2 authors' evaluation
# ranks its own scores 0 = best and compares them with 'rank'); the averaged 'rank' is used, not the raw ones.

HPDV2_FILES = ("train.json", "test.json")


def hpdv2_file(path):
    """The HPDv2 annotation file that `path` names: a .json file itself, or train.json (else test.json) in a
    folder; None when path is neither (then it is some other format)."""
    if path.lower().endswith(".json") and os.path.isfile(path):
        return path
    if os.path.isdir(path):
        return next((os.path.join(path, n) for n in HPDV2_FILES if os.path.isfile(os.path.join(path, n))), None)
    return None


def hpdv2_comparisons(path):
    """HPDv2 annotations as pairwise comparisons (caption, path_0, path_0, path_1, path_1, outcome: 0 or 1 the
    preferred side, 2 a tie), and a Feedback counting the entries skipped. Image paths are relative to the
    folder named after the file (train/ beside train.json, or train/train/), else to the file's own folder.
    train.json: each preferred image (human_preference 1) against each other image of its entry; an entry that
    prefers none or all of its images is one tie. test.json: every two images of an entry, the lower rank
    preferred, equal ranks a tie."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read HPDv2 annotations {path}: {one_line(e)}")
    first = entries[0] if isinstance(entries, list) and entries else {}
    kind = "train" if "human_preference" in first else "test" if "rank" in first else None
    if not isinstance(first, dict) or kind is None:
        fail(f"{path} is not an HPDv2 annotation file: expected a JSON list of objects with prompt, file_path (or "
             f"image_path) and human_preference (train.json), or prompt, image_path and rank (test.json)")
    # the image folder: train/ beside train.json (train/train/ if the archive held the folder), else beside it
    folder, split = os.path.dirname(os.path.abspath(path)), os.path.splitext(os.path.basename(path))[0]
    roots = [os.path.join(folder, split), os.path.join(folder, split, split), folder]
    probe = (first.get("file_path") or first.get("image_path") or [""])[0]
    root = next((r for r in roots if isinstance(probe, str) and os.path.isfile(os.path.join(r, probe))),
                roots[0] if os.path.isdir(roots[0]) else folder)
    fb = Feedback(captions=[], paths=[], source=f"{path} (HPDv2 {kind})")
    comparisons = []
    for e in entries:
        files = e.get("file_path", e.get("image_path")) if isinstance(e, dict) else None
        marks = e.get("human_preference" if kind == "train" else "rank") if isinstance(e, dict) else None
        if not (isinstance(files, list) and isinstance(marks, list) and len(files) == len(marks) >= 2):
            fb.skip("entry without two or more images and as many labels"); continue
        caption = e.get("prompt")
        if not isinstance(caption, str) or not caption.strip():
            fb.skip("entry with no caption"); continue
        paths = [os.path.join(root, str(p)) for p in files]
        pairs = []
        if kind == "train":
            if not set(marks) <= {0, 1}:
                fb.skip(f"entry with human_preference other than 0/1 (e.g. {marks})"); continue
            won, lost = [i for i, m in enumerate(marks) if m == 1], [i for i, m in enumerate(marks) if m == 0]
            pairs = [(w, l, 0) for w in won for l in lost] or [(0, 1, 2)]  # none or all preferred: one tie
        else:
            if not all(isinstance(m, (int, float)) for m in marks):
                fb.skip("entry with a rank that is not a number"); continue
            pairs = [(i, j, 2 if marks[i] == marks[j] else 0 if marks[i] < marks[j] else 1)
                     for i in range(len(paths)) for j in range(i + 1, len(paths))]
        comparisons += [(caption.strip(), paths[a], paths[a], paths[b], paths[b], o) for a, b, o in pairs]
    return fb, comparisons


def pairs_from_hpdv2(path):
    """HPDv2 pairs for Diffusion-DPO: ties dropped and counted, a pair with a missing image file skipped and counted."""
    fb, comparisons = hpdv2_comparisons(path)
    cap_id, img_id, cap, win, lose, exists = {}, {}, [], [], [], {}
    for caption, p0, _, p1, _, outcome in comparisons:
        if outcome == 2:
            fb.skip("tie"); continue
        if not all(exists.setdefault(p, os.path.isfile(p)) for p in (p0, p1)):
            fb.skip("missing file"); continue
        ids = [img_id.setdefault(p, len(img_id)) for p in ((p0, p1) if outcome == 0 else (p1, p0))]  # winner first
        cap.append(cap_id.setdefault(caption, len(cap_id)))
        win.append(ids[0]); lose.append(ids[1])
    fb.captions, fb.paths = list(cap_id), list(img_id)
    fb.caption_idx, fb.winner, fb.loser = np.array(cap, np.int64), np.array(win, np.int64), np.array(lose, np.int64)
    return fb


def singles_from_hpdv2(path, policy):
    """HPDv2 comparisons -> one labelled image per unique file, as for Pick-a-Pic (label_images)."""
    fb, comparisons = hpdv2_comparisons(hpdv2_file(path))
    fb.source += f" (pairs -> images, policy {policy})"
    exists = {}
    kept = [c for c in comparisons if all(exists.setdefault(p, os.path.isfile(p)) for p in (c[1], c[3]))]
    fb.skip("pair with a missing file", len(comparisons) - len(kept))
    fb.paths = label_images(fb, kept, policy)
    return fb


# ------------------------------------------------------------------------------------------------
# writing pairs back out (filter_fifa.py's subsets of any pairs source)

def jpeg_bytes(fb, i, image=None):
    """Image i of fb as JPEG bytes: a JPEG file's own bytes (no second compression), else re-encoded at quality 95."""
    if fb.paths is not None:
        with open(fb.paths[i], "rb") as f:
            raw = f.read()
        if raw[:3] == b"\xff\xd8\xff":
            return raw
        image = decode(raw)
    image = image or read_images(fb, [i])[0]
    if image is None:
        fail(f"cannot write image {fb.describe_image(i)}: it is missing or corrupt")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_pairs(fb, rows, out, columns=None, batch_rows=1024):
    """Pairs `rows` of fb (winner first) to `out`, written whole or not at all (files.atomic_path):
    - .parquet in the Pick-a-Pic v2 schema: caption, jpg_0 (the preferred image's JPEG bytes), jpg_1, label_0 1.0,
      label_1 0.0, image_0_uid, image_1_uid (the image's path), best_image_uid; every loader reads it as Pick-a-Pic;
    - .jsonl of {"caption", "chosen", "rejected"} with image paths relative to the JSONL's folder (data.load_pairs_jsonl).
    columns: name -> (len(fb),) values per pair of fb, appended to each row (parquet columns or JSONL keys)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns, rows = columns or {}, np.asarray(rows, np.int64)
    kind = os.path.splitext(out)[1].lower()
    if kind not in (".parquet", ".jsonl"):
        fail(f"--out {out}: write pairs to a .parquet file (Pick-a-Pic schema) or a .jsonl file")
    if kind == ".jsonl" and fb.paths is None:
        fail(f"--out {out}: a JSONL names image files, and these images are inside parquet files; write .parquet")
    uid = lambda i: fb.paths[i] if fb.paths is not None else fb.describe_image(i)
    plain = lambda v: v.item() if hasattr(v, "item") else v  # numpy scalars -> Python numbers for JSON
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_path(out) as tmp:
        if kind == ".jsonl":
            root = os.path.dirname(os.path.abspath(out))
            value = lambda v: None if isinstance(plain(v), float) and plain(v) != plain(v) else plain(v)  # NaN -> null
            with open(tmp, "w", encoding="utf-8") as f:
                for r in rows:
                    rec = {"caption": fb.captions[fb.caption_idx[r]], "chosen": os.path.relpath(fb.paths[fb.winner[r]], root),
                           "rejected": os.path.relpath(fb.paths[fb.loser[r]], root)}
                    f.write(json.dumps({**rec, **{k: value(v[r]) for k, v in columns.items()}}) + "\n")
            return
        writer = None
        for s in range(0, max(len(rows), 1), batch_rows):
            part = rows[s:s + batch_rows]
            w, l = fb.winner[part], fb.loser[part]
            t = {"caption": [fb.captions[c] for c in fb.caption_idx[part]],
                 "jpg_0": pa.array([jpeg_bytes(fb, i) for i in w], pa.binary()),
                 "jpg_1": pa.array([jpeg_bytes(fb, i) for i in l], pa.binary()),
                 "label_0": pa.array(np.ones(len(part)), pa.float64()), "label_1": pa.array(np.zeros(len(part)), pa.float64()),
                 "image_0_uid": [uid(i) for i in w], "image_1_uid": [uid(i) for i in l], "best_image_uid": [uid(i) for i in w]}
            t = pa.table({**t, **{k: pa.array(np.asarray(v)[part]) for k, v in columns.items()}})
            writer = writer or pq.ParquetWriter(tmp, t.schema)
            writer.write_table(t)
        writer.close()


def write_pickapic_subset(files, groups, out, keep, columns, swap, batch_rows=1024):
    """Stream Pick-a-Pic parquet files again and write the kept rows, in input order, every column kept and
    `columns` appended (filter_fifa.py's subset of streamed Pick-a-Pic; groups: read_pickapic's row-group sizes).

    keep, swap: (N,) bool; columns: name -> (N,) array. Swapped rows get label_0/label_1 exchanged
    (and best_image_uid, when present, set to the new winner). Written to a temp file, then renamed."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    with atomic_path(out) as tmp:
        writer = None
        for start, batch in pickapic_batches(files, groups, keep, batch_rows=batch_rows):
            sel = np.flatnonzero(keep[start:start + batch.num_rows])
            t, idx = pa.Table.from_batches([batch]).take(sel), start + sel
            flip = pa.array(swap[idx])
            l0, l1 = pc.if_else(flip, t["label_1"], t["label_0"]), pc.if_else(flip, t["label_0"], t["label_1"])
            t = t.set_column(t.schema.get_field_index("label_0"), "label_0", l0)
            t = t.set_column(t.schema.get_field_index("label_1"), "label_1", l1)
            if {"best_image_uid", "image_0_uid", "image_1_uid"} <= set(t.column_names):
                best = pc.if_else(pc.greater(l0, l1), t["image_0_uid"], t["image_1_uid"])
                t = t.set_column(t.schema.get_field_index("best_image_uid"), "best_image_uid",
                                 pc.if_else(flip, best, t["best_image_uid"]))
            for name, values in columns.items():
                t = t.append_column(name, pa.array(values[idx]))
            writer = writer or pq.ParquetWriter(tmp, t.schema)
            writer.write_table(t)
        writer.close()


def pairs_identity(fb):
    """A short hash of which pairs fb holds (captions, image references, winner and loser): a cache key part."""
    h = hashlib.sha256()
    for a in (fb.caption_idx, fb.winner, fb.loser):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update("\0".join(fb.captions + list(fb.paths or [])).encode())
    return h.hexdigest()[:16]
