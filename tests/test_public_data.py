"""The readers of the 2026 public preference data (public_readers.py, through public_data.py) on tiny files written in each card's schema: HPDv3,
the Pick-a-Pic v2 mirror in its card's full 19 columns, ImageRewardDB's ranked and rated images, and a Rapidata
preference set. No models; a few seconds. (The one-step trainer runs on HPDv3: tests/test_train_dpo.py, _kto.py.)

    python -m pytest -q tests/test_public_data.py
"""
import datetime
import io
import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data
import public_data
from conftest import COLORS, jpeg, write_hpdv3


def names(fb, which):
    return [os.path.basename(fb.paths[i]) for i in which]


def is_red(image):
    return np.abs(np.asarray(image)[20, 20].astype(int) - np.array(COLORS["red"])).sum() < 60


# ------------------------------------------------------------------------------------------------
# HPDv3: train.json / test.json, images/ beside them (hub MizzenAI/HPDv3; schema from the HPSv3 README)

MISSING_REF = ("missing file outside images/ (a pair by reference, e.g. Pick-a-Pic or ImageRewardDB: its images "
               "are not in HPDv3's archive)")
BAD_VOTES = "unknown choice_dist (e.g. '[1]'; expected two vote counts >= 0, or null)"


def test_hpdv3_train_pairs_with_vote_shares(tmp_path):
    root = write_hpdv3(tmp_path / "HPDv3")
    for path in (root, os.path.join(root, "train.json")):  # the folder (train.json first) or the file itself
        fb = public_data.load_pairs(path)
        assert public_data.pairs_format(path) == "json"
        got = list(zip([fb.captions[c] for c in fb.caption_idx], names(fb, fb.winner), names(fb, fb.loser)))
        assert got == [("a red square", "r0.jpg", "g0.jpg"), ("a red square on blue", "r1.jpg", "b1.jpg"),
                       ("a red square, midjourney", "r2.jpg", "g2.jpg"), ("a red square again", "r3.jpg", "g3.jpg"),
                       ("r0 loses here", "r4.jpg", "r0.jpg")]  # path1 is the winner, always
        share = fb.vote_share
        assert share[[0, 1, 3, 4]].tolist() == pytest.approx([12 / 19, 0.9, 0.75, 0.4]) and math.isnan(share[2])
        assert fb.skipped == {MISSING_REF: 1, "entry with no caption": 1,
                              BAD_VOTES: 1}
        summary = fb.summary()
        assert "pairs with vote counts (choice_dist): 4" in summary and "votes went to path2 (kept" in summary
    assert all(is_red(im) for im in data.read_images(fb, sorted(set(fb.winner.tolist()))))  # decoded from images/
    fb.keep([True, False, True, True, True], "unreadable image")  # Feedback.keep filters the shares with the pairs
    assert len(fb.vote_share) == 4 and fb.vote_share[2] == pytest.approx(0.75)


def test_hpdv3_test_split_archive_layouts_and_missing_images(tmp_path):
    root = write_hpdv3(tmp_path)
    fb = public_data.load_pairs(os.path.join(root, "test.json"))
    assert [(names(fb, [w])[0], names(fb, [l])[0]) for w, l in zip(fb.winner, fb.loser)] == [("x0.jpg", "x1.jpg"), ("x2.jpg", "x1.jpg")]
    assert fb.vote_share is None  # test.json carries no vote counts: none, as for data that never has any
    os.remove(os.path.join(root, "train.json"))
    assert len(public_data.load_pairs(root)) == 2  # a folder with test.json only
    # the archive unpacked into images/ itself: images/images/x0.jpg; the reader finds the folder the paths start from
    os.rename(os.path.join(root, "images"), os.path.join(root, "unpacked"))
    os.makedirs(os.path.join(root, "images"))
    os.rename(os.path.join(root, "unpacked"), os.path.join(root, "images", "images"))
    assert len(public_data.load_pairs(root)) == 2
    os.rename(os.path.join(root, "images"), os.path.join(root, "elsewhere"))  # not unpacked at all: counted, then a clear stop
    fb = public_data.load_pairs(root)
    assert len(fb) == 0 and fb.skipped == {"missing file under images/ (unpack HPDv3's images.tar.gz.*)": 2}


def test_hpdv3_image_folder_found_past_pairs_by_reference_and_tied_votes_counted(tmp_path):
    """train.json may open with pairs whose images are in other datasets: the image folder is probed over the whole
    file, with HPDv3's own images/ paths only; a pair with tied votes is kept (path1 is the card's label) and noted."""
    import json
    root = write_hpdv3(tmp_path)
    with open(os.path.join(root, "train.json")) as f:
        train = json.load(f)
    train = [train[5]] * 300 + train  # 300 pairs by reference first
    train[300]["choice_dist"] = [6, 6]
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump(train, f)
    os.rename(os.path.join(root, "images"), os.path.join(root, "unpacked"))  # the archive unpacked into images/ itself
    os.makedirs(os.path.join(root, "images"))
    os.rename(os.path.join(root, "unpacked"), os.path.join(root, "images", "images"))
    fb = public_data.load_pairs(root)
    assert len(fb) == 5 and fb.skipped[MISSING_REF] == 301
    assert "pairs with tied votes (kept: path1 is the card's preferred image): 1" in fb.summary()


def test_hpdv3_labels_both_policies(tmp_path):
    root = write_hpdv3(tmp_path)
    label = lambda fb: {os.path.basename(fb.paths[i]): int(y) for i, y in zip(fb.image, fb.label)}
    fb = public_data.load_singles(root)
    assert {k for k, y in label(fb).items() if y == 1} == {"r0.jpg", "r1.jpg", "r2.jpg", "r3.jpg", "r4.jpg"}
    assert {k for k, y in label(fb).items() if y == -1} == {"g0.jpg", "b1.jpg", "g2.jpg", "g3.jpg"}
    assert fb.skipped == {"pair with a " + MISSING_REF: 1, "entry with no caption": 1,
                          BAD_VOTES: 1}
    fb = public_data.load_singles(os.path.join(root, "train.json"), pickapic_policy="always")
    assert "r0.jpg" not in label(fb) and fb.skipped["image preferred in some of its pairs only (policy always)"] == 1


def test_hpdv3_referenced_pairs_are_read_when_their_images_are_there(tmp_path):
    root = write_hpdv3(tmp_path)
    os.makedirs(os.path.join(root, "pickapic"))
    for name, color in (("u1", "red"), ("u2", "blue")):
        with open(os.path.join(root, "pickapic", name + ".jpg"), "wb") as f:
            f.write(jpeg(COLORS[color]))
    fb = public_data.load_pairs(root)
    assert len(fb) == 6 and MISSING_REF not in fb.skipped and names(fb, fb.winner[-1:]) == ["u1.jpg"]


def test_hpdv3_bad_files(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(SystemExit, match=r"empty.json holds no entries \(an empty list\)"):
        public_data.load_pairs(str(tmp_path / "empty.json"))
    (tmp_path / "other.json").write_text('[{"caption": "x"}]')
    with pytest.raises(SystemExit, match="other.json is not an annotation file of HPDv2, HPDv3 or ImageRewardDB"):
        public_data.load_pairs(str(tmp_path / "other.json"))
    (tmp_path / "cut.json").write_text('[{"prompt": "x", "path1": "images/a.jpg"')
    with pytest.raises(SystemExit, match="cannot read the annotations .*cut.json"):
        public_data.load_singles(str(tmp_path / "cut.json"))
    (tmp_path / "one.json").write_text(json.dumps([{"prompt": "x", "path1": "images/a.jpg", "path2": "images/b.jpg"}]))
    with pytest.raises(SystemExit, match=r"no usable image in .*one.json: .*missing file under images/"):
        public_data.load_singles(str(tmp_path / "one.json"))


# ------------------------------------------------------------------------------------------------
# Pick-a-Pic v2 mirror liuhuohuo2/pick-a-pic-v2: the card's dataset_info, all 19 features with their types

MIRROR_SCHEMA = pa.schema([  # the order and dtypes of the card's dataset_info
    ("are_different", pa.bool_()), ("best_image_uid", pa.string()), ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")), ("has_label", pa.bool_()), ("image_0_uid", pa.string()),
    ("image_0_url", pa.string()), ("image_1_uid", pa.string()), ("image_1_url", pa.string()),
    ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()), ("label_1", pa.float64()),
    ("model_0", pa.string()), ("model_1", pa.string()), ("ranking_id", pa.int64()), ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64()), ("__index_level_0__", pa.int64())])


def write_mirror_file(path, labels, start=0):
    """A parquet file in the mirror card's full schema; row i shows a red image on the side its labels prefer."""
    rows = {f.name: [] for f in MIRROR_SCHEMA}
    for i, (l0, l1) in enumerate(labels, start):
        red0 = l0 >= l1
        values = dict(are_different=True, best_image_uid=f"u{i}{'a' if red0 else 'b'}", caption=f"a red square {i}",
                      created_at=datetime.datetime(2023, 5, 1, 12, i % 60), has_label=True, image_0_uid=f"u{i}a",
                      image_0_url=f"https://example.invalid/u{i}a.png", image_1_uid=f"u{i}b",
                      image_1_url=f"https://example.invalid/u{i}b.png", jpg_0=jpeg(COLORS["red" if red0 else "blue"], seed=i),
                      jpg_1=jpeg(COLORS["blue" if red0 else "red"], seed=100 + i), label_0=l0, label_1=l1, model_0="sdxl",
                      model_1="sd-2.1", ranking_id=i, user_id=7, num_example_per_prompt=1, __index_level_0__=i)
        for k, v in values.items():
            rows[k].append(v)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(rows, schema=MIRROR_SCHEMA), path)


def test_pickapic_mirror_by_hub_id_in_its_cards_full_schema(tmp_path, monkeypatch):
    import huggingface_hub
    snapshot = tmp_path / "snapshot"
    write_mirror_file(str(snapshot / "data" / "train-00000-of-00002-aa.parquet"), [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
    write_mirror_file(str(snapshot / "data" / "train-00001-of-00002-bb.parquet"), [(0.0, 1.0), (1.0, 0.0)], start=3)
    write_mirror_file(str(snapshot / "data" / "validation-00000-of-00001-cc.parquet"), [(1.0, 0.0)], start=10)
    asked = []

    def fake_download(repo_id, repo_type, allow_patterns):
        asked.append((repo_id, repo_type, tuple(allow_patterns)))
        return str(snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert pq.read_schema(snapshot / "data" / "train-00000-of-00002-aa.parquet").equals(MIRROR_SCHEMA)
    assert len(MIRROR_SCHEMA) == 19

    fb = public_data.load_pairs("liuhuohuo2/pick-a-pic-v2")
    assert asked[0][:2] == ("liuhuohuo2/pick-a-pic-v2", "dataset") and "*/train-*.parquet" in asked[0][2]
    assert len(fb) == 4 and fb.skipped == {"tie": 1} and fb.vote_share is None  # binary labels: no vote counts
    assert all(is_red(im) for im in data.read_images(fb, sorted(fb.winner.tolist())))
    assert [fb.captions[c] for c in fb.caption_idx] == ["a red square 0", "a red square 1", "a red square 3", "a red square 4"]
    assert len(public_data.load_pairs("liuhuohuo2/pick-a-pic-v2:validation")) == 1
    fb = public_data.load_singles("liuhuohuo2/pick-a-pic-v2")
    assert fb.label_counts().startswith("4 desirable, 6 undesirable")  # the tie's two images: never preferred

    # the same files as a local copy: a folder, one file, a glob
    assert len(public_data.load_pairs(str(snapshot / "data" / "train-00000-of-00002-aa.parquet"))) == 2
    assert len(public_data.load_pairs(str(snapshot / "data" / "train-*.parquet"))) == 4


# ------------------------------------------------------------------------------------------------
# ImageRewardDB: images/{split}/{split}_{n}/ with {split}_{n}.json beside the images (card: Data Instances)

def irdb_record(split, part, name, pid, prompt, rank, overall, total=3):
    return {"image_path": f"images/{split}/{split}_{part}/{name}.webp", "prompt_id": pid, "prompt": prompt,
            "classification": "People", "image_amount_in_total": total, "rank": rank, "overall_rating": overall,
            "image_text_alignment_rating": 3, "fidelity_rating": 4}


def write_imagerewarddb(root):
    """A tiny ImageRewardDB as its zips unpack: train_1 (prompt A: a1 rank 1, a2 and a3 tied at rank 2; prompt C: one
    image), train_2 (prompt B: b2 rank 1, b1 rank 2, b3 rank 3 whose file is missing; an entry with a rank that is
    no number; one without a prompt), test_1 (one prompt, two images); metadata-train.parquet at the top, as on the hub."""
    parts = {("train", 1): [("a1", "A", "a red fox ", 1, 6, "red"), ("a2", "A", "a red fox ", 2, 4, "green"),
                            ("a3", "A", "a red fox ", 2, 5, "blue"), ("c1", "C", "a lone cat", 1, 5, "red")],
             ("train", 2): [("b1", "B", "a red barn", 2, 3, "green"), ("b2", "B", "a red barn", 1, 7, "red"),
                            ("b3", "B", "a red barn", 3, 1, None), ("b4", "B", "a red barn", "first", 2, "blue"),
                            ("b5", "B", "", 4, 2, "blue")],
             ("test", 1): [("t1", "T", "a test", 1, 6, "red"), ("t2", "T", "a test", 2, 2, "blue")]}
    for (split, n), rows in parts.items():
        folder = os.path.join(root, "images", split, f"{split}_{n}")
        os.makedirs(folder)
        for name, _, _, _, _, color in rows:
            if color:
                Image.open(io.BytesIO(jpeg(COLORS[color]))).save(os.path.join(folder, name + ".webp"), lossless=True)
        with open(os.path.join(folder, f"{split}_{n}.json"), "w") as f:
            json.dump([irdb_record(split, n, name, f"00000{pid}-0001", prompt, rank, overall)
                       for name, pid, prompt, rank, overall, _ in rows], f)
    pq.write_table(pa.table({"image_path": ["images/train/train_1/a1.webp"]}), os.path.join(root, "metadata-train.parquet"))
    return str(root)


def test_imagerewarddb_pairs_from_rankings(tmp_path):
    root = write_imagerewarddb(tmp_path / "ImageRewardDB")
    assert public_data.pairs_format(root) == "imagerewarddb"  # not read as Pick-a-Pic for its metadata parquet
    fb = public_data.load_pairs(root)  # the train split: images/train/*/
    got = sorted(zip([fb.captions[c] for c in fb.caption_idx], names(fb, fb.winner), names(fb, fb.loser)))
    assert got == [("a red barn", "b2.webp", "b1.webp"), ("a red fox", "a1.webp", "a2.webp"), ("a red fox", "a1.webp", "a3.webp")]
    assert fb.skipped == {"tie": 1, "missing file": 2, "image entry with no caption": 1,
                          "unknown rank (e.g. 'first'; expected a number, lower is better)": 1}
    assert fb.vote_share is None  # expert rankings: no vote counts
    assert all(is_red(im) for im in data.read_images(fb, sorted(set(fb.winner.tolist()))))
    assert len(public_data.load_pairs(os.path.join(root, "images", "test"))) == 1  # another split: its folder
    assert len(public_data.load_pairs(os.path.join(root, "images", "train", "train_2", "train_2.json"))) == 1  # one file
    with pytest.raises(SystemExit, match=r"holds ImageRewardDB's splits \['test', 'train'\]: pass one split's folder"):
        public_data.load_pairs(os.path.join(root, "images"))  # never the test split mixed into training
    with open(os.path.join(root, "images", "test", "test_1", "test_1.json")) as f:
        entries = json.load(f)
    with open(os.path.join(root, "images", "test", "test_1", "test_1.json"), "w") as f:
        json.dump(entries + [None], f)
    fb = public_data.load_pairs(os.path.join(root, "images", "test"))
    assert len(fb) == 1 and fb.skipped == {"image entry that is not an object": 1}


def test_imagerewarddb_labels_from_ratings(tmp_path):
    root = write_imagerewarddb(tmp_path)
    fb = public_data.load_singles(root)
    label = {os.path.basename(fb.paths[i]): int(y) for i, y in zip(fb.image, fb.label)}
    # prompt A: mean 5 -> a1 (6) liked, a2 (4) disliked, a3 (5) neither; B: mean 11/3 -> b2 liked, b1 disliked; C alone
    assert label == {"a1.webp": 1, "a2.webp": -1, "b1.webp": -1, "b2.webp": 1}
    assert fb.skipped == {"image rated exactly its prompt's mean overall_rating": 2, "missing file": 1,
                          "image entry with no caption": 1, "unknown rank (e.g. 'first'; expected a number, lower is better)": 1}
    assert "labels from overall_rating" in fb.summary("images")


def test_imagerewarddb_not_unzipped(tmp_path):
    os.makedirs(tmp_path / "images" / "train")
    (tmp_path / "images" / "train" / "train_1.zip").write_bytes(b"PK")
    for load in (public_data.load_pairs, public_data.load_singles):
        with pytest.raises(SystemExit, match="holds ImageRewardDB's zip files but no unpacked folders: unzip each"):
            load(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Rapidata preference sets (e.g. Rapidata/HunyuanImage-2.1_t2i_human_preference): the card's 13 columns

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how an image feature is stored in parquet
RAPIDATA_SCHEMA = pa.schema([("prompt", pa.string()), ("image1", IMAGE), ("image2", IMAGE), ("model1", pa.string()),
                             ("model2", pa.string())] + [
    (f"{kind}_{aspect}", pa.float32() if kind.startswith("weighted") else pa.string())
    for aspect in ("preference", "coherence", "alignment")
    for kind in ("weighted_results_image1", "weighted_results_image2", "detailed_results")])


def write_rapidata(path, rows):
    """Rapidata rows (prompt, weighted preference of image1, of image2); the image with the larger weight is red."""
    cols = {f.name: [] for f in RAPIDATA_SCHEMA}
    for i, (prompt, w1, w2) in enumerate(rows):
        red1 = w1 is not None and w2 is not None and w1 >= w2
        values = {"prompt": prompt, "image1": {"bytes": jpeg(COLORS["red" if red1 else "blue"], seed=i), "path": None},
                  "image2": {"bytes": jpeg(COLORS["blue" if red1 else "red"], seed=50 + i), "path": None},
                  "model1": "hunyuan-2.1", "model2": "flux-1.1-pro"}
        for aspect, (a, b) in (("preference", (w1, w2)), ("coherence", (0.5, 0.5)), ("alignment", (0.6, 0.4))):
            values |= {f"weighted_results_image1_{aspect}": a, f"weighted_results_image2_{aspect}": b,
                       f"detailed_results_{aspect}": json.dumps([{"votedFor": "image1", "userScore": 0.8}])}
        for k, v in values.items():
            cols[k].append(v)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(cols, schema=RAPIDATA_SCHEMA), path, row_group_size=2)


RAPIDATA_ROWS = [("p1", 0.7, 0.3), ("p2", 0.2, 0.6), ("p3", 0.5, 0.5), ("p4", None, 0.9), ("", 0.8, 0.1),
                 ("p6", float("nan"), 0.4), ("p7", 3.0, 1.0)]


def test_rapidata_pairs_with_vote_shares(tmp_path):
    write_rapidata(str(tmp_path / "data" / "train-00000-of-00001.parquet"), RAPIDATA_ROWS)
    assert public_data.pairs_format(str(tmp_path)) == "rapidata"
    fb = public_data.load_pairs(str(tmp_path))
    assert [fb.captions[c] for c in fb.caption_idx] == ["p1", "p2", "p7"]
    assert fb.vote_share.tolist() == pytest.approx([0.7, 0.75, 0.75])  # the winner's share of the two weights
    assert fb.skipped == {"tie": 1, "no caption": 1, "no weighted preference result for both images": 2}
    assert all(is_red(im) for im in data.read_images(fb, sorted(fb.winner.tolist())))  # image1/image2 structs decoded
    assert fb.describe_image(int(fb.winner[1])).endswith("row 1 image2")


def test_rapidata_labels_and_schema_errors(tmp_path):
    write_rapidata(str(tmp_path / "r.parquet"), RAPIDATA_ROWS)
    fb = public_data.load_singles(str(tmp_path / "r.parquet"))
    images = data.read_images(fb, list(range(fb.num_images)))
    assert sorted((int(y), is_red(images[i])) for i, y in zip(fb.image, fb.label)) == \
        [(-1, False)] * 4 + [(-1, True)] + [(1, True)] * 3  # p3's tied images (one red) are never preferred
    pq.write_table(pa.table({"prompt": ["x"], "image1": [{"bytes": b"", "path": None}], "image2": [{"bytes": b"", "path": None}],
                             "weighted_results_image1_preference": [0.5]}), tmp_path / "bad.parquet")
    with pytest.raises(SystemExit, match="lacks the Pick-a-Pic column"):  # not Rapidata's columns, not Pick-a-Pic's
        public_data.load_pairs(str(tmp_path / "bad.parquet"))
    write_rapidata(str(tmp_path / "more" / "a.parquet"), RAPIDATA_ROWS[:1])
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "more" / "b.parquet")
    with pytest.raises(SystemExit, match="b.parquet lacks the Rapidata preference column"):
        public_data.load_pairs(str(tmp_path / "more"))
