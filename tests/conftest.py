"""Shared fixtures: tiny SD-shaped pipelines built from config, saved in the diffusers layout.

Nothing is downloaded: the tokenizer is written from a small vocabulary (toy/models.py), so every
test loads its models through the same `from_pretrained(dir)` path a real SD1.5 run takes.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tools"))  # the benchmarks (tools/bench.py) are tested too
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def torchrun(script, *args, nproc=2, twin=True):
    """The command line of `torchrun --standalone --nproc_per_node=N script ARGS` on the CPU, every rank under the
    device twin (tests/device_twin.py: a collective handed a tensor on the host fails as it does on NCCL) unless
    twin=False. `script`: relative to the repository, or absolute."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *([os.path.join(ROOT, "tests", "device_twin.py")] if twin else []), os.path.join(ROOT, script),
            *map(str, args)]


# a child process that SIGKILLs itself at one file-system call: an audit hook (PEP 578) sees every open, mkdir and
# rename Python makes, whatever module makes it and however that module was imported, and a SIGKILL runs no
# `finally` or `except`, so the disk is left as a real kill leaves it
KILL_AT = """
import os, runpy, signal, sys
event, parts, script = sys.argv[1], sys.argv[2].split("|"), sys.argv[3]
def hook(name, args):
    if name == event and args and all(p in str(args[0]) for p in parts):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv = sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def run_killed_at(script, args, event, *parts):
    """Run `python script ARGS` in a child process until its first audit `event` ("open", "os.mkdir", "os.rename";
    https://docs.python.org/3/library/audit_events.html) whose path contains every one of `parts`, where it SIGKILLs
    itself; the test fails if it ended any other way. The child uses this process's thread count: what it computed
    before the kill is bitwise what this process computes."""
    import signal
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", KILL_AT, event, "|".join(parts), os.path.join(ROOT, script),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (f"{script} was not killed at {event} {parts} (exit {proc.returncode}):\n"
                                                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A random-weight tiny StableDiffusionPipeline (32 px images, 8x8x4 latents) saved to a folder."""
    from toy.models import build_pipeline
    path = str(tmp_path_factory.mktemp("tiny_pipe"))
    build_pipeline(path, size="tiny", seed=0)
    return path


COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}


def jpeg(color, size=40, seed=0):
    """JPEG bytes of a colored square on a gray background, slightly noisy so images differ."""
    import io
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    a = np.full((size, size, 3), 128, np.uint8)
    a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = color
    a = np.clip(a.astype(int) + rng.integers(-10, 10, a.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG")
    return buf.getvalue()


def write_pickapic(path, n=8, ties=0, corrupt=0, seed=0):
    """A tiny parquet file with the Pick-a-Pic v2 schema: n decided pairs, then `ties` ties and
    `corrupt` pairs whose jpg_1 is truncated. The red image wins every decided pair."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = {k: [] for k in ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid",
                            "best_image_uid", "model_0", "model_1", "ranking_id", "user_id",
                            "num_example_per_prompt", "are_different", "has_label", "created_at"]}
    names = list(COLORS)
    for i in range(n + ties + corrupt):
        other = names[1 + i % 2]
        red_first = i % 2 == 0
        a, b = jpeg(COLORS["red"], seed=seed + i), jpeg(COLORS[other], seed=seed + 100 + i)
        j0, j1 = (a, b) if red_first else (b, a)
        l0, l1 = (1.0, 0.0) if red_first else (0.0, 1.0)
        if n <= i < n + ties:
            l0 = l1 = 0.5
        if i >= n + ties:
            j1 = j1[: len(j1) // 3]  # truncated JPEG
        for k, v in [("caption", f"a {other} square"), ("jpg_0", j0), ("jpg_1", j1), ("label_0", l0), ("label_1", l1),
                     ("image_0_uid", f"u{i}a"), ("image_1_uid", f"u{i}b"), ("best_image_uid", f"u{i}a" if l0 >= l1 else f"u{i}b"),
                     ("model_0", "toy"), ("model_1", "toy"), ("ranking_id", i), ("user_id", 1), ("num_example_per_prompt", 1),
                     ("are_different", True), ("has_label", True), ("created_at", "2024-01-01")]:
            rows[k].append(v)
    pq.write_table(pa.table(rows), path)
    return path


@pytest.fixture
def pickapic(tmp_path):
    return write_pickapic(str(tmp_path / "pairs.parquet"), n=8)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A random-weight tiny StableDiffusionXLPipeline (two text encoders, text_time UNet) saved to a folder."""
    from toy.models import build_sdxl_pipeline
    path = str(tmp_path_factory.mktemp("tiny_sdxl"))
    build_sdxl_pipeline(path, seed=0)
    return path


def write_hpdv2(root, corrupt=False):
    """A tiny HPDv2 in the layout and schema of its dataset card (hub ymhao/HPDv2): train.json, a list of
    {"human_preference": [int, ...] (1 for preference), "prompt": str, "file_path": [str, ...]}, with the
    images in train/ beside it; test.json, a list of {"prompt", "image_path", "rank" (lower is better),
    "raw_annotations": [{"rank", "user_hash"}]}, with the images in test/. Red images are preferred.
    train.json holds 6 decided pairs, 1 tie (both images preferred), 1 pair with a missing file, 1 entry
    without a caption and 1 with fewer labels than images; corrupt: r3.jpg is a truncated JPEG."""
    import json
    root = str(root)
    images = {"r0": "red", "g0": "green", "r1": "red", "b1": "blue", "t0": "green", "t1": "blue", "r2": "red",
              "g2": "green", "b2": "blue", "r3": "red", "g3": "green", "r4": "red", "g5": "green", "b5": "blue"}
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    for k, (name, color) in enumerate(images.items()):
        data = jpeg(COLORS[color], seed=k)
        with open(os.path.join(root, "train", name + ".jpg"), "wb") as f:
            f.write(data[: len(data) // 3] if corrupt and name == "r3" else data)
    entry = lambda pref, prompt, names, key="file_path": {"human_preference": pref, "prompt": prompt,
                                                          key: [n + ".jpg" for n in names]}
    train = [entry([1, 0], "a red square", ["r0", "g0"]),
             entry([0, 1], "a blue square", ["b1", "r1"]),
             entry([1, 1], "a tie", ["t0", "t1"]),  # none preferred over the other
             entry([1, 0, 0], "three squares", ["r2", "g2", "b2"]),  # two pairs: r2 against each other image
             entry([1, 0], "a lost file", ["r3", "gone"]),
             entry([1, 0], "  ", ["r4", "g0"]),  # no caption
             entry([1, 0], "odd", ["r4", "g0", "b1"]),  # three images, two labels
             entry([1, 0], "a red square again", ["r3", "g3"]),
             entry([0, 1], "r0 loses here", ["r0", "r4"], key="image_path")]  # the key test.json uses
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump(train, f)
    os.makedirs(os.path.join(root, "test"), exist_ok=True)
    for k, (name, color) in enumerate([("x0", "red"), ("x1", "green"), ("x2", "blue"), ("x3", "red")]):
        with open(os.path.join(root, "test", name + ".jpg"), "wb") as f:
            f.write(jpeg(COLORS[color], seed=50 + k))
    test = [{"prompt": "four squares", "image_path": ["x0.jpg", "x1.jpg", "x2.jpg", "x3.jpg"], "rank": [1, 2, 3, 1],
             "raw_annotations": [{"rank": [1, 2, 3, 1], "user_hash": "u1"}]}]
    with open(os.path.join(root, "test.json"), "w") as f:
        json.dump(test, f)
    return root


def write_hpdv3(root, corrupt=False):
    """A tiny HPDv3 in the layout and schema of its card and the HPSv3 README (hub MizzenAI/HPDv3): train.json, a list
    of {"prompt", "choice_dist": [votes for path1, votes for path2] or null, "confidence", "path1" (the preferred
    image), "path2", "model1", "model2"}; test.json the same without choice_dist and confidence; the images under
    images/, where `cat images.tar.gz.* | gunzip | tar -xv` in the dataset folder puts them. Red images are preferred.
    train.json: 5 pairs whose images are there (4 with vote counts, the last one 4 to 6 against path1, one without),
    1 pair by reference to images of another dataset (absent), 1 entry without a caption, 1 with a malformed
    choice_dist; corrupt: r3.jpg is a truncated JPEG. test.json: 2 pairs."""
    import json
    root = str(root)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images = {"r0": "red", "g0": "green", "r1": "red", "b1": "blue", "r2": "red", "g2": "green", "r3": "red",
              "g3": "green", "r4": "red", "x0": "red", "x1": "green", "x2": "red"}
    for k, (name, color) in enumerate(images.items()):
        data = jpeg(COLORS[color], seed=200 + k)
        with open(os.path.join(root, "images", name + ".jpg"), "wb") as f:
            f.write(data[: len(data) // 3] if corrupt and name == "r3" else data)
    entry = lambda prompt, a, b, votes, m1="flux", m2="infinity": {
        "prompt": prompt, "choice_dist": votes, "confidence": None if votes is None else 0.99,
        "path1": a if "/" in a else f"images/{a}.jpg", "path2": b if "/" in b else f"images/{b}.jpg", "model1": m1, "model2": m2}
    train = [entry("a red square", "r0", "g0", [12, 7]),
             entry("a red square on blue", "r1", "b1", [9, 1], "kolors", "sd3"),
             entry("a red square, midjourney", "r2", "g2", None, "midjourney", "midjourney"),  # no vote counts
             entry("a red square again", "r3", "g3", [3, 1]),
             entry("r0 loses here", "r4", "r0", [4, 6]),  # most votes against path1, which the card still prefers
             entry("a pair by reference", "pickapic/u1.jpg", "pickapic/u2.jpg", None, "pickapic", "pickapic"),
             entry("  ", "r4", "g0", [5, 5]),  # no caption
             entry("odd votes", "r4", "g2", [1])]  # choice_dist is not two counts
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump(train, f)
    test = [{k: v for k, v in entry(p, a, b, None).items() if k not in ("choice_dist", "confidence")}
            for p, a, b in [("a red square", "x0", "x1"), ("another red square", "x2", "x1")]]
    with open(os.path.join(root, "test.json"), "w") as f:
        json.dump(test, f)
    return root
