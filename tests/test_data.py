"""The feedback loaders of data.py and public_data.py on tiny datasets built in each test: every single-image (KTO) layout,
and the pair (DPO) loaders. No models; a few seconds.

    python -m pytest -q tests/test_data.py
"""
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

import data
import public_data
from conftest import COLORS, write_hpdv2, write_pickapic

A1111 = ("a cozy cabin in the snow,\nwarm light, 35mm\nNegative prompt: blurry, lowres\n"
         "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: v1-5")


def save(path, color=(200, 30, 30), fmt=None, **kw):
    """A small solid-color image at path (folders created); kw go to PIL's save (pnginfo, exif)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path, format=fmt, **kw)
    return path


def png_text(**chunks):
    info = PngImagePlugin.PngInfo()
    for k, v in chunks.items():
        info.add_text(k, v)
    return info


def by_name(fb):
    """{file name: (caption, label)} of a folder-based Feedback."""
    return {fb.paths[i].replace("\\", "/").split("/")[-1]: (fb.captions[c], int(y))
            for i, c, y in zip(fb.image, fb.caption_idx, fb.label)}


# ------------------------------------------------------------------------------------------------
# liked/ and disliked/ folders, captions from .txt files and from the images themselves

def test_class_folders_with_txt_and_embedded_prompts(tmp_path):
    root = tmp_path / "gens"
    save(root / "liked" / "a1111.png", pnginfo=png_text(parameters=A1111))
    save(root / "liked" / "steps_only.png", pnginfo=png_text(parameters="a red fox\nSteps: 30, Sampler: DPM++ 2M"))
    graph = {"3": {"class_type": "KSampler", "inputs": {"positive": ["6", 0], "negative": ["7", 0]}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a comfy castle", "clip": ["4", 1]}},
             "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly", "clip": ["4", 1]}}}
    save(root / "liked" / "comfy.png", pnginfo=png_text(prompt=json.dumps(graph)))
    save(root / "liked" / "2024" / "best" / "DEEP.JPG", fmt="JPEG")
    (root / "liked" / "2024" / "best" / "DEEP.txt").write_text("  a deep photo \n")
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + "a jpeg from a1111\nNegative prompt: bad\nSteps: 20".encode("utf-16-be")
    save(root / "disliked" / "exif.jpeg", fmt="JPEG", exif=exif)
    save(root / "disliked" / "sub" / "w.WEBP", fmt="WEBP")
    (root / "disliked" / "sub" / "w.txt").write_text("a webp")
    save(root / "disliked" / "nocaption.png")  # no .txt, no text chunk
    save(root / "disliked" / "._nocaption.png")  # a macOS companion file: ignored, not counted
    save(root / "disliked" / ".ipynb_checkpoints" / "copy.png")
    (root / "disliked" / "notes.txt").write_text("not an image")
    save(root / "loose.png")  # outside both class folders
    (root / "disliked" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt, no caption file

    fb = public_data.load_singles(str(root))
    assert by_name(fb) == {
        "a1111.png": ("a cozy cabin in the snow,\nwarm light, 35mm", 1),
        "steps_only.png": ("a red fox", 1),
        "comfy.png": ("a comfy castle", 1),
        "DEEP.JPG": ("a deep photo", 1),
        "exif.jpeg": ("a jpeg from a1111", -1),
        "w.WEBP": ("a webp", -1),
    }
    assert fb.skipped == {"no caption": 1, "unreadable image": 1, "image outside liked/ and disliked/ (no label)": 1}
    assert fb.num_images == len(fb) == 6
    summary = fb.summary("images")
    assert "4 desirable, 2 undesirable" in summary and "no caption: 1" in summary
    assert all(data.decode(p) is not None for p in fb.paths)  # the references open as images


def test_class_folders_any_letter_case_and_one_class(tmp_path):
    save(tmp_path / "LIKED" / "a.PNG", pnginfo=png_text(parameters="only likes\nSteps: 1"))
    fb = public_data.load_singles(str(tmp_path))
    assert by_name(fb) == {"a.PNG": ("only likes", 1)} and fb.label_counts() == "1 desirable, 0 undesirable"


def test_fooocus_prompt_from_its_json_scheme_and_its_a1111_scheme(tmp_path):
    """Fooocus writes `parameters` as JSON (scheme fooocus, the typed prompt under "prompt") or as A1111 text;
    in a JPEG or WebP the same string goes into EXIF UserComment of IFD0 (modules/meta_parser.py get_exif)."""
    meta = {"prompt": "a fox in the rain", "full_prompt": ["a fox in the rain", "cinematic, moody"],
            "negative_prompt": "", "steps": 30, "performance": "Speed", "version": "Fooocus v2.5.5"}
    save(tmp_path / "liked" / "json.png", pnginfo=png_text(parameters=json.dumps(meta), fooocus_scheme="fooocus"))
    save(tmp_path / "liked" / "a1111.png", pnginfo=png_text(parameters="a fox, cinematic\nSteps: 30", fooocus_scheme="a1111"))
    exif = Image.Exif()
    exif[0x9286], exif[0x927C] = json.dumps(dict(meta, prompt="a jpeg fox")), "fooocus"
    save(tmp_path / "disliked" / "fooocus.jpg", fmt="JPEG", exif=exif)
    save(tmp_path / "disliked" / "empty.png", pnginfo=png_text(parameters=json.dumps(dict(meta, prompt=" "))))
    fb = public_data.load_singles(str(tmp_path))
    assert by_name(fb) == {"json.png": ("a fox in the rain", 1), "a1111.png": ("a fox, cinematic", 1),
                           "fooocus.jpg": ("a jpeg fox", -1)}
    assert fb.skipped == {"no caption": 1}


# ------------------------------------------------------------------------------------------------
# metadata.jsonl / metadata.csv keyed by file_name

def test_metadata_jsonl_label_spellings_and_caption_columns(tmp_path):
    rows = [("a.png", {"text": "t1"}, True), ("b.png", {"caption": "t2"}, False), ("c.png", {"prompt": "t3"}, 1),
            ("d.png", {"text": "t4"}, 0), ("e.png", {"text": "t5"}, "Liked"), ("f.png", {"text": "t6"}, "DISLIKED"),
            ("g.png", {"text": "t7"}, "desirable"), ("h.png", {"text": "t8"}, "Undesirable"), ("i.png", {"text": "t9"}, -1),
            ("j.png", {"text": "t10"}, "+1"), ("k.png", {"text": "t11"}, 1.0),
            ("sub/l.png", {}, "liked"),  # no caption column: falls back to the .txt beside it
            ("m.png", {"text": "t13"}, "maybe"), ("n.png", {"text": "t14"}, 2),  # unknown labels
            ("missing.png", {"text": "t15"}, "liked"), ("o.png", {"text": "  "}, "liked")]  # no caption anywhere
    with open(tmp_path / "metadata.jsonl", "w") as f:
        for name, cap, label in rows:
            if name != "missing.png":
                save(tmp_path / name)
            f.write(json.dumps({"file_name": name, **cap, "label": label}) + "\n")
        f.write("\n")  # blank lines are fine
    (tmp_path / "sub" / "l.txt").write_text("t12")
    (tmp_path / "liked").mkdir()  # metadata wins over class folders

    fb = public_data.load_singles(str(tmp_path))
    want = {"a.png": 1, "b.png": -1, "c.png": 1, "d.png": -1, "e.png": 1, "f.png": -1, "g.png": 1, "h.png": -1,
            "i.png": -1, "j.png": 1, "k.png": 1, "l.png": 1}
    got = by_name(fb)
    assert {k: v[1] for k, v in got.items()} == want
    assert [got[k][0] for k in sorted(want)] == [f"t{i}" for i in range(1, 13)]
    unknown = [k for k in fb.skipped if k.startswith("unknown label value")]
    assert len(unknown) == 1 and "'maybe'" in unknown[0] and "2" in unknown[0] and fb.skipped[unknown[0]] == 2
    assert fb.skipped["missing file"] == 1 and fb.skipped["no caption"] == 1
    assert "6 desirable" not in fb.summary("images") and "7 desirable, 5 undesirable" in fb.summary("images")
    assert unknown[0] in fb.summary("images")  # the trainer's printed summary names the bad values


def test_metadata_csv_and_explicit_file(tmp_path):
    for name in ("x.jpg", "y.jpg", "z.jpg", "w.jpg"):
        save(tmp_path / "imgs" / name, fmt="JPEG")
    (tmp_path / "metadata.csv").write_text(
        "\ufefffile_name,text,label\nimgs/x.jpg,a cat,TRUE\nimgs/y.jpg,\"a dog, sitting\",no\n"
        "imgs/z.jpg,a cow,liked\nimgs/w.jpg,a hen,??\n", encoding="utf-8")
    for path in (tmp_path, tmp_path / "metadata.csv"):
        fb = public_data.load_singles(str(path))
        assert by_name(fb) == {"x.jpg": ("a cat", 1), "y.jpg": ("a dog, sitting", -1), "z.jpg": ("a cow", 1)}
        assert sum(v for k, v in fb.skipped.items() if "'??'" in k) == 1
    (tmp_path / "labels.jsonl").write_text(json.dumps({"file_name": "imgs/x.jpg", "prompt": "p", "label": "disliked"}) + "\n")
    assert by_name(public_data.load_singles(str(tmp_path / "labels.jsonl"))) == {"x.jpg": ("p", -1)}


def test_metadata_errors(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "t"}) + "\n")
    with pytest.raises(SystemExit, match="no label column"):
        public_data.load_singles(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"metadata.jsonl:1: expected a JSON object"):
        public_data.load_singles(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "t", "label": "meh"}) + "\n")
    with pytest.raises(SystemExit, match=r"no usable image .*unknown label value \(e.g. 'meh'"):
        public_data.load_singles(str(tmp_path))


def test_clear_errors_for_missing_or_empty_data(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="data not found"):
        public_data.load_singles(str(tmp_path / "nope"))
    monkeypatch.chdir(tmp_path)
    for relative in ["my_likes/", "./my_likes", "likes/2024/", "x.parquet"]:  # folder-like: not a hub dataset id
        with pytest.raises(SystemExit, match="data not found"):
            public_data.load_singles(relative)
    save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match="no liked/ or disliked/ subfolder, no metadata"):
        public_data.load_singles(str(tmp_path))
    save(tmp_path / "liked" / "b.png")  # no caption anywhere
    with pytest.raises(SystemExit, match="no usable image .*no caption: 1"):
        public_data.load_singles(str(tmp_path))
    with pytest.raises(SystemExit, match="unknown Pick-a-Pic policy"):
        public_data.load_singles(str(tmp_path), pickapic_policy="sometimes")


# ------------------------------------------------------------------------------------------------
# Pick-a-Pic pairs -> per-image labels

def pickapic_pairs(path, pairs):
    """A Pick-a-Pic-schema parquet from (caption, uid_0, uid_1, label_0, label_1). Each uid's JPEG has its own
    width, so the test can tell which image a reference points to after reading it back."""
    width = {}
    def img(uid):
        buf = io.BytesIO()
        Image.new("RGB", (width.setdefault(uid, 8 + len(width)), 8), (90, 90, 90)).save(buf, format="JPEG")
        return buf.getvalue()
    cols = {k: [] for k in ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid"]}
    for cap, u0, u1, l0, l1 in pairs:
        for k, v in zip(cols, (cap, img(u0), img(u1), l0, l1, u0, u1)):
            cols[k].append(v)
    pq.write_table(pa.table(cols), path, row_group_size=3)  # several row groups: read_images must find rows
    return {w: u for u, w in width.items()}


PAIRS = [("cap1", "A", "B", 1.0, 0.0),  # A preferred
         ("cap2", "C", "A", 1.0, 0.0),  # A loses here: preferred at least once, but not always
         ("cap3", "B", "D", 0.5, 0.5),  # tie: prefers neither
         ("cap4", "E", "F", 0.5, 0.5),  # E and F only ever tied
         ("cap5", "B", "G", 0.0, 1.0),  # G preferred
         ("", "X", "Y", 1.0, 0.0),  # no caption
         ("cap7", "H", "A", 1.0, 0.0),  # H preferred; A's third pair
         ("cap8", "I", "J", 0.7, 0.3),  # not a Pick-a-Pic label
         ("cap9", "K", "L", 0.5, 0.5), ("cap9", "K", "M", 1.0, 0.0)]  # K tied once and preferred once


def pickapic_labels(fb, uid_of_width):
    """{uid: (caption, label)}, each image's uid recognised by the width of the image read back through read_images."""
    images = data.read_images(fb, list(range(fb.num_images)))
    return {uid_of_width[images[i].width]: (fb.captions[c], int(y)) for i, c, y in zip(fb.image, fb.caption_idx, fb.label)}


def test_pickapic_at_least_once(tmp_path):
    uids = pickapic_pairs(str(tmp_path / "p.parquet"), PAIRS)
    fb = public_data.load_singles(str(tmp_path / "p.parquet"))
    assert fb.num_images == len(fb) == 11  # A and B appear three times, K twice: de-duplicated by uid
    assert pickapic_labels(fb, uids) == {
        "A": ("cap1", 1), "B": ("cap1", -1), "C": ("cap2", 1), "D": ("cap3", -1), "E": ("cap4", -1), "F": ("cap4", -1),
        "G": ("cap5", 1), "H": ("cap7", 1), "K": ("cap9", 1), "L": ("cap9", -1), "M": ("cap9", -1)}
    assert fb.skipped == {"pair with no caption": 1, "pair with labels neither 1/0, 0/1 nor 0.5/0.5": 1}
    assert fb.notes == {"images only ever tied, labelled undesirable": 4}  # D, E, F, L
    assert "5 desirable, 6 undesirable" in fb.summary("images") and "only ever tied" in fb.summary("images")


def test_pickapic_always(tmp_path):
    uids = pickapic_pairs(str(tmp_path / "p.parquet"), PAIRS)
    fb = public_data.load_singles(str(tmp_path), pickapic_policy="always")  # a folder of parquet files
    labels = pickapic_labels(fb, uids)
    assert {u for u, (_, y) in labels.items() if y == 1} == {"C", "G", "H"}
    assert "A" not in labels and "K" not in labels  # preferred in some pairs only
    assert {u for u, (_, y) in labels.items() if y == -1} == {"B", "D", "E", "F", "L", "M"}
    assert fb.skipped["image preferred in some of its pairs only (policy always)"] == 2


def test_pickapic_without_uid_columns_keeps_every_image(tmp_path):
    write_pickapic(str(tmp_path / "p.parquet"), n=4, ties=1)
    table = pq.read_table(tmp_path / "p.parquet").drop(["image_0_uid", "image_1_uid"])
    pq.write_table(table, tmp_path / "p.parquet")
    fb = public_data.load_singles(str(tmp_path / "p.parquet"))
    assert len(fb) == 10 and fb.label_counts().startswith("4 desirable, 6 undesirable")
    assert fb.notes["images only ever tied, labelled undesirable"] == 2


# ------------------------------------------------------------------------------------------------
# the Diffusion-KTO authors' per-image CSV

def write_kto_csv(root):
    rows = [("train/w1.jpg", "a win", "exclusive_win"), ("train/l1.jpg", "a loss", "exclusive_lose"),
            ("train/i1.jpg", "both", "intersections"), ("train/u1.jpg", "odd", "tie_only"),
            ("train/gone.jpg", "missing", "exclusive_win"), ("train/e1.jpg", "", "exclusive_lose")]
    lines = [",file_name,caption,split"]  # pandas writes its index as a first, unnamed column
    for n, (f, c, s) in enumerate(rows):
        if "gone" not in f:
            save(root / f, fmt="JPEG")
        lines.append(f"{n},{f},{c},{s}")
    (root / "train_processed_v3.csv").write_text("\n".join(lines) + "\n")


def test_kto_authors_csv(tmp_path):
    write_kto_csv(tmp_path)
    for path in (tmp_path / "train_processed_v3.csv", tmp_path):  # the CSV, or the folder that holds it
        fb = public_data.load_singles(str(path))
        assert by_name(fb) == {"w1.jpg": ("a win", 1), "l1.jpg": ("a loss", -1), "i1.jpg": ("both", 1)}
        assert fb.skipped["missing file"] == 1 and fb.skipped["no caption"] == 1
        assert sum(v for k, v in fb.skipped.items() if k.startswith("unknown split (e.g. 'tie_only'")) == 1
    fb = public_data.load_singles(str(tmp_path), pickapic_policy="always")
    assert by_name(fb) == {"w1.jpg": ("a win", 1), "l1.jpg": ("a loss", -1)}
    assert fb.skipped["intersections (policy always)"] == 1


def test_kto_csv_with_image_root(tmp_path):
    write_kto_csv(tmp_path / "data")
    (tmp_path / "labels").mkdir()
    (tmp_path / "data" / "train_processed_v3.csv").rename(tmp_path / "labels" / "kto.csv")
    fb = public_data.load_singles(str(tmp_path / "labels" / "kto.csv"), image_root=str(tmp_path / "data"))
    assert len(fb) == 3 and all(p.startswith(str(tmp_path / "data")) for p in fb.paths)


# ------------------------------------------------------------------------------------------------
# the pair loaders (Diffusion-DPO)

def test_load_pairs_parquet_drops_ties(tmp_path):
    path = write_pickapic(str(tmp_path / "p.parquet"), n=6, ties=2)
    fb = public_data.load_pairs(path)
    assert len(fb) == 6 and fb.skipped == {"tie": 2}
    winners = data.read_images(fb, sorted(int(i) for i in fb.winner))
    red = np.array(COLORS["red"])
    assert all(np.abs(np.asarray(im)[20, 20] - red).sum() < 60 for im in winners)  # the red image wins every pair
    assert [fb.captions[c] for c in fb.caption_idx] == [f"a {['green', 'blue'][i % 2]} square" for i in range(6)]


def test_load_pairs_jsonl(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        save(tmp_path / name)
    lines = [{"caption": "x", "chosen": "a.png", "rejected": "b.png"}, {"caption": "y", "chosen": "c.png", "rejected": "a.png"},
             {"caption": "", "chosen": "a.png", "rejected": "c.png"}, {"caption": "z", "chosen": "b.png", "rejected": "b.png"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    fb = public_data.load_pairs(str(tmp_path / "pairs.jsonl"))
    name = lambda i: fb.paths[i].split("/")[-1]
    assert [(fb.captions[c], name(w), name(l)) for c, w, l in zip(fb.caption_idx, fb.winner, fb.loser)] == \
        [("x", "a.png", "b.png"), ("y", "c.png", "a.png")]
    assert fb.skipped == {"no caption": 1, "tie (same image twice)": 1}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"caption": "x", "chosen": "a.png"}) + "\n")
    with pytest.raises(SystemExit, match="bad.jsonl:1: expected a JSON object with caption, chosen, rejected"):
        public_data.load_pairs(str(tmp_path / "bad.jsonl"))


def test_summary_counts_only_what_the_kept_rows_use():
    fb = data.Feedback(captions=["a", "b", "c"], paths=[f"{i}.png" for i in range(6)], source="test",
                       caption_idx=np.array([0, 1, 2]), winner=np.array([0, 2, 4]), loser=np.array([1, 3, 5]))
    assert fb.summary().startswith("3 pairs over 3 captions and 6 images")
    fb.keep([True, True, False], "unreadable image")  # the only pair of caption "c", images 4 and 5
    assert fb.summary().startswith("2 pairs over 2 captions and 4 images from test; skipped unreadable image: 1")


def test_hub_id_takes_one_split(tmp_path, monkeypatch):
    """A hub dataset id reads its train split (or ID:SPLIT), even where the local snapshot holds others too."""
    import huggingface_hub
    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    names = ["train-00000-of-00002-ab.parquet", "train-00001-of-00002-cd.parquet", "test-00000-of-00001-ef.parquet",
             "test_unique-00000-of-00001-gh.parquet", "validation-00000-of-00001-ij.parquet"]
    for n in names:
        (snapshot / "data" / n).write_bytes(b"")
    asked = []

    def fake_download(repo_id, repo_type, allow_patterns):
        asked.append((repo_id, repo_type, allow_patterns))
        return str(snapshot)  # as if every split were in the local cache already

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    files = [os.path.basename(f) for f in public_data.parquet_files("someone/pickapic_v2")]
    assert files == names[:2] and asked[0][:2] == ("someone/pickapic_v2", "dataset")
    assert "*/train-*.parquet" in asked[0][2]  # only the split's files are downloaded
    assert [os.path.basename(f) for f in public_data.parquet_files("someone/pickapic_v2:test")] == [names[2]]
    with pytest.raises(SystemExit, match="no .parquet files of split 'valid'"):
        public_data.parquet_files("someone/pickapic_v2:valid")

    def offline(**kwargs):
        raise OSError("we are offline\nmore")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: offline())
    with pytest.raises(SystemExit, match="could not be downloaded from the hub .*we are offline"):
        public_data.parquet_files("someone/pickapic_v2")


# ------------------------------------------------------------------------------------------------
# HPDv2: train.json / test.json with their image folders, written in the schema of the dataset card

def names(fb, which):
    return [os.path.basename(fb.paths[i]) for i in which]


def test_hpdv2_train_pairs(tmp_path):
    root = write_hpdv2(tmp_path / "HPDv2")
    for path in (root, os.path.join(root, "train.json")):  # the folder (train.json first) or the file itself
        fb = public_data.load_pairs(path)
        got = sorted(zip([fb.captions[c] for c in fb.caption_idx], names(fb, fb.winner), names(fb, fb.loser)))
        assert got == [("a blue square", "r1.jpg", "b1.jpg"), ("a red square", "r0.jpg", "g0.jpg"),
                       ("a red square again", "r3.jpg", "g3.jpg"), ("r0 loses here", "r4.jpg", "r0.jpg"),
                       ("three squares", "r2.jpg", "b2.jpg"), ("three squares", "r2.jpg", "g2.jpg")]
        assert fb.skipped == {"tie": 1, "missing file": 1, "entry with no caption": 1,
                              "entry without two or more images and as many labels": 1}
    images = data.read_images(fb, sorted(set(fb.winner.tolist())))
    red = np.array(COLORS["red"])
    assert all(np.abs(np.asarray(im)[20, 20] - red).sum() < 60 for im in images)  # decoded from train/


def test_hpdv2_test_ranks_to_pairs(tmp_path):
    root = write_hpdv2(tmp_path)
    fb = public_data.load_pairs(os.path.join(root, "test.json"))
    got = sorted(zip(names(fb, fb.winner), names(fb, fb.loser)))  # ranks 1, 2, 3, 1: lower is better
    assert got == [("x0.jpg", "x1.jpg"), ("x0.jpg", "x2.jpg"), ("x1.jpg", "x2.jpg"), ("x3.jpg", "x1.jpg"), ("x3.jpg", "x2.jpg")]
    assert fb.skipped == {"tie": 1}  # x0 and x3 share rank 1
    os.remove(os.path.join(root, "train.json"))
    assert len(public_data.load_pairs(root)) == 5  # a folder with test.json only


def test_hpdv2_images_beside_the_json_and_bad_files(tmp_path):
    root = write_hpdv2(tmp_path)
    for n in os.listdir(os.path.join(root, "test")):  # no test/ folder: paths relative to the JSON's own folder
        os.rename(os.path.join(root, "test", n), os.path.join(root, n))
    os.rmdir(os.path.join(root, "test"))
    assert len(public_data.load_pairs(os.path.join(root, "test.json"))) == 5
    os.rename(os.path.join(root, "train"), os.path.join(root, "unpacked"))  # an archive that held train/ itself
    os.makedirs(os.path.join(root, "train"))
    os.rename(os.path.join(root, "unpacked"), os.path.join(root, "train", "train"))
    assert len(public_data.load_pairs(root)) == 6
    (tmp_path / "other.json").write_text(json.dumps([{"caption": "x", "chosen": "a.png"}]))
    with pytest.raises(SystemExit, match="other.json is not an annotation file of HPDv2, HPDv3 or ImageRewardDB: expected"):
        public_data.load_pairs(str(tmp_path / "other.json"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(SystemExit, match="cannot read the annotations .*broken.json"):
        public_data.load_singles(str(tmp_path / "broken.json"))


def test_hpdv2_singles_both_policies(tmp_path):
    root = write_hpdv2(tmp_path)
    label = lambda fb: {os.path.basename(fb.paths[i]): int(y) for i, y in zip(fb.image, fb.label)}
    fb = public_data.load_singles(root)
    liked = {"r0.jpg", "r1.jpg", "r2.jpg", "r3.jpg", "r4.jpg"}  # r0 preferred once and lost once
    assert {k for k, y in label(fb).items() if y == 1} == liked
    assert {k for k, y in label(fb).items() if y == -1} == {"g0.jpg", "b1.jpg", "t0.jpg", "t1.jpg", "g2.jpg", "b2.jpg", "g3.jpg"}
    assert fb.notes["images only ever tied, labelled undesirable"] == 2 and fb.skipped["pair with a missing file"] == 1
    assert [fb.captions[c] for c, i in zip(fb.caption_idx, fb.image) if fb.paths[i].endswith("r0.jpg")] == ["a red square"]
    fb = public_data.load_singles(os.path.join(root, "train.json"), pickapic_policy="always")
    assert {k for k, y in label(fb).items() if y == 1} == liked - {"r0.jpg"} and "r0.jpg" not in label(fb)
    assert fb.skipped["image preferred in some of its pairs only (policy always)"] == 1


def test_write_pairs_round_trips_as_pickapic_and_jsonl(tmp_path):
    root = write_hpdv2(tmp_path / "HPDv2")
    fb = public_data.load_pairs(root)
    score = np.arange(len(fb), dtype=np.float32)
    public_data.write_pairs(fb, [1, 3], str(tmp_path / "sub.parquet"), {"fifa_score": score})
    t = pq.read_table(tmp_path / "sub.parquet").to_pydict()
    assert t["fifa_score"] == [1.0, 3.0] and t["label_0"] == [1.0, 1.0]
    with open(fb.paths[fb.winner[1]], "rb") as f:
        assert t["jpg_0"][0] == f.read()  # a JPEG file's own bytes, not compressed twice
    back = public_data.load_pairs(str(tmp_path / "sub.parquet"))  # read as Pick-a-Pic
    assert [back.captions[c] for c in back.caption_idx] == [fb.captions[fb.caption_idx[r]] for r in (1, 3)]
    assert len(public_data.load_singles(str(tmp_path / "sub.parquet"))) == 4
    public_data.write_pairs(fb, [0, 2], str(tmp_path / "out" / "sub.jsonl"), {"fifa_score": score})
    back = public_data.load_pairs(str(tmp_path / "out" / "sub.jsonl"))
    assert names(back, back.winner) == names(fb, fb.winner[[0, 2]]) and back.skipped == {}
    first = json.loads((tmp_path / "out" / "sub.jsonl").read_text().splitlines()[0])
    assert first["chosen"].startswith("../HPDv2/train/") and first["fifa_score"] == 0.0
    with pytest.raises(SystemExit, match="write pairs to a .parquet file"):
        public_data.write_pairs(fb, [0], str(tmp_path / "sub.csv"))


def test_unreachable_hub_id_names_it_and_the_options(monkeypatch):
    import huggingface_hub

    class RepositoryNotFoundError(Exception):  # what huggingface_hub raises for a repo that is gone (a 404)
        pass

    def missing(*args, **kwargs):
        raise RepositoryNotFoundError("404 Client Error.\n\nRepository Not Found for url: https://huggingface.co/...")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(SystemExit) as e:
        public_data.load_pairs("yuvalkirstain/pickapic_v2")
    msg = str(e.value)
    assert msg.count("\n") == 0 and "yuvalkirstain/pickapic_v2" in msg and "RepositoryNotFoundError" in msg
    assert "a local copy" in msg and "a mirror in the same schema" in msg and "HPDv2" in msg


def test_comfyui_prompts_from_sdxl_nodes_primitives_and_through_conditioning(tmp_path):
    """ComfyUI's API graph: CLIPTextEncodeSDXL's text_g, a text wired in from a primitive node, and a prompt whose
    conditioning passes through a ControlNet node before the sampler."""
    graphs = {
        "sdxl.png": {"3": {"class_type": "KSamplerAdvanced", "inputs": {"positive": ["6", 0], "negative": ["7", 0]}},
                     "6": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "an sdxl lighthouse", "text_l": "x",
                                                                          "clip": ["4", 1], "width": 1024}},
                     "7": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "ugly", "text_l": "ugly"}}},
        "primitive.png": {"3": {"class_type": "KSampler", "inputs": {"positive": ["6", 0], "negative": ["7", 0]}},
                          "6": {"class_type": "CLIPTextEncode", "inputs": {"text": ["9", 0], "clip": ["4", 1]}},
                          "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly"}},
                          "9": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a wired-in prompt"}}},
        "controlnet.png": {"3": {"class_type": "KSampler", "inputs": {"positive": ["11", 0], "negative": ["7", 0]}},
                           "11": {"class_type": "ControlNetApply", "inputs": {"conditioning": ["6", 0],
                                                                              "control_net": ["12", 0]}},
                           "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a guided tower"}},
                           "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly"}}},
    }
    for name, graph in graphs.items():
        save(tmp_path / name, pnginfo=png_text(prompt=json.dumps(graph)))
    assert {name: data.caption_beside(str(tmp_path / name)) for name in graphs} == {
        "sdxl.png": "an sdxl lighthouse", "primitive.png": "a wired-in prompt", "controlnet.png": "a guided tower"}


def test_an_image_cut_short_is_told_from_a_whole_one(tmp_path):
    for fmt, name in (("PNG", "a.png"), ("JPEG", "a.jpg"), ("WEBP", "a.webp")):
        save(tmp_path / name, fmt=fmt)
        whole = (tmp_path / name).read_bytes()
        (tmp_path / ("cut_" + name)).write_bytes(whole[:len(whole) * 2 // 3])
        assert data.image_complete(str(tmp_path / name)) and not data.image_complete(str(tmp_path / ("cut_" + name))), fmt
