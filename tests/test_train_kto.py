"""train_kto.py end to end on a tiny pipeline and a liked/disliked image folder, all offline.

    python -m pytest -q tests/test_train_kto.py            # default suite
    python -m pytest -q tests/test_train_kto.py -m slow    # torchrun with 2 ranks against 1
"""
import copy
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import train_kto
from conftest import COLORS, ROOT, run_killed_at, torchrun, write_hpdv2, write_hpdv3
from losses import add_noise_and_target, kto_loss, kto_reference_point, per_sample_error


@pytest.fixture
def likes(tmp_path):
    """A hobbyist's folder: liked/ red squares, disliked/ blue ones (one nested), captions in .txt files."""
    root = tmp_path / "likes"
    rng = np.random.default_rng(0)
    for label, color, n in [("liked", "red", 6), ("disliked", "blue", 6)]:
        for i in range(n):
            folder = root / label / ("old" if i == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            a = np.full((40, 40, 3), 128, np.uint8)
            a[10:30, 10:30] = COLORS[color]
            a = np.clip(a + rng.integers(-8, 8, a.shape), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(folder / f"{color}{i}.png")
            (folder / f"{color}{i}.txt").write_text(f"a {color} square")
    return str(root)


def args_for(pipe, data, out, cache, *extra):
    return ["--pretrained", pipe, "--data", data, "--out_dir", str(out), "--cache_dir", str(cache),
            "--resolution", "32", "--global_batch", "4", "--micro_batch", "2", "--val_every", "-1",
            "--log_every", "1", "--save_every", "1", "--lr", "1e-3", "--warmup_steps", "1", "--beta", "100", *extra]


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_one_kto_step_moves_a_real_unet(tiny_pipe_dir):
    """One step lowers the policy error of a desirable image and raises that of an undesirable one."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet")
    ref = copy.deepcopy(unet).requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(tiny_pipe_dir, subfolder="scheduler")
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([400, 600])
    emb = torch.randn(2, 77, unet.config.cross_attention_dim)
    x_t, target = add_noise_and_target(sched, x0, eps, t)
    errors = lambda m: per_sample_error(m(x_t, t, emb).sample, target)
    before = errors(unet).detach()
    ref_err = errors(ref).detach()
    policy_err = errors(unet)
    z = kto_reference_point(ref_err - policy_err.detach())
    loss, m = kto_loss(policy_err, ref_err, torch.tensor([1.0, -1.0]), z, beta=5000)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) at the start
    loss.backward()
    torch.optim.SGD(unet.parameters(), lr=1e-6).step()
    after = errors(unet).detach()
    assert after[0] < before[0] and after[1] > before[1]


def test_sampler_share_is_gamma_for_any_world_size():
    desirable, undesirable = np.arange(0, 10), np.arange(10, 40)
    gamma, batch, steps = 0.8, 8, 500

    def drawn(world):
        labels = []
        for step in range(steps):
            for rank in range(world):
                for micro in range(batch // (2 * world)):
                    for pos in common.global_positions(step, batch, micro, rank, 2, world):
                        labels.append((pos, train_kto.draw_image(common.sample_generator(0, pos), desirable, undesirable, gamma)))
        return sorted(labels)
    one, two = drawn(1), drawn(2)
    assert one == two  # 2 ranks draw exactly the samples 1 rank draws
    share = np.mean([y > 0 for _, (_, y) in one])
    n = len(one)
    assert abs(share - gamma) < 4 * math.sqrt(gamma * (1 - gamma) / n), share  # within 4 standard errors
    assert {i for _, (i, y) in one if y > 0} <= set(desirable) and {i for _, (i, y) in one if y < 0} <= set(undesirable)


def _rank_reference_point(rank, world, port, rewards, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    z = kto_reference_point(rewards[rank], reduce_sum=common.all_reduce_sum)
    out[rank] = z.item()
    dist.destroy_process_group()


def test_reference_point_all_reduced_over_two_gloo_ranks():
    import socket
    import torch.multiprocessing as mp
    rewards = [torch.tensor([0.3, -0.1]), torch.tensor([0.5, 0.2, 0.4])]  # unequal shares on purpose
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank_reference_point, args=(2, port, rewards, out), nprocs=2, join=True)
    expected = kto_reference_point(torch.cat(rewards)).item()  # one process, the same global batch
    assert out[0] == pytest.approx(expected, abs=1e-7) and out[1] == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("utility,ref_point,lora", [("sigmoid", "batch", 0), ("loss_averse", "mismatched", 4),
                                                    ("risk_seeking", "batch", 4)])
def test_runs_log_and_load_in_diffusers(tiny_pipe_dir, likes, tmp_path, utility, ref_point, lora, capsys):
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "out"
    train_kto.main(args_for(tiny_pipe_dir, likes, out, tmp_path / "cache", "--max_steps", "2", "--utility", utility,
                            "--ref_point", ref_point, "--lora_rank", str(lora)))
    assert "6 desirable, 6 undesirable" in capsys.readouterr().out
    log = records(out)
    for key in ["loss", "reward_acc", "ref_point", "reward_d", "reward_u", "policy_err_d", "policy_err_u",
                "ref_err_d", "ref_err_u", "grad_norm", "lr", "images/s"]:
        assert key in log[-1] and math.isfinite(log[-1][key]), key
    assert log[0]["ref_point"] == 0.0  # policy == reference at the first step
    if lora:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
        pipe.load_lora_weights(str(out))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np").images.shape == (1, 32, 32, 3)


def test_class_metrics_survive_steps_without_that_class(tiny_pipe_dir, likes, tmp_path):
    """One image per step: every step lacks one class (NaN for it), yet the window's means are finite."""
    out = tmp_path / "out"
    train_kto.main(args_for(tiny_pipe_dir, likes, out, tmp_path / "cache", "--max_steps", "6", "--global_batch", "1",
                            "--micro_batch", "1", "--log_every", "6", "--desirable_share", "0.5"))
    (rec,) = records(out)
    assert 0 < rec["desirable_share"] < 1  # both classes occur in the window, never in one step
    for key in ["reward_d", "reward_u", "policy_err_d", "policy_err_u", "ref_err_d", "ref_err_u"]:
        assert math.isfinite(rec[key]), key


@pytest.mark.parametrize("write, expected", [
    # HPDv2, 12 images: 5 preferred at least once, one of them (r3) corrupt; 2 only ever tied
    (write_hpdv2, ["11 images", "4 desirable, 7 undesirable", "unreadable image: 1",
                   "images only ever tied, labelled undesirable: 2", "pair with a missing file: 1"]),
    # HPDv3, 9 images: 5 preferred at least once (path1 of a pair), one of them (r3) corrupt; 4 never preferred
    (write_hpdv3, ["8 images", "4 desirable, 4 undesirable", "unreadable image: 1",
                   "pair with a missing file outside images/", "policy at_least_once"])], ids=["hpdv2", "hpdv3"])
def test_one_step_on_public_pairs_labels_their_images(write, expected, tiny_pipe_dir, tmp_path, capsys):
    data = write(tmp_path / "data", corrupt=True)
    train_kto.main(args_for(tiny_pipe_dir, data, tmp_path / "out", tmp_path / "cache", "--max_steps", "1"))
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data: "))
    assert all(part in summary for part in expected), summary
    assert len(records(tmp_path / "out")) == 1


def test_clear_errors(tiny_pipe_dir, likes, tmp_path):
    import shutil
    only_liked = tmp_path / "only_liked"
    shutil.copytree(os.path.join(likes, "liked"), only_liked / "liked")
    with pytest.raises(SystemExit, match="no disliked images"):
        train_kto.main(args_for(tiny_pipe_dir, str(only_liked), tmp_path / "o", tmp_path / "c", "--max_steps", "1"))
    with pytest.raises(SystemExit, match="needs --global_batch >= 2"):
        train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "o", tmp_path / "c", "--max_steps", "1",
                                "--ref_point", "mismatched", "--global_batch", "1", "--micro_batch", "1"))


def test_killed_during_save_then_resume_equals_uninterrupted(tiny_pipe_dir, likes, tmp_path, capsys):
    """A SIGKILL at the last moment of a save (the checkpoint whole and on disk, its folder not yet renamed): resume
    takes the one before it, never the unnamed one, and ends where a run that never stopped ends."""
    cache = tmp_path / "cache"
    train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "ref", cache, "--max_steps", "3", "--lora_rank", "4"))
    out = tmp_path / "out"
    run_killed_at("train_kto.py", args_for(tiny_pipe_dir, likes, out, cache, "--max_steps", "3", "--lora_rank", "4"),
                  "os.rename", "step_0000002.tmp")
    root = out / "checkpoints"
    assert open(root / "latest").read() == "step_0000001"
    [unnamed] = [d for d in os.listdir(root) if d.startswith("step_0000002")]
    assert ".tmp" in unnamed and "state.json" in os.listdir(root / unnamed)
    capsys.readouterr()
    train_kto.main(args_for(tiny_pipe_dir, likes, out, cache, "--max_steps", "3", "--lora_rank", "4", "--resume"))
    assert f"resumed from {root / 'step_0000001'} (step 1)" in capsys.readouterr().out
    assert not any(".tmp" in d for d in os.listdir(root))
    a = load_file(str(tmp_path / "ref" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise on the CPU


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tiny_pipe_dir, likes, tmp_path):
    """torchrun with 2 gloo ranks x 2 images against 1 process x 4 images: the same global batch, no
    accumulation, so the all-reduced reference point agrees (1e-6 absolute; other tolerances: assert_same_run)."""
    from test_train_dpo import assert_same_run
    cache = tmp_path / "cache"
    train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "one", cache, "--max_steps", "3", "--micro_batch", "4", "--lr", "1e-4"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    proc = subprocess.run(torchrun("train_kto.py", *args_for(tiny_pipe_dir, likes, tmp_path / "two", cache, "--max_steps", "3",
                                                             "--lr", "1e-4")),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for r1, r2 in zip(records(tmp_path / "one"), records(tmp_path / "two")):
        # r = e_ref - e_theta is a difference of two errors near 1, so its float noise is absolute (~1e-7);
        # a rank-local instead of global mean would be off by the spread between ranks (~1e-3)
        assert r1["ref_point"] == pytest.approx(r2["ref_point"], abs=1e-6)
    a = load_file(str(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(os.path.join(tiny_pipe_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert_same_run(tmp_path / "one", tmp_path / "two", a, b, base, lr=1e-4, steps=3)


def test_step_zero_loss_and_a_reference_point_that_moves(tiny_pipe_dir, likes, tmp_path):
    """The trainer's own log: at step 1 the policy is the reference, so every reward is 0 and the sigmoid loss
    is 1 - sigmoid(0) = 0.5 exactly; as liked images get easier for the policy the batch's mean reward turns
    positive and z_ref = max(0, mean r) follows it (one micro-batch a step, so it is that step's reward_d)."""
    out = tmp_path / "out"
    train_kto.main(args_for(tiny_pipe_dir, likes, out, tmp_path / "cache", "--max_steps", "6", "--micro_batch", "4",
                            "--desirable_share", "1.0", "--lr", "3e-3"))
    log = records(out)
    assert log[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert log[0]["ref_point"] == 0.0 and log[0]["reward_d"] == pytest.approx(0.0, abs=1e-7)
    for r in log:
        assert r["ref_point"] == pytest.approx(max(0.0, r["reward_d"]), abs=1e-7)
    assert max(r["ref_point"] for r in log) > 1e-4, [r["ref_point"] for r in log]


@pytest.mark.parametrize("lora", [0, 4])
def test_init_from_starts_the_policy_from_a_checkpoint_against_the_base(tiny_pipe_dir, likes, tmp_path, lora):
    """--init_from: the policy starts from a checkpoint's weights, the reference stays --pretrained. So at the
    first step the policy already differs from the reference (rewards are not 0, unlike a fresh run's first
    step), and a rank that does not match the checkpoint's gets one line."""
    cache, rank = tmp_path / "cache", ["--lora_rank", str(lora)]
    train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "first", cache, "--max_steps", "2", "--lr", "3e-3", *rank))
    ckpt = str(tmp_path / "first" / "checkpoints" / "step_0000002")
    train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "second", cache, "--max_steps", "1", "--init_from", ckpt, *rank))
    first, second = records(tmp_path / "first")[0], records(tmp_path / "second")[0]
    assert first["reward_d"] == pytest.approx(0.0, abs=1e-7)  # a fresh run: policy == reference at step 1
    assert abs(second["reward_d"]) > 1e-5  # started from the checkpoint: policy != reference at step 1
    assert second["policy_err_d"] != first["policy_err_d"] and second["ref_err_d"] == pytest.approx(first["ref_err_d"], abs=1e-6)
    with pytest.raises(SystemExit, match="--lora_rank"):
        train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "third", cache, "--max_steps", "1", "--init_from", ckpt,
                                "--lora_rank", "0" if lora else "4"))


def test_continue_from_carries_the_optimizer_and_the_schedule_on(tiny_pipe_dir, likes, tmp_path):
    """--continue_from: a second run goes on where the first stopped, its weights, its AdamW state (moments and
    step count) and its place in the learning-rate schedule, so a chain of runs warms up once (online_kto.py's
    rounds); --init_from, by contrast, takes the weights alone and warms up again."""
    cache = tmp_path / "cache"
    ckpt = lambda run, step: str(tmp_path / run / "checkpoints" / f"step_{step:07d}")
    adam_steps = lambda folder: {float(v) for k, v in load_file(os.path.join(folder, "optimizer.safetensors")).items()
                                 if k.endswith(".step")}
    warm = ["--max_steps", "2", "--warmup_steps", "5"]
    train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "first", cache, *warm))
    train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "second", cache, *warm, "--continue_from", ckpt("first", 2)))
    train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "third", cache, *warm, "--continue_from", ckpt("second", 2)))
    train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "again", cache, *warm, "--init_from", ckpt("first", 2)))
    lrs = {run: [r["lr"] for r in records(tmp_path / run)] for run in ("first", "second", "third", "again")}
    assert lrs["first"] == pytest.approx([2e-4, 4e-4]) and lrs["second"] == pytest.approx([6e-4, 8e-4])
    assert lrs["third"] == pytest.approx([1e-3, 1e-3]) and lrs["again"] == lrs["first"]
    assert adam_steps(ckpt("second", 1)) == {3} and adam_steps(ckpt("third", 2)) == {6} and adam_steps(ckpt("again", 2)) == {2}
    first, second = load_file(os.path.join(ckpt("first", 2), "optimizer.safetensors")), \
        load_file(os.path.join(ckpt("second", 1), "optimizer.safetensors"))
    fresh = load_file(os.path.join(ckpt("first", 1), "optimizer.safetensors"))
    # AdamW after one step from zero moments: exp_avg^2 / exp_avg_sq = (1 - beta1)^2 / (1 - beta2) = 10 wherever the
    # gradient is not 0; the continued run's first step started from the first run's moments, so it is not that
    for state, want in ((fresh, True), (second, False)):
        m, v = state["0.exp_avg"], state["0.exp_avg_sq"]
        ratio = (m[v > 0] ** 2 / v[v > 0])
        assert torch.allclose(ratio, torch.full_like(ratio, 10.0), rtol=1e-3) == want
    assert not torch.equal(first["0.exp_avg"], second["0.exp_avg"])
    with pytest.raises(SystemExit, match="give one"):
        train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "both", cache, "--max_steps", "1",
                                "--init_from", ckpt("first", 2), "--continue_from", ckpt("first", 2)))
    with pytest.raises(SystemExit, match="--optimizer adamw, this run has --optimizer adafactor"):
        train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "other", cache, "--max_steps", "1", "--optimizer",
                                "adafactor", "--continue_from", ckpt("first", 2)))
