"""Which dataset a --data path is, load_pairs / load_singles that read it, and writing pairs back out.

load_pairs (Diffusion-DPO) and load_singles (Diffusion-KTO) detect the layout of --data and call its
reader: the public datasets in public_readers.py (Pick-a-Pic v2 parquet, HPDv2's and HPDv3's JSON annotations
with their image folders, ImageRewardDB's ranked and rated images, Rapidata's preference parquet) or a user's
own formats in data.py (JSONL pairs, liked/ and disliked/ folders, metadata files, the Diffusion-KTO authors'
CSV). Imports go data.py <- public_readers.py <- this file, so there is no import circle. Where to get each
dataset: README, "Where to get preference data". write_pairs writes pairs back out, as Pick-a-Pic parquet or
as JSONL, and write_pickapic_subset the kept rows of streamed Pick-a-Pic parquet (filter_fifa.py's subsets).
"""
import glob
import hashlib
import io
import json
import os

import numpy as np

from files import atomic_path, fail, one_line
from data import (decode, is_kto_csv, load_pairs_jsonl, pickapic_batches, read_images, singles_from_class_folders,
                  singles_from_kto_csv, singles_from_metadata, CLASS_FOLDERS)
# (hpdv2_file, parquet_files and read_pickapic are imported from here by filter_fifa.py too)
from public_readers import (RAPIDATA_REQUIRED, hpdv2_file, imagerewarddb_files, pairs_from_hpdv2, pairs_from_hpdv3,
                            pairs_from_imagerewarddb, pairs_from_pickapic, pairs_from_rapidata, parquet_files,
                            read_annotations, read_pickapic, singles_from_hpdv2, singles_from_hpdv3,
                            singles_from_imagerewarddb, singles_from_pickapic, singles_from_rapidata)


def load_pairs(path):
    """Pairs for Diffusion-DPO, read by the layout of `path` (pairs_format): a JSONL of pairs; HPDv2's or HPDv3's
    annotations (a folder with train.json or test.json, or one .json file) or one ImageRewardDB folder's .json;
    an ImageRewardDB folder; Rapidata preference parquet; otherwise Pick-a-Pic v2 parquet (file, folder, glob or
    hub id). Ties are dropped and counted; fb.vote_share is set where the data counts votes (HPDv3, Rapidata)."""
    kind = pairs_format(path)
    if kind == "jsonl":
        return load_pairs_jsonl(path)
    if kind == "json":  # told apart by the keys of its entries
        file, entries, kind = read_annotations(hpdv2_file(path))
        return (pairs_from_hpdv3(file, entries) if kind == "hpdv3" else pairs_from_hpdv2(file, entries) if kind == "hpdv2"
                else pairs_from_imagerewarddb([file]))
    if kind == "imagerewarddb":
        return pairs_from_imagerewarddb(imagerewarddb_files(path))
    return pairs_from_rapidata(path) if kind == "rapidata" else pairs_from_pickapic(path)


def pairs_format(path):
    """Which of load_pairs' readers takes `path`: "jsonl", "json" (an annotation file: HPDv2, HPDv3 or ImageRewardDB),
    "imagerewarddb" (its folder), "rapidata" or "pickapic" (parquet, told apart by their columns; checked there)."""
    if path.lower().endswith(".jsonl") and os.path.isfile(path):
        return "jsonl"
    if hpdv2_file(path):
        return "json"
    return "imagerewarddb" if imagerewarddb_files(path) else parquet_format(path)


def parquet_format(path):
    """"rapidata" when the first parquet file of `path` has Rapidata's preference columns, else "pickapic"."""
    import pyarrow.parquet as pq
    first = parquet_files(path)[0]  # fails with one line for a missing path or an unreachable hub id
    try:
        names = pq.read_schema(first).names
    except Exception as e:
        fail(f"cannot read parquet file {first}: {one_line(e)}")
    return "rapidata" if set(RAPIDATA_REQUIRED) <= set(names) else "pickapic"


def load_singles(path, pickapic_policy="at_least_once", image_root=None):
    """Labelled single images for Diffusion-KTO: fb.image, fb.label (+1 liked, -1 disliked), fb.caption_idx.

    The layout is read from `path`:
    - a folder with metadata.jsonl or metadata.csv (or any such .jsonl/.csv file): file_name relative to
      the file's folder, label, and the caption in text, caption or prompt;
    - a folder with liked/ and disliked/ subfolders, images at any depth below them;
    - a .csv with file_name, caption, split (the Diffusion-KTO authors' labels), or a folder holding one;
      file_name is relative to image_root, by default the CSV's folder;
    - HPDv2 or HPDv3 (a folder with train.json or test.json, or one .json file), labelled by pickapic_policy;
    - ImageRewardDB (its folder, or one of its folders' .json): labelled by overall_rating (singles_from_imagerewarddb);
    - Rapidata preference parquet or Pick-a-Pic v2 parquet (file, folder, glob or hub id), labelled by pickapic_policy.
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
        elif hpdv2_file(path) or imagerewarddb_files(path) or glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
            fb = singles_from_public(path, pickapic_policy)
        else:
            fail(f"{path} has no liked/ or disliked/ subfolder, no metadata.jsonl or metadata.csv, no Diffusion-KTO "
                 f"CSV, no HPDv2 or HPDv3 train.json or test.json, no ImageRewardDB folders and no .parquet files: "
                 f"nothing to read labels from")
    elif path.lower().endswith((".csv", ".jsonl")) and os.path.isfile(path):
        kto = path.lower().endswith(".csv") and is_kto_csv(path)
        fb = singles_from_kto_csv(path, pickapic_policy, image_root) if kto else singles_from_metadata(path)
    else:
        fb = singles_from_public(path, pickapic_policy)
    if len(fb) == 0:
        fail(f"no usable image in {path}: {fb.summary('images')}")
    return fb


def singles_from_public(path, policy):
    """load_singles for the public datasets, by the same layouts as load_pairs (pairs_format)."""
    kind = pairs_format(path)
    if kind == "json":
        file, entries, kind = read_annotations(hpdv2_file(path))
        return (singles_from_hpdv3(file, entries, policy) if kind == "hpdv3" else singles_from_hpdv2(file, entries, policy)
                if kind == "hpdv2" else singles_from_imagerewarddb([file]))
    if kind == "imagerewarddb":
        return singles_from_imagerewarddb(imagerewarddb_files(path))
    return singles_from_rapidata(path, policy) if kind == "rapidata" else singles_from_pickapic(path, policy)


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


def check_pairs_out(fb, out):
    """The kind of file write_pairs writes fb's pairs to at `out` (".parquet" or ".jsonl"), or one line why it cannot;
    callers with hours of work before the write (filter_fifa.py) check it first."""
    kind = os.path.splitext(out)[1].lower()
    if kind not in (".parquet", ".jsonl"):
        fail(f"--out {out}: write pairs to a .parquet file or a .jsonl file (saved as .parquet in the Pick-a-Pic schema, "
             "or .jsonl of image paths)")
    if kind == ".jsonl" and fb.paths is None:
        fail(f"--out {out}: a JSONL names image files, and these images are inside parquet files; write .parquet")
    return kind


def write_pairs(fb, rows, out, columns=None, batch_rows=1024):
    """Pairs `rows` of fb (winner first) to `out`, written whole or not at all (files.atomic_path):
    - .parquet in the Pick-a-Pic v2 schema: caption, jpg_0 (the preferred image's JPEG bytes), jpg_1, label_0 1.0,
      label_1 0.0, image_0_uid, image_1_uid (the image's path), best_image_uid; every loader reads it as Pick-a-Pic;
    - .jsonl of {"caption", "chosen", "rejected"} with image paths relative to the JSONL's folder (data.load_pairs_jsonl).
    columns: name -> (len(fb),) values per pair of fb, appended to each row (parquet columns or JSONL keys)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns, rows = columns or {}, np.asarray(rows, np.int64)
    kind = check_pairs_out(fb, out)
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
