"""How the processes share a run: DDP (every process holds the whole model) or FSDP2 (--shard: each holds 1/N of
the UNet, its gradients, its optimizer state and its reference), the gradient sync of accumulation, and the
optimizers, which must work on sharded weights too. The trainers call these; model.py splits the modules.
"""
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from files import fail


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
