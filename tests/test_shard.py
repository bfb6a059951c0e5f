"""--shard: full fine-tunes sharded with FSDP2 over torchrun's processes, on the CPU under gloo.

    python -m pytest -q tests/test_shard.py            # default suite: the memory plan, the refusal, one process
    python -m pytest -q tests/test_shard.py -m slow    # torchrun --nproc_per_node=2 against one process and DDP

A sharded run must be the run it replaces: the same losses (to fp32 rounding) and weights as one process and as
DDP, the reference bitwise the policy at step 0 under bf16 too, a kill and --resume bitwise an uninterrupted run,
checkpoints and the export the files a DDP run writes.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import bench  # tools/bench.py (conftest puts tools/ on the path)
import train_dpo
import train_kto
from conftest import ROOT, torchrun
import test_precision
from test_train_dpo import args_for, assert_same_run, records, unet_weights, wait_for_checkpoint

trained_dir = test_precision.trained_dir  # a fixture: the tiny UNet moved off its initialisation


def launch(script, args, nproc=2, stdout=subprocess.PIPE, twin=True, **kw):
    """`script` under torchrun on the CPU (gloo, conftest.torchrun), one thread a process; returns the Popen
    (output in .stdout)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    return subprocess.Popen(torchrun(script, *args, nproc=nproc, twin=twin), env=env, stdout=stdout,
                            stderr=subprocess.STDOUT, text=True, **kw)


def process_tree(pid):
    """pid and every process under it (Linux /proc): torchrun starts its workers in sessions of their own, so killing
    its process group would leave them running."""
    kids = []
    for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return [pid] + [p for k in kids for p in process_tree(k)]


def finish(proc):
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-4000:]
    return output


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, names in os.walk(folder) for f in names
                  if not os.path.relpath(root, folder).startswith(("checkpoints", "val")) and f != "log.jsonl")


# ------------------------------------------------------------------------------------------------
# default suite

def test_memory_plan_of_sdxl_sharded_over_8(capsys):
    """bench.py --plan_only prints the trainers' memory plan (model.memory_plan) from SDXL's real UNet configuration:
    unsharded the README's 47.8 / 29.6 GB, sharded over 8 processes 1/8 of each part plus what is gathered in flight."""
    def plan(*extra):
        bench.main(["--size", "sdxl", "--lora_rank", "0", "--plan_only", *extra])
        lines = capsys.readouterr().out.strip().splitlines()
        return lines[0], {m[1]: float(m[2]) for m in (re.match(r"\s+(.*?)\s+([\d.]+) GB$", line) for line in lines[1:])}
    head, adamw = plan()
    assert head == "memory plan per process (sdxl, bf16):" and adamw["total before activations"] == 47.82
    head, adamw8 = plan("--shard", "8")
    assert head == "memory plan per process (sdxl, bf16, sharded over 8 processes):"
    assert adamw8["UNet weights (fp32, 1/8 each)"] == adamw8["gradients (fp32, 1/8 each)"] == 1.20  # 9.56 / 8
    assert adamw8["adamw state (1/8)"] == 2.39
    flight = "in flight (gathered): root + up_blocks.0.resnets.0, its grads, next unit"  # not up_blocks.0 (1.2B)
    assert adamw8[flight] == 0.58 and adamw8["reference: frozen fp32 copy sharded like the policy (exact at step 0)"] == 1.20
    assert adamw8["total before activations"] == 6.55
    _, factor = plan("--optimizer", "adafactor")
    _, factor8 = plan("--optimizer", "adafactor", "--shard", "8")
    assert factor["total before activations"] == 29.60 and factor8["total before activations"] == 4.28
    assert factor8["adafactor state (1/8, matrices' column moments whole)"] == 0.12  # 0.91 unsharded


def test_shard_refuses_lora_and_one_process_runs_unsharded(tiny_pipe_dir, pickapic, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--shard is for full fine-tunes"):
        train_dpo.main(args_for(tiny_pipe_dir, pickapic, tmp_path / "lora", tmp_path / "cache", "--max_steps", "1",
                                "--lora_rank", "4", "--shard"))
    common_args = ("--max_steps", "2", "--save_every", "0")
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, tmp_path / "plain", tmp_path / "cache", *common_args))
    capsys.readouterr()
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, tmp_path / "shard", tmp_path / "cache", *common_args, "--shard"))
    assert "--shard with one process: nothing to shard" in capsys.readouterr().out
    strip = lambda rs: [{k: v for k, v in r.items() if k != "pairs/s"} for r in rs]
    assert strip(records(tmp_path / "plain")) == strip(records(tmp_path / "shard"))
    a, b = unet_weights(str(tmp_path / "plain")), unet_weights(str(tmp_path / "shard"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# torchrun --nproc_per_node=2 (slow suite)

@pytest.mark.slow
def test_sharded_dpo_equals_one_rank_and_ddp(tiny_pipe_dir, pickapic, tmp_path):
    """The same global batch of 4 pairs three ways: one process (1 pair x 4 accumulation steps), DDP and --shard
    (2 processes x 1 pair x 2 accumulation steps; sharded with --grad_checkpointing and a validation grid too).
    Sharded = one process = DDP (assert_same_run's tolerances); its checkpoint and export are DDP's files, and the
    export loads in diffusers and generates."""
    from diffusers import StableDiffusionPipeline
    cache = tmp_path / "cache"
    run = ("--max_steps", "3", "--micro_batch", "1", "--lr", "1e-4", "--beta", "100")
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, tmp_path / "one", cache, *run))
    ddp = launch(os.path.join(ROOT, "train_dpo.py"), args_for(tiny_pipe_dir, pickapic, tmp_path / "ddp", cache, *run))
    finish(ddp)
    output = finish(launch(os.path.join(ROOT, "train_dpo.py"), args_for(
        tiny_pipe_dir, pickapic, tmp_path / "shard", cache, *run, "--shard", "--grad_checkpointing", "--val_every", "3",
        "--val_seeds", "1", "--val_steps", "2", "--val_prompts", "a red square")))
    assert "4 pairs = 2 x micro-batch 1 x 2 accumulation steps" in output and "sharded over the processes (FSDP2)" in output
    assert "memory plan per process (sd, fp32, sharded over 2 processes)" in output
    first = records(tmp_path / "shard")[0]  # the sharded reference is bitwise the policy: log 2 in fp32, margin 0
    assert first["loss"] == float(torch.tensor(math.log(2))) and first["reward_margin"] == 0.0
    base = unet_weights(tiny_pipe_dir)
    shard = unet_weights(str(tmp_path / "shard"))
    assert_same_run(tmp_path / "one", tmp_path / "shard", unet_weights(str(tmp_path / "one")), shard, base, 1e-4, 3)
    assert_same_run(tmp_path / "ddp", tmp_path / "shard", unet_weights(str(tmp_path / "ddp")), shard, base, 1e-4, 3)
    # the checkpoint: the same files, tensors, shapes and optimizer settings as DDP's
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(str(tmp_path / run_ / "checkpoints" / "step_0000003" / name)) for run_ in ("ddp", "shard"))
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    a, b = (json.loads((tmp_path / run_ / "checkpoints" / "step_0000003" / "state.json").read_text()) for run_ in ("ddp", "shard"))
    assert a["param_groups"] == b["param_groups"] and a["optimizer_scalars"] == b["optimizer_scalars"]
    # the export: DDP's layout, the same configs, loads and generates; rank 0 wrote the validation grid
    assert files_under(str(tmp_path / "shard")) == files_under(str(tmp_path / "ddp"))
    for f in files_under(str(tmp_path / "ddp")):
        if f.endswith(".json"):
            assert (tmp_path / "shard" / f).read_text() == (tmp_path / "ddp" / f).read_text(), f
    image = StableDiffusionPipeline.from_pretrained(str(tmp_path / "shard"))(
        "a red square", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and (tmp_path / "shard" / "val" / "step_0000003.png").exists()


@pytest.mark.slow
def test_sharded_kto_equals_one_rank(tiny_pipe_dir, pickapic, tmp_path):
    """KTO with the mismatched reference point (one more no-grad forward of the sharded policy and reference between
    its forward and backward): 2 processes sharded x 2 images x 2 accumulation steps = one process x 2 x 4. And the
    one process's step-2 checkpoint, resumed sharded for step 3, ends where the one process ended."""
    cache = tmp_path / "cache"
    run = ("--max_steps", "3", "--global_batch", "8", "--micro_batch", "2", "--lr", "1e-4", "--beta", "100",
           "--ref_point", "mismatched", "--desirable_share", "0.5")
    train_kto.main(args_for(tiny_pipe_dir, pickapic, tmp_path / "one", cache, *run))
    finish(launch(os.path.join(ROOT, "train_kto.py"), args_for(tiny_pipe_dir, pickapic, tmp_path / "shard", cache, *run,
                                                                  "--shard")))
    first = records(tmp_path / "shard")[0]
    assert (first["reward_d"], first["reward_u"], first["ref_point"]) == (0.0, 0.0, 0.0)
    one, base = unet_weights(str(tmp_path / "one")), unet_weights(tiny_pipe_dir)
    assert_same_run(tmp_path / "one", tmp_path / "shard", one, unet_weights(str(tmp_path / "shard")), base, 1e-4, 3)
    # a one-process checkpoint is what a sharded run resumes: the same files
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "one", mixed)
    shutil.rmtree(mixed / "checkpoints" / "step_0000003")
    (mixed / "checkpoints" / "latest").write_text("step_0000002")
    (mixed / "log.jsonl").write_text("".join((tmp_path / "one" / "log.jsonl").read_text().splitlines(keepends=True)[:2]))
    output = finish(launch(os.path.join(ROOT, "train_kto.py"), args_for(tiny_pipe_dir, pickapic, mixed, cache, *run,
                                                                           "--shard", "--resume")))
    assert "(step 2)" in output and [r["step"] for r in records(mixed)] == [1, 2, 3]
    assert_same_run(tmp_path / "one", mixed, one, unet_weights(str(mixed)), base, 1e-4, 3)


@pytest.mark.slow
def test_sharded_kill_and_resume_is_bitwise(tiny_pipe_dir, pickapic, tmp_path):
    """SIGKILL a sharded run (both ranks and torchrun) after its second checkpoint, resume it sharded, and compare
    with a sharded run that never stopped: bitwise. Then one process resumes the sharded checkpoint: the same files."""
    cache = tmp_path / "cache"
    script = os.path.join(ROOT, "train_dpo.py")
    finish(launch(script, args_for(tiny_pipe_dir, pickapic, tmp_path / "ref", cache, "--max_steps", "5", "--shard")))
    out = tmp_path / "out"
    with open(tmp_path / "killed.log", "w") as log:  # a file, not a pipe nobody reads while it runs
        proc = launch(script, args_for(tiny_pipe_dir, pickapic, out, cache, "--max_steps", "50", "--shard"), stdout=log)
    latest = wait_for_checkpoint(out, proc, "step_0000002")
    for pid in reversed(process_tree(proc.pid)):  # both ranks, then torchrun: no process is left to finish a save
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text()
    assert "step_00000" in killed_at and int(killed_at[5:]) < 5, killed_at
    output = finish(launch(script, args_for(tiny_pipe_dir, pickapic, out, cache, "--max_steps", "5", "--shard",
                                              "--resume")))
    assert f"resumed from {out / 'checkpoints' / killed_at}" in output
    a, b = unet_weights(str(tmp_path / "ref")), unet_weights(str(out))
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed from {killed_at}: weights differ"
    train_dpo.main(args_for(tiny_pipe_dir, pickapic, out, cache, "--max_steps", "6", "--resume"))
    assert [r["step"] for r in records(out)][-1] == 6


ADAFACTOR_CHECK = r'''
import sys, torch, torch.distributed as dist
from types import SimpleNamespace
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
import parallel
dist.init_process_group("gloo")
mesh, ctx = init_device_mesh("cpu", (2,)), SimpleNamespace(shard=True, master=dist.get_rank() == 0)
# uneven and empty shards (rank 1 holds no row of a (1, 4) weight), matrices, vectors, conv weights
shapes = [(4, 3), (5, 3), (1, 4), (3, 7), (5,), (1,), (3, 2, 3, 3), (1, 3, 2, 2), (4, 8, 1, 1)]
g = torch.Generator().manual_seed(0)
start = [torch.randn(s, generator=g) for s in shapes]
grads = [[torch.randn(s, generator=g) * (k + 1) for s in shapes] for k in range(4)]
shard = lambda t: torch.nn.Parameter(distribute_tensor(t.detach().clone(), mesh, [Shard(0)]))
plain, sharded = [torch.nn.Parameter(w.clone()) for w in start], [shard(w) for w in start]
reference, ours = parallel.make_optimizer("adafactor", plain, 0.1, 0.01), parallel.make_optimizer("adafactor", sharded, 0.1, 0.01)
assert type(reference).__name__ == "Adafactor" and type(ours).__name__ == "ShardedAdafactor"

def step(k, params, opt, sharded):
    for p, grad in zip(params, grads[k]):
        p.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)]) if sharded else grad.clone()
    opt.step()
    opt.zero_grad(set_to_none=True)
for k in range(2):
    step(k, plain, reference, False)
    step(k, sharded, ours, True)
# a checkpoint's round trip: gathered whole on rank 0, read by every rank, cut back into shards by a new optimizer
_, saved = parallel.checkpoint_state({}, ours, ctx)
saved = [saved]
dist.broadcast_object_list(saved, src=0)
resumed = [shard(p.full_tensor()) for p in sharded]
again = parallel.make_optimizer("adafactor", resumed, 0.1, 0.01)
parallel.load_optimizer_state(again, saved[0])
for k in range(2, 4):
    step(k, plain, reference, False)
    step(k, sharded, ours, True)
    step(k, resumed, again, True)
for s, a, b, c, w in zip(shapes, plain, sharded, resumed, start):
    b, c = b.full_tensor(), c.full_tensor()
    assert (a - b).abs().max() < 1e-6 * (a - w).abs().max() * 10, (s, (a - b).abs().max())
    assert torch.equal(b, c), s
state, whole = reference.state_dict()["state"], parallel.checkpoint_state({}, ours, ctx)[1]["state"]
if ctx.master:  # transformers' keys and shapes: the file a DDP run writes
    assert all({k: getattr(v, "shape", v) for k, v in state[i].items()} == {k: getattr(v, "shape", v) for k, v in whole[i].items()}
               for i in state)
    print("adafactor check passed")
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_sharded_adafactor_is_transformers_adafactor(tmp_path):
    """ShardedAdafactor against transformers' Adafactor on the same gradients, over uneven and empty shards: the same
    weights to fp32 rounding, the same state keys and shapes; a gathered state loaded by a new optimizer continues
    bitwise."""
    script = tmp_path / "adafactor_check.py"
    script.write_text(ADAFACTOR_CHECK)
    assert "adafactor check passed" in finish(launch(str(script), [], twin=False))  # its tensors are made on the CPU


@pytest.mark.slow
def test_sharded_bf16_step_one_is_exact(trained_dir, pickapic, tmp_path):
    """--precision bf16 under --shard, with checkpointing and accumulation: step 1's DPO loss is log 2 and KTO's rewards
    are 0, exactly, on a UNet whose outputs are not trivial; step 2 has moved away from the reference."""
    run = ("--max_steps", "2", "--precision", "bf16", "--micro_batch", "1", "--beta", "5000", "--shard",
           "--grad_checkpointing", "--save_every", "0")
    finish(launch(os.path.join(ROOT, "train_dpo.py"), args_for(trained_dir, pickapic, tmp_path / "dpo", tmp_path / "c", *run)))
    first, second = records(tmp_path / "dpo")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)  # -log sigmoid(0) in fp32: log 2 within an fp32 ulp
    assert first["reward_margin"] == 0.0 and first["implicit_acc"] == 0.0 and second["reward_margin"] != 0.0
    finish(launch(os.path.join(ROOT, "train_kto.py"), args_for(trained_dir, pickapic, tmp_path / "kto", tmp_path / "c", *run,
                                                                  "--global_batch", "8", "--desirable_share", "0.5")))
    first, second = records(tmp_path / "kto")
    assert 0 < first["desirable_share"] < 1
    assert (first["reward_d"], first["reward_u"], first["ref_point"]) == (0.0, 0.0, 0.0) and second["reward_d"] != 0.0
