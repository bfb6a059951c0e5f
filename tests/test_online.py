"""online_kto.py on the tiny pipeline: 2 rounds of 2 steps, 2 prompts x 4 images, all offline.

    python -m pytest -q tests/test_online.py
"""
import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import label
import online_kto
import sample
import train_kto

PROMPTS = "a red square|a blue circle"


def run_args(pipe, out, *extra):
    return ["--pretrained", pipe, "--prompts", PROMPTS, "--out", str(out), "--rounds", "2", "--k", "4", "--steps", "2",
            "--judge", "toy.scorers:redness", "--fidelity", "toy.scorers:color_acc", "--resolution", "32",
            "--global_batch", "4", "--micro_batch", "2", "--lr", "1e-3", "--warmup_steps", "3", "--beta", "100",
            "--sample_steps", "2", "--eval_seeds", "2", "--batch_size", "3", "--save_every", "1",
            "--cache_dir", str(out) + "_cache", "--train_args", "--log_every 1", *extra]


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_weights(out, r=2):
    return load_file(os.path.join(out, f"round_{r:03d}", "train", "checkpoints", "step_0000002", "model.safetensors"))


def mtimes(out):
    return {os.path.relpath(os.path.join(d, f), out): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(out) for f in files}


@pytest.fixture(scope="module")
def uninterrupted(tiny_pipe_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("online") / "run"
    online_kto.main(run_args(tiny_pipe_dir, out))
    return str(out)


def test_labels_are_the_top_and_bottom_share_of_each_prompt(uninterrupted):
    from toy.scorers import redness
    from PIL import Image
    for r in (1, 2):
        folder = os.path.join(uninterrupted, f"round_{r:03d}", "images")
        rows = jsonl(os.path.join(folder, "metadata.jsonl"))
        assert len(rows) == 4  # 2 prompts x (1 liked + 1 disliked) of 4: the middle two are left out
        for i, prompt in enumerate(PROMPTS.split("|")):
            names = sorted(n for n in os.listdir(folder) if n.startswith(f"{i:04d}_") and n.endswith(".png"))
            assert len(names) == 4 and all(open(os.path.join(folder, n[:-4] + ".txt")).read().strip() == prompt for n in names)
            score = {n: float(redness([Image.open(os.path.join(folder, n))], [prompt])[0]) for n in names}
            label = {row["file_name"]: row["label"] for row in rows if row["text"] == prompt}
            assert label == {max(score, key=score.get): "liked", min(score, key=score.get): "disliked"}
    # train_kto.py reads the folder as it is
    from public_data import load_singles
    fb = load_singles(os.path.join(uninterrupted, "round_001", "images"))
    assert fb.label_counts().startswith("2 desirable, 2 undesirable")


def test_each_round_trains_from_the_last_round_against_the_base(uninterrupted):
    first = jsonl(os.path.join(uninterrupted, "round_001", "train", "log.jsonl"))[0]
    second = jsonl(os.path.join(uninterrupted, "round_002", "train", "log.jsonl"))[0]
    assert first["ref_point"] == 0.0 and first["reward_d"] == 0.0  # round 1, step 1: the policy is the base
    assert second["ref_point"] != 0.0 and abs(second["reward_d"]) > 1e-5  # round 2, step 1: round 1's weights
    with open(os.path.join(uninterrupted, "round_002", "train", "checkpoints", "step_0000002", "state.json")) as f:
        config = json.load(f)["config"]
    assert config["continue_from"].endswith(os.path.join("round_001", "train", "checkpoints", "step_0000002"))
    rounds = jsonl(os.path.join(uninterrupted, "rounds.jsonl"))
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[0]["like_rate"] == 0.5  # base: 2 seeds, median split
    for r in rounds:
        assert np.isfinite(r["judge_eval_mean"]) and 0 <= r["like_rate"] <= 1 and 0 <= r["fidelity_eval_mean"] <= 1
    assert all(np.isfinite(r["judge_samples_mean"]) and r["liked"] == r["disliked"] == 2 for r in rounds[1:])


def test_one_warm_up_then_lr_and_the_optimizer_continue_across_rounds(uninterrupted):
    """--warmup_steps 3 with 2 steps a round: the warm-up spans round 1 and the first step of round 2, once for the
    whole run; every later step trains at --lr (1e-3). Round 2 continues round 1's AdamW state: its step count goes
    on from 2 (a restarted optimizer would count 1, 2 again)."""
    lrs = {r: [rec["lr"] for rec in jsonl(os.path.join(uninterrupted, f"round_{r:03d}", "train", "log.jsonl"))] for r in (1, 2)}
    assert lrs[1] == pytest.approx([1e-3 / 3, 2e-3 / 3]) and lrs[2] == pytest.approx([1e-3, 1e-3])
    for r, step, adam_steps in [(1, 2, 2), (2, 1, 3), (2, 2, 4)]:  # round 2 keeps its step-1 checkpoint (--save_every 1)
        folder = os.path.join(uninterrupted, f"round_{r:03d}", "train", "checkpoints", f"step_{step:07d}")
        state = load_file(os.path.join(folder, "optimizer.safetensors"))
        assert {float(v) for k, v in state.items() if k.endswith(".step")} == {adam_steps}
        with open(os.path.join(folder, "state.json")) as f:
            assert json.load(f)["config"]["schedule_start"] == 2 * (r - 1)


def test_native_resolution_and_default_warm_up(tiny_pipe_dir, tmp_path, capsys):
    """Without --resolution the run samples and trains at the base's native size (the tiny pipeline's 32 px, not
    train_kto's default 512); without --warmup_steps it warms up for a tenth of a round (at least one step)."""
    out = tmp_path / "native"
    argv = run_args(tiny_pipe_dir, out, "--rounds", "1")
    for flag in ("--resolution", "--warmup_steps"):
        k = argv.index(flag)
        argv[k:k + 2] = []
    online_kto.main(argv)
    assert "sampling and training at 32 px (the base model's native size)" in capsys.readouterr().out
    from PIL import Image
    folder = os.path.join(out, "round_001", "images")
    assert {Image.open(os.path.join(folder, n)).size for n in os.listdir(folder) if n.endswith(".png")} == {(32, 32)}
    with open(os.path.join(out, "round_001", "train", "checkpoints", "step_0000002", "state.json")) as f:
        config = json.load(f)["config"]
    assert config["resolution"] == 32 and config["warmup_steps"] == 1
    assert online_kto.native_resolution(tiny_pipe_dir) == 32


@pytest.mark.parametrize("phase", ["generate", "label", "train"])
def test_killed_in_a_phase_then_rerun_equals_uninterrupted(tiny_pipe_dir, uninterrupted, tmp_path, monkeypatch, phase):
    """A run killed in round 2 (after 2 of its images are saved, while its labels are scored, or while training
    saves its step-2 checkpoint), then rerun: what was finished is reused untouched (mtimes), and the last
    weights and every round's record are those of an uninterrupted run, bitwise on the CPU."""
    out = tmp_path / "run"
    module, name = {"generate": (sample, "save_png"), "label": (online_kto, "score_files"),
                    "train": (train_kto.checkpoints, "save_checkpoint")}[phase]
    real, saved = getattr(module, name), []

    def dying(*a, **k):
        if phase == "generate" and "round_002" in a[1]:
            saved.append(a[1])
            if len(saved) > 2:
                raise KeyboardInterrupt("killed while generating")
        if phase == "label" and "round_002" in a[1][0]:
            raise KeyboardInterrupt("killed while labelling")
        if phase == "train" and "round_002" in a[0] and a[1] == 2:
            raise KeyboardInterrupt("killed while training")
        return real(*a, **k)
    monkeypatch.setattr(module, name, dying)
    with pytest.raises(KeyboardInterrupt):
        online_kto.main(run_args(tiny_pipe_dir, out))
    monkeypatch.setattr(module, name, real)
    assert not os.path.exists(os.path.join(out, "round_002", "eval.json"))
    kept = lambda k: k.startswith(("round_000", "round_001")) or (k.startswith("round_002/images") and "metadata" not in k)
    before = {k: v for k, v in mtimes(out).items() if kept(k)}
    assert any(k.startswith("round_001/train/checkpoints") for k in before)
    assert len([k for k in before if k.startswith("round_002/images") and k.endswith(".png")]) == (2 if phase == "generate" else 8)
    if phase == "train":
        assert os.path.isdir(os.path.join(out, "round_002", "train", "checkpoints", "step_0000001"))
    online_kto.main(run_args(tiny_pipe_dir, out))
    after = mtimes(out)
    assert {k: after[k] for k in before} == before  # finished work is reused, not made again
    a, b = final_weights(uninterrupted), final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise on the CPU
    assert jsonl(os.path.join(out, "rounds.jsonl")) == jsonl(os.path.join(uninterrupted, "rounds.jsonl"))


def test_offline_labels_the_base_samples_up_front(tiny_pipe_dir, uninterrupted, tmp_path):
    out = tmp_path / "offline"
    online_kto.main(run_args(tiny_pipe_dir, out, "--offline"))
    rows = jsonl(os.path.join(out, "offline_labels.jsonl"))
    assert len(rows) == 8 and {r["file_name"].split("/")[0] for r in rows} == {"round_001", "round_002"}
    # round 1 is the same in both arms (the base's samples, the same seeds), round 2 of offline is the base's too
    on1, off1 = (os.path.join(d, "round_001", "images", "metadata.jsonl") for d in (uninterrupted, out))
    assert jsonl(on1) == jsonl(off1)
    assert jsonl(os.path.join(out, "round_002", "train", "log.jsonl"))[0]["ref_point"] != 0.0  # from round 1's weights
    with open(os.path.join(out, "round_001", "train", "checkpoints", "step_0000002", "state.json")) as f:
        assert json.load(f)["config"]["data"] == os.path.join(str(out), "offline_labels.jsonl")


def test_person_judge_waits_for_the_labels_file(tiny_pipe_dir, tmp_path, capsys):
    """--judge person prints label.py's command and waits; a 'person' (a thread) labels the round through label.py's
    own Labels, as its page would, one decision at a time: a like taken back by undo, then a skip; the round then
    trains on those labels."""
    out = tmp_path / "person"
    folder = os.path.join(out, "round_001", "images")

    def person():
        while not (os.path.isdir(folder) and len([n for n in os.listdir(folder) if n.endswith(".png")]) == 8):
            time.sleep(0.05)
        labels = label.Labels(folder, pairs=False)
        names = [item[0] for item in labels.items]
        assert len(names) == 8
        for k, name in enumerate(names[:-1]):  # the last one is skipped
            assert labels.decide([name], "liked" if k % 2 == 0 else "disliked") is None
            time.sleep(0.05)
        assert labels.decide([names[-1]], "liked") is None and labels.undo() is None
        assert labels.decide([names[-1]], "skip") is None
    thread = threading.Thread(target=person, daemon=True)
    thread.start()
    online_kto.main(run_args(tiny_pipe_dir, out, "--judge", "person", "--rounds", "1", "--poll", "0.1"))
    thread.join(timeout=5)
    assert f"python label.py {folder}" in capsys.readouterr().out
    with open(os.path.join(out, "round_001", "labels.json")) as f:
        assert json.load(f) == {"liked": 4, "disliked": 3, "samples": 8, "judge_samples_mean": None}
    log = jsonl(os.path.join(out, "round_001", "train", "log.jsonl"))
    assert len(log) == 2
    rounds = jsonl(os.path.join(out, "rounds.jsonl"))
    assert "like_rate" not in rounds[-1] and 0 <= rounds[-1]["fidelity_eval_mean"] <= 1  # no judge score to evaluate


def test_clear_errors(tiny_pipe_dir, tmp_path):
    with pytest.raises(SystemExit, match="must not overlap"):
        online_kto.main(run_args(tiny_pipe_dir, tmp_path / "a", "--like_share", "0.6"))
    with pytest.raises(SystemExit, match="cannot load the function"):
        online_kto.main(run_args(tiny_pipe_dir, tmp_path / "b", "--judge", "nowhere:nothing"))
    old = tmp_path / "old"  # a run folder of the online_kto.py that restarted the optimizer every round
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"pretrained": tiny_pipe_dir}))
    with pytest.raises(SystemExit, match="older online_kto.py, which restarted the optimizer"):
        online_kto.main(run_args(tiny_pipe_dir, old))


def test_toy_table_and_plot(tmp_path):
    """runs/toy_online_table.py on made-up rounds: the mean and the lowest-highest run per round, and a PNG."""
    from PIL import Image
    from runs import toy_online_table
    for arm, gain in (("online", 0.004), ("offline", 0.002)):
        for s in range(2):
            (tmp_path / f"{arm}_s{s}").mkdir()
            recs = [{"round": r, "judge_eval_mean": gain * r * (1 + s), "like_rate": 0.5, "fidelity_eval_mean": 0.9 - 0.01 * r}
                    for r in range(3)]
            (tmp_path / f"{arm}_s{s}" / "rounds.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    toy_online_table.main([str(tmp_path)])
    text = (tmp_path / "table.md").read_text()
    assert "| 2 | 0.0120 (0.0080 to 0.0160) | 0.0060 (0.0040 to 0.0080) |" in text
    assert Image.open(tmp_path / "online_vs_offline.png").size == (1000, 420)
