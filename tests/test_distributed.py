"""The multi-GPU node as users run it, checked on the CPU: NCCL's placement rule (tests/device_twin.py), KTO's
reference point over the global batch at any split of a step, and a few things every multi-process run needs.

    python -m pytest -q tests/test_distributed.py            # default suite
    python -m pytest -q tests/test_distributed.py -m slow    # torchrun with 2 and 4 ranks: gradients at every split
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import common
from conftest import ROOT, torchrun
from test_train_kto import likes  # noqa: F401 (a fixture)
from losses import kto_reference_point


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_collectives(rank, world, port, out):
    import torch.distributed as dist
    from device_twin import install
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    install()
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))  # a model's weight: on the device
    errors = (w * (rank + 1)).pow(2)  # (3,) per-sample values computed from it, as a loss function's
    meter = common.Meter()
    meter.add({"loss": errors.mean(), "err_d": torch.where(errors > 2, errors, torch.full_like(errors, float("nan")))})
    meter.add({"loss": errors.mean() * 2, "err_d": errors})
    step = meter.reduce()  # what the trainers call every step
    z = kto_reference_point(errors - 5, reduce_sum=common.all_reduce_sum)
    common.barrier()
    refused = []
    for host in (torch.ones(2), errors.detach().cpu(), torch.stack([errors.sum(), errors.mean()]).cpu(),
                 errors.detach().to("cpu")):
        try:
            common.all_reduce_sum(host)
        except RuntimeError as e:
            refused.append("No backend type associated with device type cpu" in str(e))
    out[rank] = {"step": step, "window": meter.window(), "z": z.item(), "refused": refused}
    dist.destroy_process_group()


def test_collectives_get_tensors_on_the_process_device():
    """Under the device twin the trainers' collectives (Meter.reduce, the KTO reference point, the barrier) run, and
    tensors placed on the host (a factory without device=, .cpu(), .to("cpu")) are refused as NCCL refuses them:
    this test fails on a Meter that all-reduces `torch.stack(...).cpu()`."""
    out = mp.Manager().dict()
    mp.spawn(_rank_collectives, args=(2, free_port(), out), nprocs=2, join=True)
    assert out[0]["refused"] == [True] * 4 and out[1]["refused"] == [True] * 4
    # rank 0's errors are (1, 4, 9), rank 1's (4, 16, 36): means over samples of both ranks and both micro-steps
    e = [1.0, 4.0, 9.0, 4.0, 16.0, 36.0]
    assert out[0]["step"]["loss"] == pytest.approx((sum(e[:3]) / 3 * 3 + sum(e[3:]) / 3 * 3) / 4)
    kept = [x for x in e if x > 2] + e  # NaN entries are not samples of the metric: 5 + 6 of them
    assert out[0]["step"]["err_d"] == pytest.approx(sum(kept) / len(kept))
    assert out[0]["window"] == out[0]["step"] and out[1]["step"] == out[0]["step"]
    assert out[0]["z"] == pytest.approx(sum(x - 5 for x in e) / 6)


SPLITS = {"1x8": (1, 8), "1x2x4": (1, 2), "1x1x8": (1, 1), "2x2x2": (2, 2), "4x2": (4, 2)}  # processes x micro-batch


@pytest.mark.slow
@pytest.mark.parametrize("ref_point", ["batch", "mismatched"])
def test_a_kto_step_has_one_gradient_at_every_split(tiny_pipe_dir, likes, tmp_path, monkeypatch, ref_point):
    """The same 8 images, the same weights, one step: 1 process x 8 images, 1 x 2 x 4 accumulation steps (the
    one-GPU default split), 1 x 1 x 8, 2 processes x 2 x 2 and 4 x 2 (the paper's run) give the same gradient
    and log the same metrics, because z_ref is the mean reward over the whole global batch. The policy starts
    from a checkpoint, so it differs from the reference and z_ref is not 0 (else every split would agree)."""
    import device_twin
    import train_kto
    from safetensors.torch import load_file
    from test_train_kto import args_for, records
    cache = tmp_path / "cache"
    train_kto.main(args_for(tiny_pipe_dir, likes, tmp_path / "init", cache, "--max_steps", "2", "--lr", "3e-3",
                            "--desirable_share", "1.0"))  # liked images get easier: the mean reward turns positive
    step = ["--max_steps", "1", "--global_batch", "8", "--init_from", str(tmp_path / "init" / "checkpoints" / "step_0000002"),
            "--ref_point", ref_point, "--desirable_share", "0.5"]
    grads, logs = {}, {}
    for name, (procs, micro) in SPLITS.items():
        out = tmp_path / name
        argv = args_for(tiny_pipe_dir, likes, out, cache, *step, "--micro_batch", str(micro))
        if procs == 1:
            monkeypatch.setattr(common, "clip_gradients", common.clip_gradients)  # restored after the test
            os.makedirs(out)
            device_twin._dump_gradients(str(out))
            train_kto.main(argv)
        else:
            env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, DEVICE_TWIN_GRADS=str(out))
            os.makedirs(out)
            proc = subprocess.run(torchrun("train_kto.py", *argv, nproc=procs), env=env, capture_output=True, text=True,
                                  timeout=900)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        grads[name] = load_file(str(out / "grads_rank0.safetensors"))
        (logs[name],) = records(out)
    ref, ref_log = grads["1x8"], logs["1x8"]
    assert ref_log["ref_point"] > 1e-5  # the policy differs from the reference: the split could matter
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(g, key=int)])
    for name in SPLITS:
        g = flat(grads[name])
        diff = (g - flat(ref)).abs().max().item()
        assert diff <= 1e-5 * flat(ref).abs().max().item(), (name, diff, flat(ref).abs().max().item())  # fp32 rounding
        for key in ("loss", "ref_point", "reward_acc", "reward_d", "reward_u", "policy_err_d", "policy_err_u", "desirable_share"):
            assert logs[name][key] == pytest.approx(ref_log[key], rel=1e-5, abs=1e-7), (name, key)


@pytest.mark.slow
def test_the_gpu_check_prints_its_table(tmp_path):
    """tools/gpu_check.py, the one command a person with a CUDA GPU runs, runs here on the CPU with tiny models:
    every run of its table (2-process ones included) finishes, exact at step 1."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--dry_run", "--out", str(tmp_path),
                           "--steps", "3"], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with open(tmp_path / "gpu_check.md") as f:
        rows = [line for line in f if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 10 and all("| yes |" in row for row in rows), rows
