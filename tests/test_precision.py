"""--precision: bf16 runs the same code path on the CPU (autocast) as on CUDA, and the reference reproduces the
policy exactly at step 0 in every precision, on a model whose outputs are not trivial.

    python -m pytest -q tests/test_precision.py
"""
import copy
import json
import math
import os
import shutil

import pytest
import torch

import common
import train_dpo
import train_kto
from conftest import write_pickapic
from losses import add_noise_and_target, per_sample_error
from model import denoise, load_models, prepare_policy


@pytest.fixture(scope="module")
def trained_dir(tiny_pipe_dir, tmp_path_factory):
    """The tiny pipeline with its UNet moved off its initialisation, like a trained model. A fresh diffusers UNet
    starts with conv_out at zero, predicts ~0 whatever its precision, and so hides what this file tests."""
    from diffusers import UNet2DConditionModel
    path = str(tmp_path_factory.mktemp("trained"))
    shutil.copytree(tiny_pipe_dir, path, dirs_exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g) * (p.std() if p.numel() > 1 and p.std() > 0 else 0.1))
    unet.save_pretrained(os.path.join(path, "unet"))
    return path


def args_for(pipe, data, out, cache, *extra):
    return ["--pretrained", pipe, "--data", data, "--out_dir", str(out), "--cache_dir", str(cache),
            "--resolution", "32", "--global_batch", "4", "--micro_batch", "4", "--val_every", "-1",
            "--log_every", "1", "--save_every", "0", "--lr", "1e-4", "--warmup_steps", "1", "--beta", "5000", *extra]


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_bf16_held_reference_is_not_the_policy_but_ours_is(trained_dir):
    """Why the reference is held in fp32: under bf16 autocast a bf16 copy of the weights gives other errors than
    the fp32 weights it was copied from (beta 5000 makes that a fake preference); the trainers' reference gives
    bitwise the policy's errors."""
    ctx = common.setup(0, "bf16")
    models = load_models(trained_dir, ctx)
    unet = models.unet
    bf16_copy = copy.deepcopy(unet).to(torch.bfloat16)
    _, reference = prepare_policy(unet, 0, False, ctx)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 4, 16, 16, generator=g), torch.randn(8, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    cond = {"encoder_hidden_states": torch.randn(8, 77, 16, generator=g)}
    x_t, target = add_noise_and_target(models.noise_scheduler, x0, eps, t)
    with ctx.autocast(), torch.no_grad():
        policy = per_sample_error(denoise(unet, x_t, t, cond), target)
        ours = per_sample_error(reference(x_t, t, cond), target)
        held_bf16 = per_sample_error(denoise(bf16_copy, x_t, t, cond), target)
    assert torch.equal(ours, policy)
    assert (held_bf16 - policy).abs().max() > 1e-4, (held_bf16 - policy).abs().max()
    u = -0.5 * 5000 * ((held_bf16[:4] - held_bf16[4:]) - (policy[:4] - policy[4:]))  # what DPO would see at step 0
    assert u.abs().mean() > 0.05


@pytest.mark.parametrize("lora", [0, 4])
def test_bf16_step_one_is_exact(trained_dir, tmp_path, lora, capsys):
    """--precision bf16 on the CPU: the step-1 DPO loss is log 2 and KTO's rewards are 0, exactly."""
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=8)
    extra = ("--max_steps", "2", "--precision", "bf16", "--lora_rank", str(lora))
    train_dpo.main(args_for(trained_dir, pairs, tmp_path / "dpo", tmp_path / "cache", *extra))
    printed = capsys.readouterr().out
    assert "bf16 autocast on cpu, fp32 trainable weights and full reference" in printed
    assert "memory plan per process (sd, bf16)" in printed
    assert ("UNet weights, frozen (bf16)" in printed) == bool(lora)  # LoRA holds its frozen base in bf16
    first = records(tmp_path / "dpo")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)  # -log sigmoid(0) in fp32: log 2 within an fp32 ulp
    assert first["reward_margin"] == 0.0 and first["implicit_acc"] == 0.0
    train_kto.main(args_for(trained_dir, pairs, tmp_path / "kto", tmp_path / "cache", *extra, "--desirable_share", "0.5"))
    first = records(tmp_path / "kto")[0]
    assert 0 < first["desirable_share"] < 1  # both classes in the first batch
    assert (first["reward_d"], first["reward_u"], first["ref_point"]) == (0.0, 0.0, 0.0)
    assert first["loss"] == pytest.approx(0.5, abs=1e-7)
    # and it trains: the second step has moved the policy away from the reference
    assert records(tmp_path / "kto")[1]["reward_d"] != 0.0


def test_fp32_and_bf16_agree_roughly(trained_dir, tmp_path):
    """The same run in both precisions: bf16 is another rounding of the same computation, not another model."""
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=8)
    for p in ("fp32", "bf16"):
        train_dpo.main(args_for(trained_dir, pairs, tmp_path / p, tmp_path / "cache", "--max_steps", "1", "--precision", p))
    a, b = records(tmp_path / "fp32")[0], records(tmp_path / "bf16")[0]
    assert a["policy_err_w"] == pytest.approx(b["policy_err_w"], rel=0.05)
    assert a["policy_err_w"] != b["policy_err_w"]


def test_lora_under_bf16_holds_its_base_in_bf16_and_its_adapters_in_fp32(trained_dir):
    ctx = common.setup(0, "bf16")
    unet = load_models(trained_dir, ctx).unet
    params, _ = prepare_policy(unet, 4, False, ctx)
    assert params and all(p.dtype == torch.float32 for p in params)
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
