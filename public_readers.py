"""The readers of the public preference datasets, one per dataset, each against the schema its card (or its
authors' code) documents: Pick-a-Pic v2 parquet (and its mirrors), HPDv2's and HPDv3's JSON annotations with their
image folders, ImageRewardDB's ranked and rated images, Rapidata's preference parquet. Each gives a Feedback
(data.py) of pairs (pairs_from_*) or of labelled single images (singles_from_*), with what it skipped counted.
public_data.py tells which one a --data path is (load_pairs, load_singles); this module imports data.py only.
Where to get each dataset: README, "Where to get preference data".
"""
import fnmatch
import glob
import json
import os
import re

import numpy as np

from files import fail, one_line
from data import Feedback, share_of_votes, singles_from_entries, skip_unknown

GET_DATA = ("options: a local copy (a file or folder), a mirror in the same schema (its hub id), or another "
            "supported dataset such as HPDv2 (README, 'Where to get preference data')")


# ------------------------------------------------------------------------------------------------
# what every reader shares: pairwise comparisons -> pairs of files, or -> labelled single images

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


def pairs_from_files(fb, comparisons, shares=None, missing=lambda p: "missing file"):
    """Pairs of image files for Diffusion-DPO from comparisons (caption, path_0, _, path_1, _, outcome), with
    (N,) vote shares of side 0 beside them or None: ties (outcome 2) dropped and counted, a pair with a missing
    image file skipped and counted under missing(path). The winner goes first; fb.vote_share is its share."""
    cap_id, img_id, cap, win, lose, share, exists = {}, {}, [], [], [], [], {}
    for n, (caption, p0, _, p1, _, outcome) in enumerate(comparisons):
        if outcome == 2:
            fb.skip("tie"); continue
        gone = [p for p in (p0, p1) if not exists.setdefault(p, os.path.isfile(p))]
        if gone:
            fb.skip(missing(gone[0])); continue
        ids = [img_id.setdefault(p, len(img_id)) for p in ((p0, p1) if outcome == 0 else (p1, p0))]  # winner first
        cap.append(cap_id.setdefault(caption, len(cap_id)))
        win.append(ids[0]); lose.append(ids[1])
        share.append(np.nan if shares is None else shares[n] if outcome == 0 else 1 - shares[n])
    fb.captions, fb.paths = list(cap_id), list(img_id)
    fb.caption_idx, fb.winner, fb.loser = np.array(cap, np.int64), np.array(win, np.int64), np.array(lose, np.int64)
    fb.vote_share = None if shares is None else np.array(share, np.float64)
    return fb


def singles_from_files(fb, comparisons, policy, missing=lambda p: "missing file"):
    """Comparisons of image files -> one labelled image per unique file (label_images' policy); a comparison
    with a missing image file is skipped and counted (under "pair with a " + missing(path))."""
    fb.source += f" (pairs -> images, policy {policy})"
    kept, exists = [], {}
    for c in comparisons:
        gone = [p for p in (c[1], c[3]) if not exists.setdefault(p, os.path.isfile(p))]
        if gone:
            fb.skip("pair with a " + missing(gone[0])); continue
        kept.append(c)
    fb.paths = label_images(fb, kept, policy)
    return fb


def image_root(candidates, probes, default):
    """The folder among `candidates` under which most of the relative image paths `probes` exist (the first of equals),
    or `default` when none exists anywhere: where an archive of images was unpacked."""
    hits = [sum(os.path.isfile(os.path.join(r, p)) for p in probes) for r in candidates]
    return candidates[hits.index(max(hits))] if max(hits) else default


def spread(entries, n=200):
    """About n entries spread over the whole list (the probes of image_root: the first ones may all be unusual)."""
    return entries[::max(1, len(entries) // n)]


def read_annotations(path):
    """A JSON annotation file: (path, its list of entries, which dataset wrote it: "hpdv2", "hpdv3" or
    "imagerewarddb", told apart by the keys of its first entry). A file of none of them stops with one line."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read the annotations {path}: {one_line(e)}")
    if isinstance(entries, list) and not entries:
        fail(f"{path} holds no entries (an empty list)")
    first = entries[0] if isinstance(entries, list) and isinstance(entries[0], dict) else {}
    kind = ("hpdv3" if {"path1", "path2"} <= set(first) else "imagerewarddb" if {"prompt_id", "image_path", "rank"} <= set(first)
            else "hpdv2" if "human_preference" in first or "rank" in first else None)
    if kind is None:
        fail(f"{path} is not an annotation file of HPDv2, HPDv3 or ImageRewardDB: expected a JSON list of objects with "
             f"prompt, file_path (or image_path) and human_preference, or prompt, image_path and rank (HPDv2); prompt, "
             f"path1 and path2 (HPDv3); image_path, prompt_id, prompt, rank and overall_rating (ImageRewardDB)")
    return path, entries, kind


# ------------------------------------------------------------------------------------------------
# Pick-a-Pic v2 parquet: columns caption, jpg_0, jpg_1 (JPEG bytes), label_0, label_1 (1/0, 0/1 or 0.5/0.5),
# image_0_uid, image_1_uid, ... (PAPERS.md, section 4). The hub copy yuvalkirstain/pickapic_v2 is gone; the mirror
# liuhuohuo2/pick-a-pic-v2 states the original card's dataset_info (the same 19 features and split sizes) and is read
# by its hub id like any copy in this schema (README, "Where to get preference data").

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
                 f"({type(e).__name__}: {one_line(e)[:160]}); {GET_DATA}")
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


def read_pickapic(files, columns, same_schema=False, required=None, what="Pick-a-Pic"):
    """The columns `columns` of Pick-a-Pic parquet files as one arrow table (rows in file order, a column a
    file lacks as nulls), and each file's row-group sizes (to read images later without scanning).
    Every file must have the columns a pair needs (`required`, Pick-a-Pic's by default; Rapidata's for its
    parquet, named `what`); same_schema: also the same schema as the first file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tables, groups, first = [], [], None
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            fail(f"cannot read parquet file {f}: {one_line(e)}")
        names = pf.schema_arrow.names
        missing = [c for c in (required or PICKAPIC_REQUIRED) if c not in names]
        if missing:
            fail(f"{f} lacks the {what} column(s) {missing}; it has {names}")
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


def parquet_rows(files, groups):
    """(file index, row index) of every row of parquet files whose row-group sizes are `groups`, in file order."""
    sizes = [sum(g) for g in groups]
    file_of = np.repeat(np.arange(len(files)), sizes).tolist()
    return zip(file_of, np.concatenate([np.arange(n) for n in sizes]).tolist() if sizes else [])


def set_parquet_refs(fb, refs):
    """fb's images as (file, row, column) references into its parquet files: fb.file, fb.row, fb.col."""
    fb.file, fb.row, fb.col = (np.array([r[j] for r in refs], dt) for j, dt in enumerate((np.int32, np.int64, np.int8)))


def pairs_from_parquet(fb, comparisons, shares=None):
    """Pairs of parquet images for Diffusion-DPO from comparisons (caption, _, (file, row, 0), _, (file, row, 1),
    outcome), with (N,) vote shares of side 0 or None: ties dropped and counted, the winner first whichever side
    it was shown on. Only kept pairs' images are indexed (image 2i is pair i's column 0, 2i + 1 its column 1), so
    the cache encodes no tie."""
    refs, cap, win, lose, share, cap_id = [], [], [], [], [], {}
    for n, (caption, _, r0, _, r1, outcome) in enumerate(comparisons):
        if outcome == 2:
            fb.skip("tie"); continue
        base = len(refs)
        refs += [r0, r1]
        cap.append(cap_id.setdefault(caption, len(cap_id)))
        win.append(base + outcome); lose.append(base + 1 - outcome)
        share.append(np.nan if shares is None else shares[n] if outcome == 0 else 1 - shares[n])
    fb.captions = list(cap_id)
    set_parquet_refs(fb, refs)
    fb.caption_idx, fb.winner, fb.loser = np.array(cap, np.int64), np.array(win, np.int64), np.array(lose, np.int64)
    fb.vote_share = None if shares is None else np.array(share, np.float64)
    return fb


def singles_from_parquet(fb, comparisons, policy):
    """Comparisons of parquet images -> one labelled entry per image key by label_images' policy."""
    fb.source += f" (pairs -> images, policy {policy})"
    set_parquet_refs(fb, label_images(fb, comparisons, policy))
    return fb


def pickapic_comparisons(path, pair=""):
    """Pick-a-Pic rows as comparisons (caption, key_0, (file, row, 0), key_1, (file, row, 1), outcome 0/1, 2 a tie),
    an image's key its image_*_uid (without uid columns its reference: every image its own), and a Feedback (parquet
    references) counting the rows skipped, named with `pair` in front ("pair with " for the single-image readers)."""
    files = parquet_files(path)
    table, groups = read_pickapic(files, PICKAPIC_META)
    fb = Feedback(captions=[], parquet_files=files, row_groups=groups, source=path)
    outcome = {(1.0, 0.0): 0, (0.0, 1.0): 1, (0.5, 0.5): 2}
    comparisons = []
    for (fi, r), cap, l0, l1, u0, u1 in zip(parquet_rows(files, groups), *table.to_pydict().values()):
        if not cap or not str(cap).strip():
            fb.skip(f"{pair}no caption"); continue
        if (l0, l1) not in outcome:
            fb.skip(f"{pair}labels neither 1/0, 0/1 nor 0.5/0.5" if pair else "label neither 1/0 nor 0/1"); continue
        refs = (fi, r, 0), (fi, r, 1)
        cap = str(cap).strip() if pair else cap  # (the pairs keep the caption as written, as they always did)
        comparisons.append((cap, refs[0] if u0 is None else u0, refs[0],
                            refs[1] if u1 is None else u1, refs[1], outcome[l0, l1]))
    return fb, comparisons


def pairs_from_pickapic(path):
    """Pick-a-Pic pairs. Ties (0.5/0.5) are dropped and counted, as the official code does."""
    return pairs_from_parquet(*pickapic_comparisons(path))


def singles_from_pickapic(path, policy):
    """Pick-a-Pic pairs -> one labelled entry per unique image (by image_0_uid / image_1_uid; without uid
    columns every image is its own), labelled by label_images' policy."""
    return singles_from_parquet(*pickapic_comparisons(path, "pair with "), policy)


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

HPDV2_FILES = ("train.json", "test.json")  # HPDv3 names its files alike (below)


def hpdv2_file(path):
    """The annotation file that `path` names (HPDv2, HPDv3 or one ImageRewardDB folder's): a .json file itself, or
    train.json (else test.json) in a folder; None when path is neither (then it is some other format)."""
    if path.lower().endswith(".json") and os.path.isfile(path):
        return path
    if os.path.isdir(path):
        return next((os.path.join(path, n) for n in HPDV2_FILES if os.path.isfile(os.path.join(path, n))), None)
    return None


def hpdv2_comparisons(path, entries):
    """HPDv2 annotations (the entries of `path`) as pairwise comparisons (caption, path_0, path_0, path_1, path_1,
    outcome: 0 or 1 the preferred side, 2 a tie), and a Feedback counting the entries skipped. Image paths are
    relative to the folder named after the file (train/ beside train.json, or train/train/), else to the file's own
    folder. train.json: each preferred image (human_preference 1) against each other image of its entry; an entry
    that prefers none or all of its images is one tie. test.json: every two images of an entry, the lower rank
    preferred, equal ranks a tie."""
    first = entries[0]
    kind = "train" if "human_preference" in first else "test"
    # the image folder: train/ beside train.json (train/train/ if the archive held the folder), else beside it
    folder, split = os.path.dirname(os.path.abspath(path)), os.path.splitext(os.path.basename(path))[0]
    roots = [os.path.join(folder, split), os.path.join(folder, split, split), folder]
    probes = [p for e in spread(entries) if isinstance(e, dict)
              for p in (e.get("file_path") or e.get("image_path") or [])[:1] if isinstance(p, str)]
    root = image_root(roots, probes, roots[0] if os.path.isdir(roots[0]) else folder)
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


def pairs_from_hpdv2(path, entries):
    """HPDv2 pairs for Diffusion-DPO: ties dropped and counted, a pair with a missing image file skipped and counted."""
    return pairs_from_files(*hpdv2_comparisons(path, entries))


def singles_from_hpdv2(path, entries, policy):
    """HPDv2 comparisons -> one labelled image per unique file, as for Pick-a-Pic (label_images)."""
    return singles_from_files(*hpdv2_comparisons(path, entries), policy)


# ------------------------------------------------------------------------------------------------
# HPDv3, the HPSv3 authors' Human Preference Dataset v3 (hub MizzenAI/HPDv3, MIT; 1.08M images, 1.17M annotated
# pairs; generations of FLUX.1-dev, SD3, SDXL, Kolors, Midjourney, ... and real photos). Read from the HPSv3 README
# (github MizzenAI/HPSv3, "Pairwise Training Data Format") and the card (its "How to Use"):
#   all.json, train.json: [{"prompt": str, "choice_dist": [12, 7],  # votes for image1 (path1), for image2
#                            "confidence": float,  # from the annotators' capabilities, independent of choice_dist
#                            "path1": "images/uuid1.jpg",  # always the preferred image
#                            "path2": "images/uuid2.jpg", "model1": str, "model2": str}, ...]
#     choice_dist and confidence are null for the Midjourney and the curated HPDv2 pairs (no vote counts);
#   test.json: [{"prompt", "path1" (preferred), "path2", "model1", "model2"}, ...];
#   train.json also holds Pick-a-Pic and ImageRewardDB pairs (pickapic.json, imagereward.json) "by pair
#   information only": their images are in those datasets, not in HPDv3's archive;
#   images: images.tar.gz.00, .01, ... unpacked in the dataset folder with `cat images.tar.gz.* | gunzip | tar -xv`.
# The HPSv3 code (hpsv3/dataset/pairwise_dataset.py) opens path1 and path2 as written, from the dataset folder,
# and its soft label is the larger share of choice_dist; here the share is path1's (below 0.5 where most votes
# went to path2: kept, as the card's label, and counted).

def hpdv3_root(path, entries):
    """The folder HPDv3's relative image paths start from: the annotation file's folder (the archive unpacked in
    it gives images/...), or its images/ folder (unpacked into images/ itself: images/images/...); the one where
    more of its own images (images/..., not the pairs by reference) exist, probed over the whole file."""
    folder = os.path.dirname(os.path.abspath(path))
    probes = [e["path1"] for e in spread(entries) if isinstance(e, dict) and str(e.get("path1")).startswith("images/")]
    return image_root([folder, os.path.join(folder, "images")], probes, folder)


def hpdv3_comparisons(path, entries):
    """HPDv3 entries as comparisons (caption, path1, path1, path2, path2, outcome 0: path1 preferred), path1's
    (N,) vote share (NaN without counts), and a Feedback counting the entries skipped."""
    root = hpdv3_root(path, entries)
    fb = Feedback(captions=[], paths=[], source=f"{path} (HPDv3)")
    comparisons, shares, bad_votes = [], [], []
    for e in entries:
        p1, p2 = (e.get("path1"), e.get("path2")) if isinstance(e, dict) else (None, None)
        if not (isinstance(p1, str) and isinstance(p2, str) and p1 and p2):
            fb.skip("entry without path1 and path2"); continue
        caption = e.get("prompt")
        if not isinstance(caption, str) or not caption.strip():
            fb.skip("entry with no caption"); continue
        if p1 == p2:
            fb.skip("tie (same image twice)"); continue
        votes = e.get("choice_dist")
        share = np.nan if votes is None else share_of_votes(votes)
        if share is None:
            bad_votes.append(votes); continue
        a, b = os.path.join(root, p1), os.path.join(root, p2)
        comparisons.append((caption.strip(), a, a, b, b, 0))
        shares.append(share)
    skip_unknown(fb, [json.dumps(v) for v in bad_votes], "choice_dist", "two vote counts >= 0, or null")
    return fb, comparisons, np.array(shares, np.float64), root


def hpdv3_missing(root):
    """The reason a missing HPDv3 image is counted under: its own archive's (under images/) or a pair by reference."""
    own = os.path.join(root, "images") + os.sep
    return lambda p: ("missing file under images/ (unpack HPDv3's images.tar.gz.*)" if p.startswith(own) else
                      "missing file outside images/ (a pair by reference, e.g. Pick-a-Pic or ImageRewardDB: its images "
                      "are not in HPDv3's archive)")


def pairs_from_hpdv3(path, entries):
    """HPDv3 pairs for Diffusion-DPO (path1 the winner), fb.vote_share from choice_dist; a pair whose image files
    are not there (HPDv3's archive not unpacked, or a Pick-a-Pic/ImageRewardDB pair by reference) is counted."""
    fb, comparisons, shares, root = hpdv3_comparisons(path, entries)
    fb = pairs_from_files(fb, comparisons, shares, hpdv3_missing(root))
    counted = ~np.isnan(fb.vote_share)
    fb.notes["pairs with vote counts (choice_dist)"] = int(counted.sum())
    for what, n in (("most of whose votes went to path2", (fb.vote_share < 0.5).sum()),
                    ("with tied votes", (fb.vote_share == 0.5).sum())):
        if n:
            fb.notes[f"pairs {what} (kept: path1 is the card's preferred image)"] = int(n)
    if not counted.any():  # test.json, or only pairs without counts: no vote share, as for data that has none
        fb.vote_share = None
    return fb


def singles_from_hpdv3(path, entries, policy):
    """HPDv3 pairs -> one labelled image per unique file by label_images' policy (at_least_once: an image
    preferred in at least one pair is desirable; always: only if preferred in every pair it is in)."""
    fb, comparisons, _, root = hpdv3_comparisons(path, entries)
    return singles_from_files(fb, comparisons, policy, hpdv3_missing(root))


# ------------------------------------------------------------------------------------------------
# ImageRewardDB (hub THUDM/ImageRewardDB, now zai-org/ImageRewardDB, Apache-2.0; 137k expert comparisons: 8K
# prompts, 49.9K images, 141.1K pairs in its largest train subset). Read from its card ("Dataset Structure",
# "Data Instances", "Data Fields") and its loading script ImageRewardDB.py:
#   images/{train,validation,test}/{split}_{n}.zip, each unpacked to a folder {split}_{n}/ holding ~500 prompts'
#   images (lossless WebP, UUID names) and {split}_{n}.json, a list of one object per image:
#   {"image_path": "images/train/train_1/<uuid>.webp", "prompt_id": "000864-0061", "prompt": str,
#    "classification": str, "image_amount_in_total": int, "rank": int, "overall_rating": int,
#    "image_text_alignment_rating": int, "fidelity_rating": int}
#   (the script's features: prompt_id, prompt, classification strings; the rest int8). The loading script finds an
#   image in the folder its zip unpacked to, by the file name of image_path; so does this reader.
# rank: "the relative rank of the image in all related images"; lower is better, as the authors' own pair maker
# reads it (github THUDM/ImageReward, train/src/rank_pair_dataset.py: the smaller rank is img_better, equal ranks
# make no pair). The rating scale is not stated on the card, so the labels below compare ratings within a prompt.
# metadata-{split}.parquet (the same annotations without images) is not read: its columns are not on the card.

def imagerewarddb_files(path):
    """ImageRewardDB's annotation files under the folder `path`: {split}_{n}/{split}_{n}.json, each in the folder of
    its images (the dataset folder means its train split, images/train/); [] when there are none."""
    if not os.path.isdir(path):
        return []
    train = os.path.join(path, "images", "train")
    root = train if os.path.isdir(train) else path
    files = glob.glob(os.path.join(root, "**", "*.json"), recursive=True)
    files = sorted(f for f in files if os.path.splitext(os.path.basename(f))[0] == os.path.basename(os.path.dirname(f)))
    splits = sorted({os.path.basename(f).rsplit("_", 1)[0] for f in files})
    if len(splits) > 1:  # never train on the test split by accident
        fail(f"{path} holds ImageRewardDB's splits {splits}: pass one split's folder, e.g. {path}/train")
    if not files and any(glob.glob(os.path.join(root, "**", f"{split}_[0-9]*.zip"), recursive=True)
                         for split in ("train", "validation", "test")):
        fail(f"{path} holds ImageRewardDB's zip files but no unpacked folders: unzip each into its own folder, e.g. "
             f"for z in {root}/*.zip; do unzip -q \"$z\" -d \"${{z%.zip}}\"; done")
    return files


def imagerewarddb_groups(files):
    """ImageRewardDB's images grouped by prompt_id: ({prompt_id: [(image file, rank, overall_rating)]}, {prompt_id:
    caption}) and a Feedback counting the images skipped (an image file that is missing is kept here: the readers
    count it in the pairs or labels it takes part in)."""
    if not files:
        fail("no ImageRewardDB annotation files ({split}_{n}/{split}_{n}.json): unzip images/{split}/*.zip first")
    fb = Feedback(captions=[], paths=[], source=f"{os.path.dirname(files[0]) if len(files) == 1 else os.path.commonpath(files)} "
                                                f"(ImageRewardDB, {len(files)} annotation file(s))")
    groups, captions, bad_ranks = {}, {}, []
    for file in files:
        _, entries, kind = read_annotations(file)
        if kind != "imagerewarddb":
            fail(f"{file} is not an ImageRewardDB annotation file (it reads as {kind})")
        for e in entries:
            if not isinstance(e, dict):
                fb.skip("image entry that is not an object"); continue
            pid, rank, caption = e.get("prompt_id"), e.get("rank"), e.get("prompt")
            if not isinstance(e.get("image_path"), str) or pid is None:
                fb.skip("image entry without image_path or prompt_id"); continue
            if not isinstance(caption, str) or not caption.strip():
                fb.skip("image entry with no caption"); continue
            if not isinstance(rank, (int, float)) or isinstance(rank, bool):
                bad_ranks.append(rank); continue
            image = os.path.join(os.path.dirname(file), os.path.basename(e["image_path"]))  # as the loading script
            groups.setdefault(pid, []).append((image, rank, e.get("overall_rating")))
            captions.setdefault(pid, caption.strip())
    skip_unknown(fb, bad_ranks, "rank", "a number, lower is better")
    return fb, groups, captions


def pairs_from_imagerewarddb(files):
    """ImageRewardDB pairs for Diffusion-DPO: every two images of a prompt, the lower rank preferred; equal ranks are
    ties, dropped and counted (the authors' pair maker makes no pair of them); missing image files counted."""
    fb, groups, captions = imagerewarddb_groups(files)
    comparisons = [(captions[pid], a[0], a[0], b[0], b[0], 2 if a[1] == b[1] else 0 if a[1] < b[1] else 1)
                   for pid, imgs in groups.items() for i, a in enumerate(imgs) for b in imgs[i + 1:]]
    return pairs_from_files(fb, comparisons)


def singles_from_imagerewarddb(files):
    """ImageRewardDB images labelled by their overall_rating within their prompt: above the mean rating of the prompt's
    images desirable, below it undesirable, equal to it (a prompt's only image, or all rated alike) skipped and
    counted. The card states no rating scale, so no absolute threshold is assumed; --pickapic_policy does not apply."""
    fb, groups, captions = imagerewarddb_groups(files)
    fb.source += " (labels from overall_rating within each prompt)"
    entries = []
    for pid, imgs in groups.items():
        rated = [(p, r) for p, _, r in imgs if isinstance(r, (int, float)) and not isinstance(r, bool)]
        fb.skip("image with an overall_rating that is not a number", len(imgs) - len(rated))
        mean = np.mean([r for _, r in rated]) if rated else 0
        fb.skip("image rated exactly its prompt's mean overall_rating", sum(r == mean for _, r in rated))
        entries += [(p, captions[pid], 1 if r > mean else -1) for p, r in rated if r != mean]
    return singles_from_entries(fb, entries)  # counts missing files, as for a local folder


# ------------------------------------------------------------------------------------------------
# Rapidata's text-to-image preference sets, e.g. Rapidata/HunyuanImage-2.1_t2i_human_preference (CDLA-Permissive-2.0;
# 44,848 rows, 45.1 GB). Read from that card's dataset_info (its prose on how votes are weighted was not read here):
#   prompt: string, image1: image, image2: image, model1: string, model2: string,
#   weighted_results_image1_preference: float32, weighted_results_image2_preference: float32,
#   detailed_results_preference: string, and the same three columns for _coherence and _alignment;
#   one split, train, in data/train-*.parquet (the datasets library stores an image as a struct {bytes, path}).
# The preferred image is the one with the larger weighted preference result; its share of the two results is
# fb.vote_share (only the ratio of the two weights is used, whatever their scale). Equal results are a tie.

RAPIDATA_REQUIRED = ["prompt", "image1", "image2", "weighted_results_image1_preference", "weighted_results_image2_preference"]


def rapidata_comparisons(path):
    """Rapidata rows as comparisons (caption, key_0, (file, row, 0), key_1, (file, row, 1), outcome), image1's (N,)
    share of the weighted preference, and a Feedback (parquet references) counting the rows skipped."""
    files = parquet_files(path)
    table, groups = read_pickapic(files, RAPIDATA_REQUIRED[:1] + RAPIDATA_REQUIRED[3:], required=RAPIDATA_REQUIRED,
                                  what="Rapidata preference")
    fb = Feedback(captions=[], parquet_files=files, row_groups=groups, image_columns=("image1", "image2"),
                  source=f"{path} (Rapidata preference)")
    comparisons, shares = [], []
    for (fi, r), caption, w1, w2 in zip(parquet_rows(files, groups), *table.to_pydict().values()):
        if not caption or not str(caption).strip():
            fb.skip("no caption"); continue
        share = share_of_votes([w1, w2])
        if share is None:
            fb.skip("no weighted preference result for both images"); continue
        refs = (fi, r, 0), (fi, r, 1)  # without image ids every image is its own
        comparisons.append((str(caption).strip(), refs[0], refs[0], refs[1], refs[1], 2 if w1 == w2 else 0 if w1 > w2 else 1))
        shares.append(share)
    return fb, comparisons, shares


def pairs_from_rapidata(path):
    """Rapidata pairs for Diffusion-DPO: the image with the larger weighted preference result wins; fb.vote_share is
    its share of the two results (0.5-1); equal results are ties, dropped and counted."""
    return pairs_from_parquet(*rapidata_comparisons(path))


def singles_from_rapidata(path, policy):
    """Rapidata pairs -> one labelled entry per image by label_images' policy (every image its own: no image ids)."""
    fb, comparisons, _ = rapidata_comparisons(path)
    return singles_from_parquet(fb, comparisons, policy)


