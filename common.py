"""What both trainers repeat: processes and devices, per-sample draws, the schedule, logging, the flags they
share. How processes share the model (DDP or --shard) and the optimizers are in parallel.py; checkpoints in
checkpoints.py; the one-line errors and whole-or-absent files every script uses in files.py.

Plain functions, no trainer class, no import of the other modules here (they import this one): each
trainer shows its own loop and calls these for the mechanics.
"""
import json
import math
import os
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist

from files import PRECISIONS, fail  # common.fail: a trainer needs one import for the mechanics and its errors


# ------------------------------------------------------------------------------------------------
# processes, device, precision



def resolve_precision(precision, cuda):
    """--precision auto is bf16 on CUDA and fp32 on the CPU; bf16 and fp32 are taken as asked, on either."""
    if precision not in PRECISIONS:
        fail(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return ("bf16" if cuda else "fp32") if precision == "auto" else precision


def autocast_for(device, precision):
    """The context every forward runs in: bf16 autocast (CUDA or CPU, the same code path) or nothing (fp32)."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


DIST_TIMEOUT_MINUTES = 30


def setup(seed, precision="auto", timeout_minutes=DIST_TIMEOUT_MINUTES):
    """Read torchrun's environment; nccl on CUDA, gloo on CPU, so the same code is testable without a GPU.

    Precision (--precision; auto = bf16 on CUDA, fp32 on the CPU): under bf16, trainable weights (and the
    full fine-tune's reference, see model.prepare_policy) stay fp32 and forwards run under bf16 autocast
    (bf16 has fp32's range, so no loss scaling); the text encoders, the VAE where its config allows and a
    LoRA run's frozen UNet are held in bf16. On the CPU bf16 runs the same path under CPU autocast
    (a real speed-up where the CPU has avx512_bf16), so the tests exercise it; fp32 is exact everywhere.

    NCCL's one device is CUDA: every tensor handed to a collective must live on ctx.device (a CPU tensor
    raises "No backend type associated with device type cpu"), and tests/device_twin.py checks this on the
    CPU. The process-group timeout (--dist_timeout, 30 minutes; NCCL's default is 10) bounds how long ranks
    wait for each other: the longest wait by design is the others waiting at a barrier while rank 0 writes
    a checkpoint (a full SDXL fine-tune with AdamW: 31 GB written and hashed) or draws a validation grid.
    """
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    cuda = torch.cuda.is_available()
    precision = resolve_precision(precision, cuda)
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if world > 1:
        from datetime import timedelta
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    torch.manual_seed(seed)
    ctx = SimpleNamespace(rank=rank, world=world, master=rank == 0, device=device, cuda=cuda, precision=precision,
                          dtype=torch.bfloat16 if precision == "bf16" else torch.float32, shard=False)  # shard: use_sharding
    ctx.autocast = autocast_for(device, precision)
    ctx.say = print if ctx.master else (lambda *a, **k: None)  # rank 0 alone prints
    return ctx


def all_reduce_sum(t):
    """Sum a tensor over ranks (identity in one process). Every rank must call it, with `t` on its device."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def barrier():
    """Wait for every rank. NCCL is told the device (without it, it guesses one from the rank)."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def accumulation(global_batch, micro_batch, world):
    """The config states the global batch; the accumulation steps follow from it."""
    if global_batch % (micro_batch * world):
        fail(f"--global_batch {global_batch} is not a multiple of --micro_batch {micro_batch} x {world} processes")
    return global_batch // (micro_batch * world)


MAX_PASSES_PER_STEP = 4


def check_batch_against_data(global_batch, n, unit, say=print):
    """A step of more samples than the data holds draws them several times over: warn. Past MAX_PASSES_PER_STEP
    passes a step, stop with one line, before any model loads: the papers' batches (DPO's 2048 pairs a step) on a
    hobbyist's few hundred labels would spend every step on repeats (and hours on a single one)."""
    if n == 0 or global_batch <= n:
        return
    passes = global_batch / n
    if passes > MAX_PASSES_PER_STEP:
        fail(f"--global_batch {global_batch} draws each of the data's {n} {unit} {passes:.1f} times in every step; set "
             f"--global_batch to at most {n} (a few hundred {unit}: --global_batch 8, see the README's 'Fine-tune SD1.5 "
             f"on your likes')")
    say(f"warning: --global_batch {global_batch} is more than the data's {n} {unit}: each step draws them "
        f"{passes:.1f} times over")


def describe_setup(ctx, global_batch, micro_batch, accum, unit):
    """The derived numbers and the reason for the dtype, printed once at the start."""
    precision = (f"bf16 autocast on {ctx.device.type}, fp32 trainable weights and full reference, bf16 text encoders "
                 f"and LoRA's frozen UNet"
                 if ctx.precision == "bf16" else "fp32")
    sharded = "; UNet, gradients, optimizer state and reference sharded over the processes (FSDP2)" if ctx.shard else ""
    return (f"{ctx.world} process(es) on {ctx.device.type}; global batch {global_batch} {unit} = {ctx.world} x micro-batch "
            f"{micro_batch} x {accum} accumulation steps; {precision}{sharded}")


OPTIMIZERS = ("adamw", "adafactor")


# ------------------------------------------------------------------------------------------------
# per-sample randomness that does not depend on the number of processes

def sample_generator(seed, position):
    """A generator for the sample at `position` of the whole run (step * global_batch + index in the batch).

    Every random choice of a sample (t, eps, flip, the latent draw, prompt dropout, which image) comes
    from it, so 1 process and 8 processes with the same global batch see exactly the same samples,
    and a resumed run continues with exactly the draws it would have made.
    """
    return torch.Generator().manual_seed(hash((seed, position)) & ((1 << 63) - 1))


def epoch_order(n, seed, epoch, _memo={}):
    """A fresh shuffle of n items per epoch (memoised: one randperm per epoch, not per step)."""
    key = (n, seed, epoch)
    if key not in _memo:
        _memo.clear()
        _memo[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
    return _memo[key]


def global_positions(step, global_batch, micro, rank, micro_batch, world):
    """Positions in the global batch of this rank's micro-batch: the global batch is cut into
    (accumulation x world) slices of micro_batch, so any world size covers the same samples."""
    start = (micro * world + rank) * micro_batch
    return [step * global_batch + p for p in range(start, start + micro_batch)]


def lr_at(step, lr, warmup):
    """Linear warm-up then constant. A pure function of the step, so resuming needs only the step.
    (step + 1) so that the first step already learns, unlike schedules that start at lr 0.)"""
    return lr * min(1.0, (step + 1) / max(1, warmup))


def due(done, every, last):
    """Whether an every-N-steps action (log, save, validate) runs after `done` steps; always at the last."""
    return last or (every > 0 and done % every == 0)


# ------------------------------------------------------------------------------------------------
# logging

class Meter:
    """Metrics as means over images (or pairs), not means of micro-batch means.

    `add` takes a dict of tensors on the process's device: a (B,) tensor holds one value per sample, NaN where
    the metric does not apply (a disliked image has no `reward_d`); a scalar counts once (the micro-batch's loss,
    a mean over equal-sized micro-batches). Sums and counts stay on the device until `reduce`, which sums them
    over ranks in one all-reduce on that device (NCCL takes nothing else) and returns the step's means, a host
    sync the loop needs anyway to stop on a non-finite loss. `window` returns the means over the images of every
    step since the last call: what a log line reports."""

    def __init__(self):
        self.sums, self.totals = {}, {}

    def add(self, metrics):
        for k, v in metrics.items():
            v = v.detach().float().reshape(-1)
            kept = ~torch.isnan(v)
            s = torch.stack([torch.where(kept, v, torch.zeros_like(v)).sum(), kept.sum().float()])  # (2,) sum, count
            self.sums[k] = self.sums[k] + s if k in self.sums else s

    def reduce(self):
        keys = sorted(self.sums)
        both = all_reduce_sum(torch.stack([self.sums[k] for k in keys])).tolist()  # (K, 2) on the device; host sync
        self.sums = {}
        step = {}
        for k, (total, n) in zip(keys, both):
            t = self.totals.setdefault(k, [0.0, 0.0])
            t[0], t[1] = t[0] + total, t[1] + n
            step[k] = total / n if n else float("nan")
        return step

    def window(self):
        means = {k: (total / n if n else float("nan")) for k, (total, n) in self.totals.items()}
        self.totals = {}
        return means


def clip_gradients(params, max_norm):
    """Clip the global gradient norm to max_norm (0: no clipping) and return the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)


def window_record(done, means, grad_norms, lr, samples, seconds, unit):
    """One log record for the steps of a window: each metric's mean over its images (Meter.window), the mean
    gradient norm, throughput."""
    record = {"step": done, **means, "grad_norm": torch.stack(grad_norms).mean().item(), "lr": lr,  # host sync
              f"{unit}/s": round(samples / seconds, 3)}
    if torch.cuda.is_available():  # this process's peak since the start (rank 0's, in the log)
        record["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    return record


def log(out_dir, record, bar=None):
    """One readable line (through tqdm so the bar stays intact) and one JSONL record in out_dir/log.jsonl."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    line = " | ".join(f"{k} {fmt(v)}" for k, v in record.items())
    (bar.write if bar is not None else print)(line)
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------
# the flags both trainers share

DEFAULT_VAL_PROMPTS = "a photo of a cat sitting on a windowsill|a red sports car on a mountain road|" \
                      "a watercolor painting of a lighthouse at sunset|a bowl of ramen, studio lighting"


def base_parser(description):
    """The flags both trainers share, one line each; each trainer adds its own and sets its paper defaults."""
    import argparse
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--pretrained", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="diffusers pipeline folder or hub id of the base model")
    a("--data", required=True, help="feedback data (formats: see README)")
    a("--out_dir", required=True, help="where checkpoints, logs, validation grids and the final weights go")
    a("--max_steps", type=int, help="optimizer steps to train for")
    a("--lora_rank", type=int, default=0, help="0: fine-tune the whole UNet; R>0: train rank-R LoRA adapters (peft)")
    a("--resume", action="store_true", help="continue from out_dir's newest good checkpoint; every flag as it was, except max_steps, paths, micro_batch, logging, saving and validation (checkpoints.MAY_CHANGE_ON_RESUME)")
    a("--global_batch", type=int, help="samples per optimizer step over all processes; accumulation is derived")
    a("--micro_batch", type=int, default=1, help="samples per process per forward pass")
    a("--lr", type=float, help="peak learning rate (linear warm-up, then constant)")
    a("--warmup_steps", type=int, help="steps of linear learning-rate warm-up")
    a("--weight_decay", type=float, help="AdamW decoupled weight decay")
    a("--grad_clip", type=float, default=1.0, help="max global gradient norm (0 disables clipping)")
    a("--beta", type=float, default=5000.0, help="KL strength (official parameterization, mean over C,H,W; see losses.py)")
    a("--resolution", type=int, default=512, help="training image side in pixels (resize shorter side + center crop)")
    a("--random_flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips (both mirror images are cached)")
    a("--prompt_dropout", type=float, help="share of prompts replaced by the empty prompt")
    a("--grad_checkpointing", action="store_true", help="recompute activations in backward: less memory, slower")
    a("--shard", action="store_true", help="full fine-tune under torchrun: shard the UNet, gradients, optimizer state and reference over the processes (FSDP2); 1/N of each per GPU")
    a("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 on CUDA, fp32 on the CPU; bf16: bf16 autocast (also on the CPU), fp32 weights and reference; fp32: exact")
    a("--lora_dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="dtype of the kohya LoRA file the front ends load (the diffusers file stays fp32)")
    a("--optimizer", choices=OPTIMIZERS, default="adamw", help="adamw; adafactor: factored second moments, as the official SDXL DPO run (small state)")
    a("--vae", default="", help="a replacement VAE (folder or hub id), e.g. the community fp16-fix VAE for SDXL; '' = the pipeline's own")
    a("--quantize_base", choices=["none", "int8"], default="none", help="LoRA only: hold the frozen base's linear layers as int8 weights (torchao), half of bf16's memory (FLUX.1 [dev] in 24 GB); policy and reference share it, so step 0 stays exact")
    a("--timestep_sampling", choices=["logit_normal", "mode", "uniform"], default="logit_normal", help="flow models (SD3): how each sample's noise level is drawn (losses.flow_draw_u; SD3's paper and diffusers' scripts default to logit_normal); UNets draw t uniformly")
    a("--flow_shift", type=float, default=0.0, help="flow models: shift the drawn noise levels towards noise (losses.flow_sigma); 0 = the model's own (SD3: 3.0; FLUX: by image size, model.flow_shift)")
    a("--latent_cache", choices=["posterior", "mean", "none"], default="posterior", help="what the cache stores: each image's VAE posterior (sampled every step), its mean only (half the size; deviates from sampling), or nothing (encode on the fly)")
    a("--text_cache", choices=["store", "none"], default="store", help="store every caption's text conditioning in the cache, or encode each caption when drawn (the text encoders stay in memory): for the flow families, whose text states take 2.6-12 MB a caption")
    a("--dist_timeout", type=int, default=DIST_TIMEOUT_MINUTES, help="minutes ranks wait for each other before torch.distributed gives up (NCCL's default: 10)")
    a("--seed", type=int, default=0, help="seed for initialisation, data order and every per-sample draw")
    a("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "diffusion-align"), help="where cached latents and text embeddings are kept (reused across runs)")
    a("--strict", action="store_true", help="stop at the first unreadable image instead of skipping and counting it")
    a("--log_every", type=int, default=10, help="steps between log lines (printed and appended to out_dir/log.jsonl)")
    a("--save_every", type=int, default=100, help="steps between checkpoints (one is always written at the end)")
    a("--keep_checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    a("--val_every", type=int, default=100, help="steps between validation grids (0: only at the end; -1: never)")
    a("--val_prompts", default=DEFAULT_VAL_PROMPTS, help="validation prompts: a text file, one a line, or prompts separated by |")
    a("--val_seeds", type=int, default=2, help="validation images per prompt (seeds 0..N-1)")
    a("--val_steps", type=int, default=25, help="sampling steps for validation images (DDIM; a flow model with its own Euler scheduler)")
    return p


def val_prompts(spec):
    """--val_prompts: a text file, one prompt a line, or prompts separated by |."""
    if os.path.isfile(spec):
        with open(spec) as f:
            return [line.strip() for line in f if line.strip()]
    return [p.strip() for p in spec.split("|") if p.strip()]
