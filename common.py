"""What both trainers repeat: processes and devices, per-sample draws, the schedule, checkpoints, logging,
the flags they share, and the two small habits every script here keeps (one-line errors, atomic writes).

Plain functions, no trainer class, no import of the other modules here (they import this one): each
trainer shows its own loop and calls these for the mechanics.
"""
import hashlib
import json
import math
import os
import shutil
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist


# ------------------------------------------------------------------------------------------------
# errors and files

def fail(msg):
    """One clear line for the user instead of a traceback."""
    raise SystemExit(f"error: {msg}")


def one_line(e):
    """An exception as one line for an error message: its type and the first line of its text."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


@contextmanager
def atomic_path(path):
    """Yield a temporary name beside `path` to write a file (or fill a folder) under; when the block ends
    without an error it is made durable and renamed to `path`, so a reader never sees half of it.
    A process killed on the way leaves only the temporary name, which no reader looks at."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        for f in ([os.path.join(tmp, n) for n in os.listdir(tmp)] if os.path.isdir(tmp) else [tmp]):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if os.path.isdir(tmp) and os.path.isdir(path):  # a folder replaces a folder; a file never removes one
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def save_safetensors(tensors, path):
    """A safetensors file, whole or absent."""
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)


def write_json(obj, path, **kw):
    """A JSON file, whole or absent."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, **kw)


def read_jsonl(path):
    """The JSON objects of a JSONL file, [] while it does not exist yet; a torn last line (a kill mid-append) and
    blank lines are left out. A path that cannot be read (a folder, no permission) raises."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    except FileNotFoundError:
        return []
    return [r for r in rows if isinstance(r, dict)]


def sha256_file(path, block=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# processes, device, precision

PRECISIONS = ("auto", "fp32", "bf16")


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


def make_optimizer(name, params, lr, weight_decay):
    """AdamW, or Adafactor as the official SDXL DPO run uses it (transformers': no relative step, no
    parameter scaling, update clipping 1.0): its factored second moments take a few MB where AdamW's two
    fp32 states take twice the weights (21 GB for SDXL's UNet). Sharded parameters (--shard) get
    ShardedAdafactor, the same update computed shard by shard; torch's AdamW runs on them as it is."""
    if name == "adafactor":
        from transformers.optimization import Adafactor
        cls = ShardedAdafactor if is_sharded(params[0]) else Adafactor
        return cls(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                   warmup_init=False, clip_threshold=1.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def optimizer_state_bytes(name, params, world=1):
    """What the optimizer's state will hold per process: AdamW two fp32 tensors per parameter; Adafactor (no first
    moment) a row and a column vector per matrix (factored over the last two dimensions), a full one per vector.
    world > 1: sharded over that many processes on dim 0 (--shard), so all of it is divided by `world` but a
    matrix's column vector, which every process holds whole (see ShardedAdafactor)."""
    if name == "adamw":
        return sum(8 * p.numel() for p in params) / world
    total = 0
    for p in params:
        shape = p.shape
        if len(shape) >= 2:
            col = math.prod(shape[:-2]) * shape[-1]
            total += 4 * (math.prod(shape[:-1]) / world + (col if len(shape) == 2 else col / world))
        else:
            total += 4 * p.numel() / world
    return total


def wrap_ddp(module, ctx):
    """DistributedDataParallel over `module` with more than one process; the module itself otherwise."""
    if ctx.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(module, device_ids=[ctx.device.index] if ctx.cuda else None)


def sync_grads(ddp_model, ctx, micro, accum):
    """DDP all-reduces gradients in backward; on every micro-step but the last, no_sync skips that. A sharded
    model (--shard) reduce-scatters on every micro-step instead: skipping it would hold every process's whole
    unsharded gradients until the last one (9.6 GB for SDXL), which is what sharding is there to avoid."""
    return ddp_model.no_sync() if ctx.world > 1 and not ctx.shard and micro < accum - 1 else nullcontext()


# ------------------------------------------------------------------------------------------------
# sharding (--shard): FSDP2 holds 1/N of the UNet, its gradients, its optimizer state and its reference per process
#
# model.shard_model splits the modules; what is here knows only that a sharded parameter is a DTensor (each rank
# holds a block of rows, dim 0) and keeps everything around the loop as it is without --shard: checkpoints are
# gathered into the same files a DDP run writes, and a checkpoint's whole tensors are cut back into shards on resume.

def use_sharding(shard, lora_rank, ctx):
    """Whether this run shards (--shard): a full fine-tune over more than one process. One process has nothing to
    shard and runs as without the flag (the same run); LoRA is refused (its frozen UNet is the only large part)."""
    if not shard:
        return False
    if lora_rank > 0:
        fail("--shard is for full fine-tunes (it shards the weights, gradients, optimizer state and reference); a "
             "LoRA run trains a few MB per process and needs no sharding: drop --shard or --lora_rank")
    if ctx.world == 1:
        ctx.say("--shard with one process: nothing to shard, training unsharded (the same run as without --shard)")
        return False
    return True


def is_sharded(t):
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def shard_of(full, like):
    """This rank's shard of the whole tensor `full`, placed as the DTensor `like` is (no communication: every
    rank cuts its own rows); `full` itself when `like` is not sharded."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def gather_whole(tensors, ctx):
    """A dict of tensors with each sharded one gathered whole, onto rank 0's CPU (one all-gather a tensor, on the
    device, one at a time: every rank must call this, in the same order); the other ranks keep None."""
    def whole(v):
        v = v.full_tensor() if is_sharded(v) else v
        return (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v) if ctx.master else None  # a snapshot
    return {k: whole(v) for k, v in tensors.items()}


def checkpoint_state(trainable, optimizer, ctx):
    """What save_checkpoint writes: the model tensors and the optimizer's state dict. Under --shard every rank
    must call this, and they are gathered whole onto rank 0 (gather_whole), so that the checkpoint is the same
    files a DDP run writes. Without --shard both are returned as they are."""
    opt = optimizer.state_dict()
    if not ctx.shard:
        return trainable, opt
    return gather_whole(trainable, ctx), {"state": {pid: gather_whole(st, ctx) for pid, st in opt["state"].items()},
                                          "param_groups": opt["param_groups"]}


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict for a checkpoint's whole tensors. A sharded optimizer first makes its state with
    one step on zero gradients at learning rate 0 (no weight moves; torch.distributed.checkpoint does the same),
    then every rank keeps its shard of each tensor, placed as that state is."""
    if not any(is_sharded(p) for group in optimizer.param_groups for p in group["params"]):
        return optimizer.load_state_dict(state)
    if not optimizer.state:
        lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
    mine = optimizer.state_dict()["state"]
    optimizer.load_state_dict({"state": {pid: {k: shard_of(v, mine.get(pid, {}).get(k)) for k, v in st.items()}
                                         for pid, st in state["state"].items()},
                               "param_groups": state["param_groups"]})


class ShardedAdafactor(torch.optim.Optimizer):
    """transformers' Adafactor as make_optimizer sets it (no first moment, no relative step, no parameter scaling,
    update clipping at RMS 1), on parameters sharded on dim 0 (DTensors, --shard).

    transformers' own step runs on DTensors only as far as DTensor's propagation rules carry it, and those fail
    on uneven or empty shards (SDXL's conv_out has 4 output channels: with 8 processes, 4 hold none of it). Here
    each rank updates its own rows, and the three means that cross the shards (a matrix's column means, the mean
    of its row moments, the update's RMS; and the weight's RMS transformers records) are sums all-reduced over the
    processes, divided by whole counts: the same arithmetic but for the fp32 order of summation, two small
    all-reduces per parameter tensor. The state has transformers' keys and shapes (sharded where it follows the
    rows; a 2D weight's column moments whole on every rank), so a gathered checkpoint is the one a DDP run writes
    and either can resume the other's."""

    def __init__(self, params, lr, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                 weight_decay=0.0, scale_parameter=False, relative_step=False, warmup_init=False):
        if beta1 is not None or scale_parameter or relative_step or warmup_init:
            raise ValueError("ShardedAdafactor: only beta1=None, scale_parameter, relative_step, warmup_init=False")
        super().__init__(params, dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                                      weight_decay=weight_decay, scale_parameter=scale_parameter,
                                      relative_step=relative_step, warmup_init=warmup_init))

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import Replicate, zeros
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                shape, w, g, pg = p.shape, p.to_local(), p.grad.to_local(), p.device_mesh.get_group()
                state = self.state[p]
                if not state:  # DTensors like the parameter's rows; a matrix's column moments whole on every rank
                    state["step"] = 0
                    like = lambda size, whole=False: zeros(size, device_mesh=p.device_mesh, dtype=torch.float32,
                                                           placements=[Replicate()] if whole else p.placements)
                    if len(shape) >= 2:
                        state["exp_avg_sq_row"] = like(shape[:-1])
                        state["exp_avg_sq_col"] = like(shape[:-2] + shape[-1:], whole=len(shape) == 2)
                    else:
                        state["exp_avg_sq"] = like(shape)
                state["step"] += 1
                beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
                sq = g * g + group["eps"][0]
                if len(shape) >= 2:
                    row, col = state["exp_avg_sq_row"].to_local(), state["exp_avg_sq_col"].to_local()
                    row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)  # a row is whole on its rank
                    if len(shape) == 2:  # a matrix: its column means and its mean row moment cross the shards
                        sums = torch.cat([sq.sum(dim=0), row.sum().reshape(1)])
                        dist.all_reduce(sums, group=pg)
                        col.mul_(beta2t).add_(sums[:-1] / shape[0], alpha=1.0 - beta2t)
                        row_mean = sums[-1] / shape[0]
                    else:  # a conv weight, factored over its kernel's two dimensions: every shard holds them whole
                        col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
                        row_mean = row.mean(dim=-1, keepdim=True)
                    update = (row / row_mean).rsqrt_().unsqueeze(-1) * col.unsqueeze(-2).rsqrt()
                    update.mul_(g)
                else:
                    v = state["exp_avg_sq"].to_local()
                    v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
                    update = v.rsqrt().mul_(g)
                sums = torch.stack([(update * update).sum(), (w * w).sum()])  # the update's and the weight's RMS
                dist.all_reduce(sums, group=pg)
                state["RMS"] = (sums[1] / p.numel()).sqrt()  # recorded as transformers does; unused without scaling
                update.div_(((sums[0] / p.numel()).sqrt() / group["clip_threshold"]).clamp_(min=1.0))
                update.mul_(group["lr"])
                if group["weight_decay"] != 0:
                    w.add_(w, alpha=-group["weight_decay"] * group["lr"])
                w.add_(-update)


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
# checkpoints: written whole or not at all, verified when read, weights in safetensors, no pickle

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors")


def save_checkpoint(out_dir, step, trainable, optimizer, config, keep=2):
    """out_dir/checkpoints/step_N/{model,optimizer}.safetensors + state.json, then `latest` -> step_N.

    trainable: the state dict to save (the whole UNet, or its LoRA adapters); optimizer: the optimizer or its
    state dict (checkpoint_state's, gathered under --shard). state.json records each
    weight file's size and sha256, so that a resume can tell a damaged file from a good one. The folder
    is written under a temporary name and renamed when complete; `latest` is replaced atomically after
    that. A process killed at any moment leaves the previous checkpoint intact.
    """
    from safetensors.torch import save_file
    root = os.path.join(out_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:07d}"
    opt = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    with atomic_path(os.path.join(root, name)) as tmp:
        os.makedirs(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, os.path.join(tmp, "model.safetensors"))
        save_file({f"{pid}.{k}": v.contiguous().cpu() for pid, st in opt["state"].items() for k, v in st.items()
                   if torch.is_tensor(v)}, os.path.join(tmp, "optimizer.safetensors"))
        scalars = {f"{pid}.{k}": v for pid, st in opt["state"].items() for k, v in st.items() if not torch.is_tensor(v)}
        files = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": sha256_file(os.path.join(tmp, f))}
                 for f in CHECKPOINT_FILES}
        rng = {"torch": torch.get_rng_state().tolist()}
        if torch.cuda.is_available():
            rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        with open(os.path.join(tmp, "state.json"), "w") as f:  # Adafactor keeps its step count as a plain number
            json.dump({"step": step, "param_groups": opt["param_groups"], "rng": rng, "config": config,
                       "files": files, "optimizer_scalars": scalars}, f)
    with atomic_path(os.path.join(root, "latest")) as tmp:
        with open(tmp, "w") as f:
            f.write(name)
    old = sorted(d for d in os.listdir(root) if d.startswith("step_") and ".tmp" not in d and d != name)
    for d in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def checkpoint_problem(folder):
    """None if the checkpoint folder is complete and its files are what state.json recorded, else why not."""
    try:
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({one_line(e)})"
    for name in CHECKPOINT_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            return f"{name} missing"
    for name, want in state.get("files", {}).items():  # checkpoints from before this record are not verified
        path = os.path.join(folder, name)
        if os.path.getsize(path) != want["bytes"]:
            return f"{name} has {os.path.getsize(path)} bytes, {want['bytes']} were written"
        if sha256_file(path) != want["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def latest_good_checkpoint(out_dir, say=print):
    """The newest complete, verified checkpoint folder of a run (or None), saying which damaged ones it passed."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    for name in sorted((d for d in os.listdir(root) if d.startswith("step_") and ".tmp" not in d), reverse=True):
        problem = checkpoint_problem(os.path.join(root, name))
        if problem is None:
            return os.path.join(root, name)
        say(f"checkpoint {name} is damaged ({problem}): trying the one before it")
    return None


def resume(out_dir, optimizer, config, resume_keys, say=print):
    """Restore the optimizer and RNG state of the newest good checkpoint; returns (step, model tensors), the
    tensors for model.load_trainable_state, or (0, None) when there is nothing to resume from.

    Refuses (one line) a checkpoint trained with other values of `resume_keys`, and a run whose
    checkpoints are all damaged."""
    from safetensors.torch import load_file
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root) or not any(d.startswith("step_") and ".tmp" not in d for d in os.listdir(root)):
        say("no checkpoint to resume from: starting at step 0")
        return 0, None
    folder = latest_good_checkpoint(out_dir, say)
    if folder is None:
        fail(f"cannot resume {out_dir}: every checkpoint in {root} is damaged; start again without --resume")
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    changed = [k for k in resume_keys if state["config"].get(k) != config.get(k)]
    if changed:
        fail(f"cannot resume {folder}: it was trained with other " + ", ".join(
            f"--{k} ({state['config'].get(k)} there, {config.get(k)} now)" for k in changed))
    load_optimizer_state(optimizer, {"state": optimizer_state(folder, state), "param_groups": state["param_groups"]})
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["rng"]["cuda"]])
    say(f"resumed from {folder} (step {state['step']})")
    return state["step"], load_file(os.path.join(folder, "model.safetensors"))


def optimizer_state(folder, state):
    """The optimizer's per-parameter state in a checkpoint folder ({param id: {name: value}}): the tensors of
    optimizer.safetensors and the plain numbers state.json keeps (Adafactor's step count)."""
    from safetensors.torch import load_file
    opt_state = {}
    for key, v in [*load_file(os.path.join(folder, "optimizer.safetensors")).items(),
                   *state.get("optimizer_scalars", {}).items()]:
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    return opt_state


def init_weights(folder, lora_rank, flag="--init_from"):
    """The model tensors of a trainer checkpoint (out_dir/checkpoints/step_N) a new run starts its policy from
    (--init_from, --continue_from), once the folder is verified and was trained with the same --lora_rank."""
    from safetensors.torch import load_file
    problem = checkpoint_problem(folder) if os.path.isdir(folder) else "no such folder"
    if problem:
        fail(f"{flag} {folder}: not a usable trainer checkpoint ({problem})")
    with open(os.path.join(folder, "state.json")) as f:
        rank = json.load(f)["config"].get("lora_rank", 0)
    if rank != lora_rank:
        fail(f"{flag} {folder} was trained with --lora_rank {rank}, this run has --lora_rank {lora_rank}")
    return load_file(os.path.join(folder, "model.safetensors"))


def continue_optimizer(folder, optimizer, optimizer_name):
    """--continue_from: load a verified trainer checkpoint's optimizer state (AdamW's moments and step count)
    into `optimizer`, keeping this run's hyperparameters (lr, weight decay); returns the checkpoint's place in
    the learning-rate schedule, the steps of every run it continues plus its own, where this run's schedule
    starts (see lr_at): a chain of runs warms up once and then trains at its --lr."""
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    name = state["config"].get("optimizer", "adamw")
    if name != optimizer_name:
        fail(f"--continue_from {folder} was trained with --optimizer {name}, this run has --optimizer {optimizer_name}")
    try:
        load_optimizer_state(optimizer, {"state": optimizer_state(folder, state),  # sharded: each rank its rows
                                         "param_groups": optimizer.state_dict()["param_groups"]})
    except ValueError as e:  # another set of trainable parameters
        fail(f"--continue_from {folder}: its optimizer state does not fit this run's parameters ({one_line(e)})")
    return state["config"].get("schedule_start", 0) + state["step"]


def clear_partial_checkpoints(out_dir):
    """Remove what a killed save left under a temporary name; complete checkpoints stay."""
    root = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(root):
        for d in os.listdir(root):
            if ".tmp" in d:
                path = os.path.join(root, d)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def latest_checkpoint_name(out_dir):
    path = os.path.join(out_dir, "checkpoints", "latest")
    return open(path).read().strip() if os.path.exists(path) else "none yet"


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
    a("--resume", action="store_true", help="continue from out_dir's newest good checkpoint (same flags required)")
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
    a("--latent_cache", choices=["posterior", "mean", "none"], default="posterior", help="what the cache stores: each image's VAE posterior (sampled every step), its mean only (half the size; deviates from sampling), or nothing (encode on the fly)")
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
    a("--val_steps", type=int, default=25, help="DDIM steps for validation images")
    return p


def val_prompts(spec):
    """--val_prompts: a text file, one prompt a line, or prompts separated by |."""
    if os.path.isfile(spec):
        with open(spec) as f:
            return [line.strip() for line in f if line.strip()]
    return [p.strip() for p in spec.split("|") if p.strip()]
