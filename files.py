"""The two small habits every script here keeps: one-line errors instead of tracebacks, and files that are whole
or absent (written under a temporary name, made durable, renamed). No torch at import: label.py's page and the
data readers use these without loading it.
"""
import hashlib
import json
import os
import shutil
from contextlib import contextmanager

PRECISIONS = ("auto", "fp32", "bf16")  # every script's --precision (common.resolve_precision); here without torch


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


def check_model_path(name, what="model", expected="a diffusers pipeline folder or a hub id like "
                                                  "stable-diffusion-v1-5/stable-diffusion-v1-5"):
    """A path-like name that is not a folder (./x, /x, ~/x, a/b/c, a bare word) is a typo, not a hub id (owner/name):
    say so in one line instead of asking the hub for it."""
    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        fail(f"{what} not found: {name} (expected {expected})")
