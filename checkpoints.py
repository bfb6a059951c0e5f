"""Checkpoints: written whole or not at all, verified when read, weights in safetensors, no pickle; resuming a run,
starting a policy from a checkpoint (--init_from) and continuing one (--continue_from).
"""
import json
import os
import shutil

import torch

from files import atomic_path, fail, one_line, sha256_file
from parallel import load_optimizer_state


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


# the flags a resumed run may change. Every other key of the config must be as the checkpoint recorded it, so a flag
# added later is protected without being listed here; one that changes the math of the remaining steps, the data
# order or the model must never be listed.
MAY_CHANGE_ON_RESUME = (
    "resume", "max_steps", "out_dir",  # the first run has no --resume; how long it runs; a run folder may be moved
    # how a step is computed, not what: the same samples and means (to float rounding, like another number of
    # processes), the same weights kept in memory another way, how long ranks wait for each other
    "micro_batch", "shard", "grad_checkpointing", "dist_timeout",
    # where the cache is kept (a new one is encoded the same); --strict only stops at an unreadable image while the
    # cache is built, and a run that got to a checkpoint had none to stop at
    "cache_dir", "strict",
    "log_every", "save_every", "keep_checkpoints", "lora_dtype",  # what is logged and saved, how often; the export's dtype
    "val_every", "val_prompts", "val_seeds", "val_steps",  # validation grids: fixed seeds, generators of their own
)


def resume_conflicts(saved, config, defaults, may_change=MAY_CHANGE_ON_RESUME):
    """What stops a resume: each key of this run's `config` or of the checkpoint's `saved` config that is not in
    `may_change` and differs, as "--key (saved value there, value now)".

    A checkpoint written before a flag existed has no value for it: it ran as the flag's default does (a new flag's
    default keeps the old behaviour), so the key is fine at its default (`defaults`: key -> default) and stops
    otherwise. A key only the checkpoint has (a flag since removed) stops: what the code does in its place is not
    known here."""
    changed = []
    for k in [*config, *(k for k in saved if k not in config)]:
        if k in may_change:
            continue
        if k not in saved:
            if config[k] != defaults.get(k):
                changed.append(f"--{k} (not recorded there: written before the flag, as its default "
                               f"{defaults.get(k)}; {config[k]} now)")
        elif k not in config:
            changed.append(f"--{k} ({saved[k]} there, no such flag now)")
        elif saved[k] != config[k]:
            changed.append(f"--{k} ({saved[k]} there, {config[k]} now)")
    return changed


def resume(out_dir, optimizer, config, defaults, say=print):
    """Restore the optimizer and RNG state of the newest good checkpoint; returns (step, model tensors), the
    tensors for model.load_trainable_state, or (0, None) when there is nothing to resume from.

    Refuses (one line) a checkpoint whose config differs from this run's in a key not in MAY_CHANGE_ON_RESUME
    (resume_conflicts; `defaults`: each key's default, for a checkpoint written before a flag existed), and a run
    whose checkpoints are all damaged."""
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
    changed = resume_conflicts(state["config"], config, defaults)
    if changed:
        fail(f"cannot resume {folder}: it was trained with other " + ", ".join(changed) +
             "; resume with its values, or start another --out_dir")
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
