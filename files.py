"""The two small habits every script here keeps: one-line errors instead of tracebacks, and files that are whole
or absent (written under a temporary name, made durable, renamed); and filter_fifa.py's chunked caches, named after
what produced them. No torch at import: label.py's page and the data readers use these without loading it.
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


# ------------------------------------------------------------------------------------------------
# caches (filter_fifa.py's scores): one file per chunk of rows, named after what produced them

def short_hash(*parts):
    """A short hash of anything JSON-serialisable: names cache files after what produced them."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def file_identity(path):
    """Path, size and modification time: a changed or replaced file gets a new cache key."""
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def model_identity(name):
    """A local model folder is identified by its files (retrained in place = new key); a hub id by its name."""
    return [file_identity(os.path.join(name, f)) for f in sorted(os.listdir(name))] if os.path.isdir(name) else name


def read_chunks(folder, key, n):
    """What a run, maybe killed, left in a chunked cache: ({first row: array}, (n,) bool rows they cover).

    One safetensors file per chunk, rows-<first row>.safetensors, written whole by save_chunk (a killed
    write leaves a .tmp file that is never read), so a rerun computes only the rows no file covers."""
    import numpy as np
    from safetensors.numpy import load_file  # numpy arrays, no torch
    os.makedirs(folder, exist_ok=True)
    cached = {int(f[5:-12]): load_file(os.path.join(folder, f))[key]
              for f in os.listdir(folder) if f.startswith("rows-") and f.endswith(".safetensors")}
    done = np.zeros(n, bool)
    for start, values in cached.items():
        done[start:start + len(values)] = True
    return cached, done


def save_chunk(folder, key, start, values):
    """One chunk of a cache (values: a numpy array of its rows), whole or absent."""
    import numpy as np
    from safetensors.numpy import save_file
    with atomic_path(os.path.join(folder, f"rows-{start:010d}.safetensors")) as tmp:
        save_file({key: np.ascontiguousarray(values)}, tmp)
