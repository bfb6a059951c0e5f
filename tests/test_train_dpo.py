"""train_dpo.py end to end on a tiny pipeline and tiny Pick-a-Pic parquet files, all offline.

    python -m pytest -q tests/test_train_dpo.py            # default suite
    python -m pytest -q tests/test_train_dpo.py -m slow    # the torchrun and kill-and-resume checks
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train_dpo
from conftest import ROOT, run_killed_at, torchrun, write_hpdv2, write_hpdv3, write_pickapic


def args_for(pipe, data, out, cache, *extra):
    return ["--pretrained", pipe, "--data", data, "--out_dir", str(out), "--cache_dir", str(cache),
            "--resolution", "32", "--global_batch", "4", "--micro_batch", "2", "--val_every", "-1",
            "--log_every", "1", "--save_every", "1", "--lr", "1e-3", "--warmup_steps", "1", *extra]


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def unet_weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_full_finetune_two_steps_loads_in_diffusers(tiny_pipe_dir, pickapic, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "out"
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, tmp_path / "cache", "--max_steps", "2",
                            "--val_every", "2", "--val_seeds", "1", "--val_steps", "2", "--val_prompts", "a red square|a blue square"))
    log = records(out)
    assert [r["step"] for r in log] == [1, 2]
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step
    for key in ["implicit_acc", "reward_margin", "policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l", "grad_norm", "lr", "pairs/s"]:
        assert key in log[0]
    from PIL import Image
    grid = Image.open(out / "val" / "step_0000002.png")  # labelled: seed header, prompt beside each row, 32 px x 4
    assert grid.size == (220 + 1 * 128, 26 + 2 * 128)
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    base, tuned = unet_weights(tiny_pipe_dir), unet_weights(str(out))
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_lora_two_steps_loads_with_load_lora_weights(tiny_pipe_dir, pickapic, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "out"
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, tmp_path / "cache", "--max_steps", "2", "--lora_rank", "4",
                            "--grad_checkpointing"))
    assert os.path.exists(out / "pytorch_lora_weights.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    before = pipe.unet(x, t, emb).sample
    pipe.load_lora_weights(str(out))
    after = pipe.unet(x, t, emb).sample
    assert not torch.allclose(before, after)


def test_grad_clip_zero_trains(tiny_pipe_dir, pickapic, tmp_path):
    """--grad_clip 0 means no clipping: without weight decay the weights still move (clipping to norm 0 left them
    exactly where they were), and the gradient norm is still logged."""
    out = tmp_path / "out"
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, tmp_path / "cache", "--max_steps", "1", "--grad_clip", "0",
                            "--weight_decay", "0"))
    assert records(out)[0]["grad_norm"] > 0
    base, tuned = unet_weights(tiny_pipe_dir), unet_weights(str(out))
    assert any(not torch.equal(base[k], tuned[k]) for k in base)


def test_sft_runs_without_a_reference(tiny_pipe_dir, pickapic, tmp_path):
    out = tmp_path / "out"
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, tmp_path / "cache", "--max_steps", "1", "--loss", "sft"))
    assert "ref_err_w" not in records(out)[0]


def test_ties_and_corrupt_images_are_counted(tiny_pipe_dir, tmp_path, capsys):
    data = write_pickapic(str(tmp_path / "p.parquet"), n=8, ties=3, corrupt=1)
    train_dpo.main(args_for(tiny_pipe_dir, data, tmp_path / "out", tmp_path / "cache", "--max_steps", "1"))
    printed = capsys.readouterr().out
    assert "8 pairs" in printed and "tie: 3" in printed and "unreadable image: 1" in printed
    with pytest.raises(SystemExit, match="missing or corrupt"):
        train_dpo.main(args_for(tiny_pipe_dir, data, tmp_path / "out2", tmp_path / "cache2", "--max_steps", "1", "--strict"))


def test_one_step_on_hpdv2_counts_what_it_skips(tiny_pipe_dir, tmp_path, capsys):
    data = write_hpdv2(tmp_path / "HPDv2", corrupt=True)  # train.json and train/, as the dataset card lays them out
    train_dpo.main(args_for(tiny_pipe_dir, data, tmp_path / "out", tmp_path / "cache", "--max_steps", "1"))
    printed = capsys.readouterr().out
    summary = next(line for line in printed.splitlines() if line.startswith("data: "))
    assert "5 pairs" in summary and "HPDv2 train" in summary  # 6 decided pairs, one with a corrupt image
    assert all(f"{reason}: 1" in summary for reason in ("tie", "missing file", "unreadable image", "entry with no caption"))
    assert records(tmp_path / "out")[0]["loss"] == pytest.approx(0.693, abs=1e-3)  # policy = reference at step 1


def test_one_step_on_hpdv3_counts_what_it_skips(tiny_pipe_dir, tmp_path, capsys):
    data = write_hpdv3(tmp_path / "HPDv3", corrupt=True)  # train.json and images/, as its card lays them out
    train_dpo.main(args_for(tiny_pipe_dir, data, tmp_path / "out", tmp_path / "cache", "--max_steps", "1"))
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data: "))
    assert "4 pairs" in summary and "(HPDv3)" in summary  # 5 pairs with their images, one of them corrupt
    assert all(f"{reason}: 1" in summary for reason in ("unreadable image", "entry with no caption", "HPDv3's archive)"))
    assert "pairs with vote counts (choice_dist): 4" in summary
    assert records(tmp_path / "out")[0]["loss"] == pytest.approx(0.693, abs=1e-3)  # policy = reference at step 1


def test_a_batch_larger_than_the_data_warns_and_a_far_larger_one_stops(tiny_pipe_dir, pickapic, tmp_path, capsys):
    """The paper's 2048 pairs a step on a hobbyist's few labels: one line before any model loads, not hours of
    repeats. A step up to 4 times the data runs, with a warning."""
    with pytest.raises(SystemExit, match="--global_batch 2048 draws each of the data's 8 pairs 256.0 times"):
        train_dpo.main(args_for(tiny_pipe_dir, pickapic, tmp_path / "o", tmp_path / "c", "--global_batch", "2048"))
    assert not (tmp_path / "o").exists()
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, tmp_path / "o", tmp_path / "c", "--global_batch", "16", "--max_steps", "1"))
    assert "warning: --global_batch 16 is more than the data's 8 pairs: each step draws them 2.0 times" in capsys.readouterr().out


def test_clear_errors(tiny_pipe_dir, tmp_path):
    ties_only = write_pickapic(str(tmp_path / "ties.parquet"), n=0, ties=3)
    with pytest.raises(SystemExit, match="no usable pairs.*tie: 3"):
        train_dpo.main(args_for(tiny_pipe_dir, ties_only, tmp_path / "o1", tmp_path / "c", "--max_steps", "1"))
    with pytest.raises(SystemExit, match="data not found"):
        train_dpo.main(args_for(tiny_pipe_dir, str(tmp_path / "nope.parquet"), tmp_path / "o2", tmp_path / "c", "--max_steps", "1"))
    with pytest.raises(SystemExit, match="data not found"):  # the data is checked before a (slow) model load
        train_dpo.main(args_for(str(tmp_path / "no_model"), str(tmp_path / "nope"), tmp_path / "o2", tmp_path / "c"))
    assert not (tmp_path / "o2").exists()  # a run that could not start leaves no output folder
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=2)
    with pytest.raises(SystemExit, match="model not found"):
        train_dpo.main(args_for(str(tmp_path / "no_model"), pairs, tmp_path / "o3", tmp_path / "c", "--max_steps", "1"))
    with pytest.raises(SystemExit, match="cannot load a Stable Diffusion pipeline"):
        train_dpo.main(args_for(str(tmp_path), pairs, tmp_path / "o4", tmp_path / "c", "--max_steps", "1"))


def test_stale_cache_is_not_reused(tiny_pipe_dir, tmp_path):
    data = str(tmp_path / "p.parquet")
    cache = tmp_path / "cache"
    write_pickapic(data, n=4, seed=0)
    common = ("--max_steps", "1", "--global_batch", "2", "--micro_batch", "1")
    train_dpo.main(args_for(tiny_pipe_dir, data, tmp_path / "o1", cache, *common))
    train_dpo.main(args_for(tiny_pipe_dir, data, tmp_path / "o2", cache, *common))
    assert len(os.listdir(cache)) == 1  # same data, model, resolution: reused
    time.sleep(0.01)
    write_pickapic(data, n=4, seed=1)  # same path, other images
    train_dpo.main(args_for(tiny_pipe_dir, data, tmp_path / "o3", cache, *common))
    train_dpo.main(args_for(tiny_pipe_dir, data, tmp_path / "o4", cache, *common, "--resolution", "16"))
    assert len(os.listdir(cache)) == 3


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tiny_pipe_dir, pickapic, tmp_path, monkeypatch):
    real, calls = train_dpo.dpo_loss, []

    def exploding(*a, **k):
        loss, m = real(*a, **k)
        calls.append(1)
        return (loss * float("nan") if len(calls) > 4 else loss), m  # 2 micro-steps a step: step 3 explodes
    monkeypatch.setattr(train_dpo, "dpo_loss", exploding)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="non-finite loss at step 3.*step_0000002"):
        train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, tmp_path / "cache", "--max_steps", "5"))
    assert open(out / "checkpoints" / "latest").read() == "step_0000002"


def test_killed_during_save_leaves_the_previous_checkpoint(tiny_pipe_dir, pickapic, tmp_path):
    """A SIGKILL half-way through a save (its weight files written, its state.json not yet) leaves `latest` on the
    complete checkpoint before it and the half-written one under its temporary name only; --resume clears that and
    ends where a run that never stopped ends."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    ref_out = tmp_path / "ref"
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, ref_out, cache, "--max_steps", "3"))
    run_killed_at("train_dpo.py", args_for(tiny_pipe_dir, pickapic, out, cache, "--max_steps", "3"),
                  "open", "step_0000002.tmp", "state.json")
    root = out / "checkpoints"
    assert open(root / "latest").read() == "step_0000001"
    [partial] = [d for d in os.listdir(root) if d.startswith("step_0000002")]
    assert ".tmp" in partial and sorted(os.listdir(root / partial)) == ["model.safetensors", "optimizer.safetensors"]
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, cache, "--max_steps", "3", "--resume"))
    assert not any(".tmp" in d for d in os.listdir(root))
    a, b = unet_weights(str(ref_out)), unet_weights(str(out))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise on the CPU


def test_resume_refuses_other_flags(tiny_pipe_dir, pickapic, tmp_path, monkeypatch):
    """--resume takes another --max_steps, intervals and micro-batch; any other flag that differs, one that did not
    exist when the checkpoint was written included, stops with one line naming it and both values."""
    import copy
    out = tmp_path / "out"
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, tmp_path / "cache", "--max_steps", "1"))
    with pytest.raises(SystemExit, match="--beta"):
        train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, tmp_path / "cache", "--max_steps", "2", "--resume", "--beta", "100"))
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, tmp_path / "cache", "--max_steps", "2", "--resume",
                            "--micro_batch", "1", "--log_every", "2", "--save_every", "2", "--keep_checkpoints", "3"))
    assert [r["step"] for r in records(out)] == [1, 2]
    # a flag someone adds to the trainer later, named in no list: the older checkpoint resumes at its default ...
    parser = copy.deepcopy(train_dpo.parser)
    parser.add_argument("--a_new_flag", type=int, default=0)
    monkeypatch.setattr(train_dpo, "parser", parser)
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, tmp_path / "cache", "--max_steps", "3", "--resume"))
    assert [r["step"] for r in records(out)] == [1, 2, 3]
    # ... and it is protected from then on
    with pytest.raises(SystemExit) as stop:
        train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, tmp_path / "cache", "--max_steps", "4", "--resume",
                                "--a_new_flag", "1"))
    assert "\n" not in str(stop.value) and "other --a_new_flag (0 there, 1 now)" in str(stop.value)


def launch(args, nproc=1, **kw):
    # one process uses the test's own thread count: bitwise equality needs the same summation order
    threads = torch.get_num_threads() if nproc == 1 else 1
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    if nproc == 1:
        cmd = [sys.executable, os.path.join(ROOT, "train_dpo.py"), *args]
    else:
        cmd = torchrun("train_dpo.py", *args, nproc=nproc)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def wait_for_checkpoint(out, proc, name, seconds=300):
    """Wait until the run writing to `out` has checkpoint `name` (or a later one) or has ended; returns the path of
    its `latest` file."""
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text() >= name:
            break
        time.sleep(0.05)
    return latest


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted_run(tiny_pipe_dir, pickapic, tmp_path):
    """SIGKILL a real run after its second checkpoint, resume it, and compare with a run that never stopped."""
    cache = tmp_path / "cache"
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, tmp_path / "ref", cache, "--max_steps", "5"))
    out = tmp_path / "out"
    proc = launch(args_for(tiny_pipe_dir, pickapic, out, cache, "--max_steps", "50"))
    latest = wait_for_checkpoint(out, proc, "step_0000002")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text()
    assert "step_00000" in killed_at and int(killed_at[5:]) < 5, killed_at
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, cache, "--max_steps", "5", "--resume"))
    a, b = unet_weights(str(tmp_path / "ref")), unet_weights(str(out))
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed from {killed_at}: weights differ"


def assert_same_run(one, two, a, b, base, lr, steps):
    """Two runs that differ only in how the global batch was spread over processes.

    Per step, the logged loss and the norm of the (all-reduced) gradient agree to 1e-5 relative: this
    checks the data split and DDP's averaging. The weights can only agree loosely: Adam divides by
    sqrt(v), so a parameter whose gradient is ~1e-9 moves by up to lr on float noise alone. We require
    the mean weight difference to be under 1% of the mean distance the weights moved from `base`
    (runs on different data differ by ~100%), and every weight within Adam's bound of 2 x lr x steps.
    base: the starting weights, or None for LoRA files, whose B (up) matrices start at zero."""
    for r1, r2 in zip(records(one), records(two)):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
        assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5)
    keys = list(a) if base is not None else [k for k in a if "lora_B" in k or "lora.up" in k]
    assert keys
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in keys])
    moved = torch.cat([(a[k] - (base[k] if base is not None else 0)).abs().flatten() for k in keys])
    assert diff.mean() < 0.01 * moved.mean(), (diff.mean().item(), moved.mean().item())
    assert diff.max() < 2 * lr * steps


@pytest.mark.slow
@pytest.mark.parametrize("lora", [0, 4])
def test_two_ranks_equal_one_rank(tiny_pipe_dir, pickapic, tmp_path, lora):
    """torchrun --nproc_per_node=2 (gloo, 2 x 1 pair x 2 accumulation steps) against one process
    (1 pair x 4 accumulation steps): the same global batch of 4 pairs (tolerances: assert_same_run)."""
    cache = tmp_path / "cache"
    common_args = ("--max_steps", "3", "--micro_batch", "1", "--lora_rank", str(lora), "--lr", "1e-4", "--beta", "100",
                   *(["--grad_checkpointing"] if lora else []))  # DDP with checkpointed LoRA blocks
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, tmp_path / "one", cache, *common_args))
    proc = launch(args_for(tiny_pipe_dir, pickapic, tmp_path / "two", cache, *common_args), nproc=2)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "4 pairs = 2 x micro-batch 1 x 2 accumulation steps" in output
    if lora:
        a = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
        b = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    else:
        a, b = unet_weights(str(tmp_path / "one")), unet_weights(str(tmp_path / "two"))
    base = unet_weights(tiny_pipe_dir) if not lora else None
    assert_same_run(tmp_path / "one", tmp_path / "two", a, b, base, lr=1e-4, steps=3)


def test_resume_skips_a_damaged_checkpoint(tiny_pipe_dir, pickapic, tmp_path, capsys):
    """A truncated model.safetensors in the newest checkpoint (a disk fault, a cut copy): resume says so in one
    line and continues from the complete one before it, ending where an uninterrupted run ends; with every
    checkpoint damaged it stops with one clear line."""
    cache = tmp_path / "cache"
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, tmp_path / "ref", cache, "--max_steps", "3"))
    out = tmp_path / "out"
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, cache, "--max_steps", "2"))
    root = out / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step_0000001", "step_0000002"]
    state = json.loads((root / "step_0000002" / "state.json").read_text())
    weights = root / "step_0000002" / "model.safetensors"
    assert state["files"]["model.safetensors"]["bytes"] == weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    capsys.readouterr()
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, cache, "--max_steps", "3", "--resume"))
    printed = capsys.readouterr().out
    assert "checkpoint step_0000002 is damaged (model.safetensors has" in printed
    assert "resumed from" in printed and "step_0000001 (step 1)" in printed
    a, b = unet_weights(str(tmp_path / "ref")), unet_weights(str(out))
    assert all(torch.equal(a[k], b[k]) for k in a)  # as if never stopped: bitwise on the CPU
    # every checkpoint damaged (a bit flipped: same size, other sha256): one line, no traceback
    for step in sorted(d for d in os.listdir(root) if d.startswith("step_")):
        path = root / step / "model.safetensors"
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 1
        path.write_bytes(bytes(raw))
    with pytest.raises(SystemExit, match="every checkpoint in .* is damaged"):
        train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, cache, "--max_steps", "5", "--resume"))
    assert "does not match its recorded sha256" in capsys.readouterr().out
