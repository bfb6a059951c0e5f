"""CUDA's placement rule, checked on the CPU: NCCL takes only tensors on the process's device.

On CUDA the process group is NCCL, whose one device is CUDA: a collective handed a CPU tensor raises
"No backend type associated with device type cpu" (a crash at the end of step 1 once took every multi-GPU run
this way). Gloo, the CPU tests' backend, takes CPU tensors, so a CPU run cannot see such a bug by itself. This
twin makes it visible: a TorchFunctionMode follows where every tensor would live on a CUDA machine, and each
collective refuses a tensor that would be on the host, with NCCL's own message.

Where a tensor would live: on the host when it is made by a factory without device= (torch.tensor, zeros,
randn, from_numpy, ...), or with device="cpu" spelled as a string, or by .cpu() / .to("cpu"); on the device
when a factory or .to() gets a torch.device (the trainers' ctx.device, or another tensor's .device); parameters
are on the device (the trainers move their models there). Any other op's result is on the host only when every
tensor it was computed from is. So `torch.stack(values).cpu()` handed to an all-reduce fails here as on NCCL,
and `torch.stack(values)` of values computed from the model's outputs passes.

    python -m torch.distributed.run --nproc_per_node=2 tests/device_twin.py train_kto.py ARGS...   # a trainer
    from device_twin import install; install()                                                     # in a test

DEVICE_TWIN_GRADS=DIR also writes each process's gradients at the first optimizer step (as common.clip_gradients
sees them, after DDP's all-reduce) to DIR/grads_rankR.safetensors, for tests that compare gradients across
batch splits.
"""
import os
import runpy
import sys
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTORIES = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.zeros, torch.ones, torch.full, torch.empty,
             torch.arange, torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye}
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "reduce", "all_to_all_single", "scatter", "gather", "send", "recv",
               "isend", "irecv")
_host = weakref.WeakValueDictionary()  # id(tensor) -> tensor, for the tensors that would live on the host


def on_host(t):
    return _host.get(id(t)) is t


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _host_device(device):
    """Whether a device argument means the host: "cpu" as a string. A torch.device is taken to be the process's
    device (ctx.device or a tensor's .device; on the CPU both read 'cpu', on CUDA both are the GPU)."""
    return isinstance(device, str) and device.split(":")[0] == "cpu"


class Twin(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            host = "device" not in kwargs or kwargs["device"] is None or _host_device(kwargs["device"])
        elif func is torch.Tensor.cpu:
            host = True
        elif func is torch.Tensor.to and any(isinstance(a, (str, torch.device)) for a in [*args[1:], kwargs.get("device")]):
            device = next(a for a in [*args[1:], kwargs.get("device")] if isinstance(a, (str, torch.device)))
            host = _host_device(device)
        else:
            inputs = [t for t in _tensors((args, kwargs)) if not isinstance(t, torch.nn.Parameter)]
            host = bool(inputs) and all(on_host(t) for t in inputs)
        for t in _tensors(out):
            if host:
                _host[id(t)] = t
            else:
                _host.pop(id(t), None)
        return out


def _checked(name, fn):
    def collective(*args, **kwargs):
        for t in _tensors((args, kwargs)):
            if on_host(t):
                raise RuntimeError(f"No backend type associated with device type cpu (device twin: torch.distributed."
                                   f"{name} got a tensor of shape {tuple(t.shape)} on the host; NCCL takes only "
                                   f"tensors on the process's CUDA device)")
        return fn(*args, **kwargs)
    collective.twin = True
    return collective


def install():
    """Follow tensor placement in this process from now on, and make every collective check it."""
    for name in COLLECTIVES:
        fn = getattr(dist, name)
        if not getattr(fn, "twin", False):
            setattr(dist, name, _checked(name, fn))
    mode = Twin()
    mode.__enter__()
    return mode


def _dump_gradients(folder):
    import common
    from safetensors.torch import save_file
    clip, done = common.clip_gradients, []

    def clip_and_dump(params, max_norm):
        if not done:
            grads = {str(i): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().float().cpu()
                     for i, p in enumerate(params)}
            save_file(grads, os.path.join(folder, f"grads_rank{os.environ.get('RANK', '0')}.safetensors"))
            done.append(True)
        return clip(params, max_norm)
    common.clip_gradients = clip_and_dump


if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, ROOT)
    if os.environ.get("DEVICE_TWIN_GRADS"):
        _dump_gradients(os.environ["DEVICE_TWIN_GRADS"])
    install()
    runpy.run_path(script, run_name="__main__")
