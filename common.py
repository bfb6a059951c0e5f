"""Machinery both trainers share: distributed set-up, models, LoRA, the reference, per-sample draws,
the learning-rate schedule, checkpoints, export, logging and validation grids.

Plain functions, no trainer class: train_dpo.py and train_kto.py read top to bottom and call these.
"""
import copy
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist

from data import fail

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as in the diffusers LoRA scripts


# ------------------------------------------------------------------------------------------------
# distributed, device, precision

def setup(seed):
    """Read torchrun's environment; nccl on CUDA, gloo on CPU, so the same code is testable without a GPU.

    Precision: on CUDA, trainable weights stay fp32 and forwards run under bf16 autocast (bf16 has
    fp32's range, so no loss scaling); frozen models are held in bf16. On the CPU everything is fp32:
    CPU bf16 is slow and the CPU is where tests check exact results.
    """
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    cuda = torch.cuda.is_available()
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(seed)
    ctx = SimpleNamespace(rank=rank, world=world, master=rank == 0, device=device, cuda=cuda,
                          frozen_dtype=torch.bfloat16 if cuda else torch.float32)
    ctx.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    return ctx


def all_reduce_sum(t):
    """Sum a tensor over ranks (identity in one process). Every rank must call it."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def accumulation(global_batch, micro_batch, world):
    """The config states the global batch; the accumulation steps follow from it."""
    if global_batch % (micro_batch * world):
        fail(f"--global_batch {global_batch} is not a multiple of --micro_batch {micro_batch} x {world} processes")
    return global_batch // (micro_batch * world)


# ------------------------------------------------------------------------------------------------
# models

def load_models(pretrained, ctx):
    """tokenizer, text encoder, VAE, UNet and the training noise scheduler from a diffusers folder or hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    if not os.path.isdir(pretrained) and (pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1):
        fail(f"model not found: {pretrained} (expected a diffusers pipeline folder or a hub id like "
             f"stable-diffusion-v1-5/stable-diffusion-v1-5)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=ctx.frozen_dtype)
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", dtype=ctx.frozen_dtype)
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", dtype=torch.float32)
        noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    except (OSError, ValueError, EnvironmentError) as e:
        fail(f"cannot load a Stable Diffusion pipeline from {pretrained}: {str(e).splitlines()[0][:300]}")
    for m in (text_encoder, vae):
        m.requires_grad_(False).eval().to(ctx.device)
    return tokenizer, text_encoder, vae, unet.to(ctx.device), noise_scheduler


def add_lora(unet, rank):
    """peft LoRA adapters of rank `rank` on the attention projections (alpha = rank, so scale 1)."""
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def load_checkpoint_unet(unet, folder):
    """Put the weights of a training checkpoint (out_dir/checkpoints/step_N) into `unet`, a base UNet.

    For evaluating a run part-way: full fine-tunes hold the whole UNet, LoRA runs their adapters."""
    from safetensors.torch import load_file
    with open(os.path.join(folder, "state.json")) as f:
        rank = json.load(f)["config"].get("lora_rank", 0)
    state = load_file(os.path.join(folder, "model.safetensors"))
    if rank:
        from peft.utils import set_peft_model_state_dict
        add_lora(unet, rank)
        set_peft_model_state_dict(unet, state)
    else:
        unet.load_state_dict(state)
    return unet


def prepare_policy(unet, lora_rank, grad_checkpointing, ctx, need_reference=True):
    """Make the UNet trainable (fully, or through LoRA adapters) and build its frozen reference.

    Returns (trainable parameters, reference forward function).
    - full fine-tune: the reference is a frozen copy, in bf16 on CUDA;
    - LoRA: the reference is the same module with its adapters disabled, so it costs no memory.
    """
    if lora_rank > 0:
        unet.requires_grad_(False)
        add_lora(unet, lora_rank)

        def reference(x_t, t, emb):
            unet.disable_adapters()  # always the unwrapped module: a no-grad forward needs no DDP hooks
            try:
                return unet(x_t, t, emb).sample
            finally:
                unet.enable_adapters()
    elif need_reference:
        ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        if ctx.frozen_dtype != torch.float32:
            ref_unet.to(ctx.frozen_dtype)

        def reference(x_t, t, emb):
            return ref_unet(x_t, t, emb).sample
    else:  # SFT needs no reference
        reference = None
    if grad_checkpointing:
        unet.enable_gradient_checkpointing()  # recompute activations in backward: less memory, ~30% more time
    unet.train()
    return [p for p in unet.parameters() if p.requires_grad], reference and torch.no_grad()(reference)


def wrap_ddp(unet, ctx):
    if ctx.world == 1:
        return unet
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(unet, device_ids=[ctx.device.index] if ctx.cuda else None)


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


def add_noise_and_target(noise_scheduler, x0, noise, t):
    from losses import diffusion_target
    return noise_scheduler.add_noise(x0, noise, t), diffusion_target(noise_scheduler, x0, noise, t)


# ------------------------------------------------------------------------------------------------
# checkpoints: written whole or not at all, weights in safetensors, no pickle

def trainable_state(unet, lora):
    if lora:
        from peft.utils import get_peft_model_state_dict
        return get_peft_model_state_dict(unet)
    return unet.state_dict()


def save_checkpoint(out_dir, step, unet, lora, optimizer, config, keep=2):
    """out_dir/checkpoints/step_N/{model,optimizer}.safetensors + state.json, then `latest` -> step_N.

    The folder is written under a temporary name and renamed when complete; `latest` is replaced
    atomically after that. A process killed at any moment leaves the previous checkpoint intact.
    """
    from safetensors.torch import save_file
    root = os.path.join(out_dir, "checkpoints")
    name = f"step_{step:07d}"
    tmp = os.path.join(root, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable_state(unet, lora).items()},
              os.path.join(tmp, "model.safetensors"))
    opt = optimizer.state_dict()
    save_file({f"{pid}.{k}": v.contiguous().cpu() for pid, st in opt["state"].items() for k, v in st.items()},
              os.path.join(tmp, "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "param_groups": opt["param_groups"], "rng": rng, "config": config}, f)
    for fn in os.listdir(tmp):  # make the files durable before the rename publishes them
        with open(os.path.join(tmp, fn), "rb") as f:
            os.fsync(f.fileno())
    final = os.path.join(root, name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(root, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
    old = sorted(d for d in os.listdir(root) if d.startswith("step_") and d != name)
    for d in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def load_checkpoint(out_dir, unet, lora, optimizer, config, resume_keys):
    """Restore the latest complete checkpoint; returns the step to continue from (0 if none)."""
    from safetensors.torch import load_file
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.exists(os.path.join(root, "latest")):
        return 0
    with open(os.path.join(root, "latest")) as f:
        folder = os.path.join(root, f.read().strip())
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    changed = [k for k in resume_keys if state["config"].get(k) != config.get(k)]
    if changed:
        fail(f"cannot resume {folder}: it was trained with other " + ", ".join(
            f"--{k} ({state['config'].get(k)} there, {config.get(k)} now)" for k in changed))
    weights = load_file(os.path.join(folder, "model.safetensors"), device=str(next(unet.parameters()).device))
    if lora:
        from peft.utils import set_peft_model_state_dict
        result = set_peft_model_state_dict(unet, weights)
        if getattr(result, "unexpected_keys", None):
            fail(f"checkpoint {folder} does not match this LoRA configuration")
    else:
        unet.load_state_dict(weights)
    tensors = load_file(os.path.join(folder, "optimizer.safetensors"))
    opt_state = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["rng"]["cuda"]])
    return state["step"]


def clear_partial_checkpoints(out_dir):
    """Remove what a killed save left under a temporary name; complete checkpoints stay."""
    root = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(root):
        for d in os.listdir(root):
            if d.startswith(".tmp-") or d.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True) if os.path.isdir(os.path.join(root, d)) \
                    else os.remove(os.path.join(root, d))


def export(out_dir, pretrained, unet, lora):
    """The result in the layout users load: a LoRA file for `pipe.load_lora_weights(out_dir)`, or a full
    pipeline for `StableDiffusionPipeline.from_pretrained(out_dir)` (the base's other parts, fp32)."""
    from diffusers import StableDiffusionPipeline
    tmp = os.path.join(out_dir, ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        layers = convert_state_dict_to_diffusers({k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(unet).items()})
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(pretrained, unet=unet, dtype=torch.float32)
        pipe.save_pretrained(tmp, safe_serialization=True)
    for name in os.listdir(tmp):  # move each part into place; a part is replaced only once complete
        dst = os.path.join(out_dir, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, name), dst)
    os.rmdir(tmp)


# ------------------------------------------------------------------------------------------------
# logging and validation

class Meter:
    """Averages metric dicts over micro-steps; `reduce` then averages them over ranks in one all-reduce."""

    def __init__(self):
        self.sums, self.n = {}, 0

    def add(self, metrics):
        for k, v in metrics.items():
            v = v.float().reshape(())
            self.sums[k] = self.sums.get(k, 0) + torch.nan_to_num(v, nan=0.0)
            self.sums[k + "@n"] = self.sums.get(k + "@n", 0) + (~torch.isnan(v)).float()

    def reduce(self):
        keys = sorted(self.sums)
        values = all_reduce_sum(torch.stack([self.sums[k] for k in keys]).cpu()).tolist()  # host sync
        totals = dict(zip(keys, values))
        self.sums = {}
        return {k: (totals[k] / totals[k + "@n"] if totals[k + "@n"] else float("nan"))
                for k in keys if not k.endswith("@n")}


def nanmean(values):
    """Mean over the steps of a log window that have the metric: a class absent from a step's batch (KTO with
    few images per step) reports NaN for that step, and must not blank the whole window."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def log(out_dir, record, bar=None):
    """One readable line (through tqdm so the bar stays intact) and one JSONL record in out_dir/log.jsonl."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    line = " | ".join(f"{k} {fmt(v)}" for k, v in record.items())
    (bar.write if bar is not None else print)(line)
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def validate(out_dir, step, pretrained, unet, vae, text_encoder, tokenizer, prompts, seeds, resolution, ctx,
             steps=25, guidance=7.5):
    """Fixed prompts and seeds through the current weights: out_dir/val/step_N.png, one row per prompt."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from evaluate import generate, save_grid
    scheduler = DDIMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    t0 = time.time()
    with ctx.autocast():
        rows = generate(pipe, prompts, seeds, steps=steps, guidance=guidance, resolution=resolution, progress=False)
    unet.train(was_training)
    os.makedirs(os.path.join(out_dir, "val"), exist_ok=True)
    path = os.path.join(out_dir, "val", f"step_{step:07d}.png")
    save_grid(rows, path)
    return path, time.time() - t0


# ------------------------------------------------------------------------------------------------
# the loop both trainers run

def train_loop(args, ctx, model, unet, params, optimizer, micro_step, start_step, accum, unit, config, validate_fn):
    """Accumulate `accum` micro-batches, clip, step; log, checkpoint and validate at their intervals.

    micro_step(step, micro) -> (loss, metrics) computes one micro-batch's loss (the trainer's own part).
    Gradients are all-reduced by DDP only on the last micro-step (no_sync on the others).
    """
    from tqdm import tqdm
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
               disable=not ctx.master, desc="training", dynamic_ncols=True)
    window, norms, t0 = [], [], time.time()
    for step in bar:
        lr = lr_at(step, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        meter = Meter()
        for micro in range(accum):
            sync = model.no_sync() if ctx.world > 1 and micro < accum - 1 else nullcontext()
            with sync:
                loss, metrics = micro_step(step, micro)
                (loss / accum).backward()
            meter.add({"loss": loss.detach(), **metrics})
        stats = meter.reduce()  # host sync: one small all-reduce a step, so every rank sees a bad loss
        if not math.isfinite(stats["loss"]):
            latest = os.path.join(args.out_dir, "checkpoints", "latest")
            where = open(latest).read().strip() if os.path.exists(latest) else "none yet"
            fail(f"non-finite loss at step {step + 1}; stopping before the update. Last good checkpoint: {where}")
        norms.append(torch.nn.utils.clip_grad_norm_(params, args.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(stats)
        done, last = step + 1, step + 1 == args.max_steps
        if done % args.log_every == 0 or last:
            elapsed = time.time() - t0
            record = {"step": done, **{k: nanmean([w[k] for w in window]) for k in window[0]},
                      "grad_norm": torch.stack(norms).mean().item(), "lr": lr,  # host sync
                      f"{unit}/s": round(len(window) * args.global_batch / elapsed, 3)}
            if ctx.master:
                log(args.out_dir, record, bar)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            window, norms, t0 = [], [], time.time()
        if (args.save_every and done % args.save_every == 0) or last:
            if ctx.master:
                save_checkpoint(args.out_dir, done, unet, args.lora_rank > 0, optimizer, config, args.keep_checkpoints)
            barrier()
        if validate_fn is not None and ((args.val_every and done % args.val_every == 0) or last):
            if ctx.master:
                path, secs = validate_fn(done)
                bar.write(f"validation grid: {path} ({secs:.1f}s)")
            barrier()
    if ctx.master:
        export(args.out_dir, args.pretrained, unet, args.lora_rank > 0)
        print(f"saved {'LoRA weights' if args.lora_rank else 'the pipeline'} to {args.out_dir}")
    barrier()


# ------------------------------------------------------------------------------------------------
# the flags and the set-up both trainers share

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
    a("--resume", action="store_true", help="continue from out_dir's latest checkpoint (same flags required)")
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
    a("--seed", type=int, default=0, help="seed for initialisation, data order and every per-sample draw")
    a("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "diffusion-align"), help="where cached latents and text embeddings are kept (reused across runs)")
    a("--strict", action="store_true", help="stop at the first unreadable image instead of skipping and counting it")
    a("--log_every", type=int, default=10, help="steps between log lines (printed and appended to out_dir/log.jsonl)")
    a("--save_every", type=int, default=100, help="steps between checkpoints (one is always written at the end)")
    a("--keep_checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    a("--val_every", type=int, default=100, help="steps between validation grids (0: only at the end; -1: never)")
    a("--val_prompts", default=DEFAULT_VAL_PROMPTS, help="validation prompts: a text file, one a line, or prompts separated by |")
    a("--val_seeds", type=int, default=2, help="validation images per prompt (seeds 0..N-1)")
    a("--val_steps", type=int, default=25, help="DDIM steps for validation images")
    return p


def start(args, load_feedback, ok_mask, what):
    """Set-up shared by both trainers: processes, models, feedback data and its cache.

    load_feedback(path) -> data.Feedback; ok_mask(fb, valid) -> which feedback rows have all images readable.
    Returns (ctx, accum, models dict, fb, cache).
    """
    from data import LatentCache, build_cache
    ctx = setup(args.seed)
    accum = accumulation(args.global_batch, args.micro_batch, ctx.world)
    say = print if ctx.master else (lambda *a, **k: None)
    say(f"{ctx.world} process(es) on {ctx.device.type}; global batch {args.global_batch} {what} = {ctx.world} x micro-batch "
        f"{args.micro_batch} x {accum} accumulation steps; "
        + ("bf16 autocast, fp32 trainable weights, bf16 frozen models" if ctx.cuda else "fp32 (CPU)"))
    fb = load_feedback(args.data)  # before the models: a wrong data path should not wait for SD1.5 to load
    if len(fb) == 0:
        fail(f"no usable {what} in {args.data}: " + fb.summary(what))
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_models(args.pretrained, ctx)
    os.makedirs(args.out_dir, exist_ok=True)  # only once data and models are there: a failed start leaves nothing
    folder = build_cache(fb, args.cache_dir, vae, text_encoder, tokenizer, args.resolution, args.random_flip,
                         ctx.device, ctx.frozen_dtype, ctx.rank, ctx.world, barrier, args.strict, ctx.master)
    cache = LatentCache(folder)
    fb.keep(ok_mask(fb, cache.valid.numpy()), "unreadable image")
    say(f"data: {fb.summary(what)}; cache {folder}")
    if len(fb) == 0:
        fail(f"no usable {what} left in {args.data} after skipping unreadable images")
    if args.val_every < 0:  # the VAE and text encoder are needed again only to draw validation images
        text_encoder = vae = None
    models = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, noise_scheduler=noise_scheduler)
    return ctx, accum, models, fb, cache


def make_optimizer_and_resume(args, ctx, unet, need_reference, config, resume_keys):
    """LoRA or full policy, its reference, DDP, AdamW, and the state of a resumed run."""
    params, reference = prepare_policy(unet, args.lora_rank, args.grad_checkpointing, ctx, need_reference)
    n_params = sum(p.numel() for p in params)
    model = wrap_ddp(unet, ctx)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if ctx.master:
        clear_partial_checkpoints(args.out_dir)
        print(f"trainable parameters: {n_params / 1e6:.2f}M ({'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full UNet'})")
    start_step = 0
    if args.resume:
        barrier()
        start_step = load_checkpoint(args.out_dir, unet, args.lora_rank > 0, optimizer, config, resume_keys)
        if ctx.master:
            print(f"resumed from step {start_step}" if start_step else "no checkpoint to resume from: starting at step 0")
    if start_step >= args.max_steps and ctx.master:
        print(f"already at step {start_step} >= --max_steps {args.max_steps}: nothing to train")
    return model, params, reference, optimizer, start_step


def validation(args, ctx, models):
    """The validation function train_loop calls (None when validation is off)."""
    if args.val_every < 0:
        return None
    if os.path.isfile(args.val_prompts):
        with open(args.val_prompts) as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        prompts = [p.strip() for p in args.val_prompts.split("|") if p.strip()]
    seeds = list(range(args.val_seeds))
    m = models
    return lambda step: validate(args.out_dir, step, args.pretrained, m["unet"], m["vae"], m["text_encoder"],
                                 m["tokenizer"], prompts, seeds, args.resolution, ctx, steps=args.val_steps)
