"""Load the front-end LoRA files of tools/flow_lora_realwidth.py with ComfyUI's and Forge's own loaders, on models of
the real widths (SD3.5-medium, FLUX.1 [dev], FLUX.2 [klein] 4B; 1-2 blocks, random weights, fp32, CPU), and check
that every key is used and every patched weight is what the adapters say. It runs in a venv of its own (ComfyUI's
dependencies; no diffusers) and imports nothing from this repository.

Set-up, once (the commits these checks were run at):
    git clone https://github.com/Comfy-Org/ComfyUI && git -C ComfyUI checkout a125cd84                # 2025-10-12
    git clone https://github.com/lllyasviel/stable-diffusion-webui-forge forge && git -C forge checkout dfdcbab6
    python3 -m venv /work/venvs/comfy
    /work/venvs/comfy/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/venvs/comfy/bin/pip install safetensors einops scipy tqdm psutil pyyaml transformers
Run, from the repository (2 CPU cores: step 1 about 40 s and 4 GB, step 2 about 3.5 min and 6 GB):
    python tools/flow_lora_realwidth.py --out /tmp/flow_lora_realwidth             # the trainers' environment
    /work/venvs/comfy/bin/python tools/check_flow_lora_in_comfyui.py --files /tmp/flow_lora_realwidth \
        --comfy ComfyUI --forge forge                                              # or set COMFY and FORGE
At the pinned ComfyUI it ends "14 passed, 0 failed": FLUX.2's [comfy map] comparison and its control need a ComfyUI
of 2026 (after FLUX.2 support), whose flux_to_diffusers has FLUX.2's names; there it is 15 of 15.

ComfyUI. The model is what comfy.sd.load_diffusion_model_state_dict builds
(model_detection.model_config_from_unet_config -> get_model) from the unet config ComfyUI detects in the released
checkpoint, block counts cut. ComfyUI of 2025
has no FLUX.2, so for FLUX.2 a comfy.model_base.Flux (ComfyUI's later Flux2 subclasses it) gets blocks that hold
klein 4B's original layers at their real shapes; ComfyUI's key map is built from the state-dict names, so it runs
unchanged on them. Then comfy.sd.load_lora_for_models (the LoraLoader node's call), with "lora key not loaded"
warnings collected, and ModelPatcher.patch_weight_to_device for every patched weight. Each is compared with
  [file]       base + (alpha / rank) up @ down, read from the file: the loader applies the file as written;
  [comfy map]  base + the sum of each diffusers module's scaling B @ A, placed where ComfyUI's OWN diffusers-name map
               puts it (model_lora_keys_unet's `transformer.<diffusers name>` entries, rows and offsets included):
               this does not depend on frontend_lora's table. For FLUX.2 the map is the checkout's
               comfy.utils.flux_to_diffusers if it has FLUX.2's names (ComfyUI of 2026); otherwise only [file] runs.
A negative control loads each file again with the q and k rows of one fused qkv swapped: [comfy map] must see it.
Forge: the checkout's backend/patcher/lora.py (model_lora_keys_unet, load_lora, merge_lora_to_weight) with its
packages_3rdparty/comfyui_lora_collection; its backend imports are stubbed (memory_management.cast_to_device is a
.to(...); utils and operations serve only the patcher class, unused here). The steps are those of
extensions-builtin/sd_forge_lora/networks.py load_lora_for_models: more than 12 unmatched keys means "LoRA version
mismatch" and nothing is loaded; add_patches keeps the keys naming a model parameter; merge_lora_to_weight on each.
lllyasviel's Forge has no FLUX.2 model: its key map and merge run on FLUX.2's layer names, as a stand-in for Forge
Neo's loop (ComfyUI v0.3.77's).
"""
import argparse
import gc
import importlib.util
import logging
import os
import sys
import tempfile
import time
import types

import torch
from safetensors.torch import load_file

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--files", default=os.path.join(tempfile.gettempdir(), "flow_lora_realwidth"),
                    help="the folder tools/flow_lora_realwidth.py wrote (default: its default)")
parser.add_argument("--comfy", default=os.environ.get("COMFY"), help="a ComfyUI checkout (default: $COMFY)")
parser.add_argument("--forge", default=os.environ.get("FORGE"),
                    help="a lllyasviel/stable-diffusion-webui-forge checkout (default: $FORGE)")
args = parser.parse_args()
for name, path, inside in (("--comfy", args.comfy, "comfy/lora.py"),
                           ("--forge", args.forge, "backend/patcher/lora.py")):
    if not path or not os.path.isfile(os.path.join(path, inside)):
        parser.error(f"{name} {path}: no {inside} there; clone it as this script's docstring says")

sys.path.insert(0, args.comfy)
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # model_management asks CUDA for a device at import unless --cpu
import comfy.lora  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


WARN = Warnings()
logging.getLogger().addHandler(WARN)

# what comfy.model_detection.detect_unet_config returns for the released checkpoints, block counts cut
FLUX1_DEV = dict(image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768,
                 context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1,
                 depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=True)
SD35_MEDIUM = dict(in_channels=16, patch_size=2, out_channels=16, depth=24, num_blocks=2, input_size=None,
                   adm_in_channels=2048, num_patches=147456, pos_embed_max_size=384, qk_norm="rms",
                   context_embedder_config={"target": "torch.nn.Linear",
                                            "params": {"in_features": 4096, "out_features": 1536}},
                   pos_embed_scaling_factor=None, x_block_self_attn_layers=[0])
KLEIN_4B = dict(hidden=3072, mlp=3 * 3072, depth=1, depth_single_blocks=1)


# ------------------------------------------------------------------------------------------------
# models

def fill_random(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # comfy's ops leave weights uninitialised: give them values
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build(unet_config):
    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    assert model_config is not None, unet_config
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    fill_random(model)
    return model


def build_klein_4b():
    """A comfy.model_base.Flux whose blocks are FLUX.2 [klein] 4B's original layers: the names and shapes of BFL's
    flux2 checkpoints (qkv 3h, SwiGLU mlp.0 of 2 mlp, linear1 out 3h + 2 mlp, linear2 in h + mlp, no biases)."""
    h, mlp = KLEIN_4B["hidden"], KLEIN_4B["mlp"]
    model = build(dict(FLUX1_DEV, depth=0, depth_single_blocks=0))  # the Flux class, embedders only

    def linear(n_in, n_out):
        return torch.nn.Linear(n_in, n_out, bias=False)

    def double_block():
        b = torch.nn.Module()
        for stream in ("img", "txt"):
            attn = torch.nn.Module()
            attn.qkv, attn.proj = linear(h, 3 * h), linear(h, h)
            setattr(b, f"{stream}_attn", attn)
            setattr(b, f"{stream}_mlp", torch.nn.Sequential(linear(h, 2 * mlp), torch.nn.SiLU(), linear(mlp, h)))
        return b

    def single_block():
        b = torch.nn.Module()
        b.linear1, b.linear2 = linear(h, 3 * h + 2 * mlp), linear(h + mlp, h)
        return b

    dm = model.diffusion_model
    dm.double_blocks = torch.nn.ModuleList([double_block() for _ in range(KLEIN_4B["depth"])])
    dm.single_blocks = torch.nn.ModuleList([single_block() for _ in range(KLEIN_4B["depth_single_blocks"])])
    model.model_config.unet_config.update(image_model="flux2", hidden_size=h, mlp_ratio=3.0,
                                          depth=KLEIN_4B["depth"], depth_single_blocks=KLEIN_4B["depth_single_blocks"])
    fill_random(model)
    return model


# ------------------------------------------------------------------------------------------------
# the expected weights

def diffusers_map(family, model):
    """diffusers module name -> (weight key, (dim, first row, rows) or None), from ComfyUI's own code; None for
    FLUX.2 when this ComfyUI's flux_to_diffusers predates it."""
    if family == "flux2":
        entries = comfy.utils.flux_to_diffusers(model.model_config.unet_config, output_prefix="diffusion_model.")
        if not any(k.endswith("attn.to_qkv_mlp_proj.weight") for k in entries):
            return None
        entries = {f"transformer.{k[:-len('.weight')]}": v for k, v in entries.items() if k.endswith(".weight")}
    else:
        entries = comfy.lora.model_lora_keys_unet(model, {})
    return {k[len("transformer."):]: (v, None) if isinstance(v, str) else (v[0], v[1])
            for k, v in entries.items() if k.startswith("transformer.")}


def expected_from_modules(where, modules):
    """weight key -> [(rows offset or None, B, A)]: each diffusers module's scaling * B @ A, placed by ComfyUI's
    diffusers map. Kept as factors: the dense expectation is built one weight at a time (see expected)."""
    recipe, unmapped = {}, []
    for name in sorted({k.rsplit(".", 1)[0] for k in modules}):
        if name not in where:
            unmapped.append(name)
            continue
        key, offset = where[name]
        B = modules[f"{name}.scaling"].item() * modules[f"{name}.lora_B"]
        recipe.setdefault(key, []).append((offset, B, modules[f"{name}.lora_A"]))
    return recipe, unmapped


def expected_from_file(lora, key_map):
    """weight key -> [(None, (alpha / rank) * up, down)], read from the file, at the key the loader maps."""
    recipe = {}
    for k in [k[:-len(".alpha")] for k in lora if k.endswith(".alpha")]:
        target = key_map.get(k)
        if isinstance(target, str):
            down, up = lora[f"{k}.lora_down.weight"], lora[f"{k}.lora_up.weight"]
            recipe.setdefault(target, []).append((None, (lora[f"{k}.alpha"].item() / down.shape[0]) * up, down))
    return recipe


def expected(base, recipe, key):
    w = base[key].clone()
    for offset, B, A in recipe[key]:
        (w if offset is None else w.narrow(offset[0], offset[1], offset[2])).add_(B @ A)
    return w


class Originals(dict):
    """the model's weights before any patch, copied on first use (a full copy of FLUX.1 would cost 2 GB)."""

    def __init__(self, model):
        super().__init__()
        self.state = model.state_dict()

    def __missing__(self, key):
        self[key] = value = self.state[key].detach().clone()
        return value


class Errors:
    """max |got - expected| over the weights, for each expectation ([file], [comfy map]), one weight at a time."""

    def __init__(self, base, recipes):
        self.base, self.recipes, self.seen = base, recipes, set()
        self.err = {name: 0.0 for name in recipes}

    def add(self, key, got):
        self.seen.add(key)
        for name, recipe in self.recipes.items():
            if key in recipe:
                self.err[name] = max(self.err[name], float((got - expected(self.base, recipe, key)).abs().max()))

    def missing(self):  # weights an expectation changes that were not patched, and patched weights it leaves alone
        return sorted(set().union(*self.recipes.values()) ^ self.seen)

    def ok(self, delta):
        return max(self.err.values()) <= 1e-5 * delta and not self.missing()

    def __str__(self):
        return ", ".join(f"max |patched - [{name}]| = {e:.1e}" for name, e in self.err.items())


# ------------------------------------------------------------------------------------------------
# the loaders

def apply_with_comfy(model, lora, errors):
    WARN.records.clear()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, dict(lora), 1.0, 0.0)
    keys = sorted(patched.patches)
    for k in keys:
        patched.patch_weight_to_device(k)
        errors.add(k, comfy.utils.get_attr(model, k).detach())
    patched.unpatch_model()  # restores the backed-up weights
    return len(keys), list(WARN.records), sum(len(v) for v in patched.patches.values())


def import_forge(forge_dir):
    """Forge's backend/patcher/lora.py from the checkout, its backend imports stubbed (cast_to_device is a .to)."""
    sys.path.append(forge_dir)  # for packages_3rdparty; after ComfyUI, whose top-level names must win
    backend = types.ModuleType("backend")
    mm = types.ModuleType("backend.memory_management")
    mm.cast_to_device = lambda t, device, dtype, copy=False: t.to(device=device, dtype=dtype, copy=copy)
    ops = types.ModuleType("backend.operations")
    ops.bnb_avaliable = False
    backend.memory_management, backend.utils, backend.operations = mm, types.ModuleType("backend.utils"), ops
    sys.modules.update({"backend": backend, "backend.memory_management": mm, "backend.utils": backend.utils,
                        "backend.operations": ops})
    spec = importlib.util.spec_from_file_location("forge_patcher_lora",
                                                  os.path.join(forge_dir, "backend", "patcher", "lora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_with_forge(forge, model, lora, huggingface_repo, errors):
    """networks.load_lora_for_models' steps, then merge_lora_to_weight per weight (what LoraLoader.refresh runs)."""
    unet_config = model.model_config.unet_config
    shim = types.SimpleNamespace(state_dict=model.state_dict, diffusion_model=types.SimpleNamespace(config=unet_config),
                                 config=types.SimpleNamespace(huggingface_repo=huggingface_repo))
    key_map = forge.model_lora_keys_unet(shim, {})
    lora_unet, unmatched = forge.load_lora(dict(lora), key_map)
    if len(unmatched) > 12:  # networks.py: "LoRA version mismatch", nothing loaded
        return None, unmatched, 0
    params = dict(model.named_parameters())
    this_patches = {}  # Forge's ModelPatcher.add_patches: [strength_patch, patch, strength_model, offset, function]
    for k, v in lora_unet.items():
        key, offset = (k, None) if isinstance(k, str) else (k[0], k[1])
        if key in params:
            this_patches.setdefault(key, []).append([1.0, v, 1.0, offset, None])
    for k, p in this_patches.items():
        errors.add(k, forge.merge_lora_to_weight(p, params[k].detach().clone(), key=k))
    return len(this_patches), unmatched, len(lora_unet)


def swap_q_and_k(lora):
    """the file with the q and k row blocks of its first fused qkv swapped: a wrong layout the checks must see."""
    lora = dict(lora)
    key = next(k for k in sorted(lora) if k.endswith("qkv.lora_up.weight"))
    up, h = lora[key].clone(), lora[key].shape[0] // 3
    lora[key] = torch.cat([up[h:2 * h], up[:h], up[2 * h:]])
    return lora, key


# ------------------------------------------------------------------------------------------------
# the checks

def check_family(family, model, forge, huggingface_repo, results):
    base = Originals(model)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    where = diffusers_map(family, model)
    if where is None:
        print("  [comfy map] not compared: this ComfyUI's comfy.utils.flux_to_diffusers has no FLUX.2 entries "
              "('attn.to_qkv_mlp_proj'); that comparison (and its q/k control) needs a ComfyUI of 2026, after FLUX.2 "
              "support. [file] only")
    for adapter in ("trainer", "wide"):
        lora = load_file(os.path.join(args.files, f"{family}_{adapter}.safetensors"))
        recipes, unmapped = {"file": expected_from_file(lora, key_map)}, []
        if where is not None:
            recipes["comfy map"], unmapped = expected_from_modules(
                where, load_file(os.path.join(args.files, f"{family}_{adapter}_modules.safetensors")))
        delta = max(float((expected(base, recipes["file"], k) - base[k]).abs().max()) for k in recipes["file"])

        errors = Errors(base, recipes)
        n_weights, warnings, n_patches = apply_with_comfy(model, lora, errors)
        not_loaded = [w for w in warnings if w.startswith("lora key not loaded")]
        others = [w for w in warnings if w not in not_loaded]
        ok = not not_loaded and not unmapped and errors.ok(delta)
        results.append(ok)
        print(f"  [{'OK' if ok else 'FAIL'}] ComfyUI {family:5} {adapter:7}: {len(lora)} keys in file, "
              f"{len(lora) - len(not_loaded)} loaded, {n_patches} patches on {n_weights} weights; {errors} "
              f"(delta up to {delta:.2f})"
              + (f"; NOT LOADED {not_loaded[:3]}" if not_loaded else "")
              + (f"; patched or expected but not both: {errors.missing()}" if errors.missing() else "")
              + (f"; no ComfyUI diffusers name for {unmapped}" if unmapped else "")
              + (f"; other warnings {others[:3]}" if others else ""))

        if adapter == "trainer" and where is not None:  # negative control, once per family
            wrong, key = swap_q_and_k(lora)
            control = Errors(base, {"comfy map": recipes["comfy map"]})
            apply_with_comfy(model, wrong, control)
            e_wrong = control.err["comfy map"]
            results.append(e_wrong > 1e-3)
            print(f"  [control] ComfyUI {family:5} {adapter:7}: q and k rows swapped in {key}: max |patched - "
                  f"[comfy map]| = {e_wrong:.2f} (> 0: the [comfy map] check sees a wrong row layout)")

        errors = Errors(base, recipes)
        n_weights, unmatched, n_loaded = apply_with_forge(forge, model, lora, huggingface_repo, errors)
        if n_weights is None:
            results.append(False)
            print(f"  [FAIL] Forge   {family:5} {adapter:7}: LoRA version mismatch, {len(unmatched)} unmatched keys")
            continue
        ok = not unmatched and errors.ok(delta)
        results.append(ok)
        print(f"  [{'OK' if ok else 'FAIL'}] Forge   {family:5} {adapter:7}: {len(lora)} keys in file, "
              f"{len(lora) - len(unmatched)} loaded ({len(unmatched)} unmatched), {n_loaded} patches on {n_weights} "
              f"weights; {str(errors).replace('patched', 'merged')}"
              + (f"; unmatched {sorted(unmatched)[:3]}" if unmatched else "")
              + (f"; patched or expected but not both: {errors.missing()}" if errors.missing() else ""))


def main():
    t_start = time.time()
    print(f"ComfyUI {args.comfy}, Forge {args.forge}, files {args.files}, torch {torch.__version__}")
    forge = import_forge(args.forge)
    results = []
    for family, label, make, repo in (
            ("sd3", "SD3.5-medium, 2 joint blocks (attn2 in block 0, block 1 pre-only)",
             lambda: build(SD35_MEDIUM), "stabilityai/stable-diffusion-3.5-medium"),
            ("flux", "FLUX.1 [dev], 1 double + 1 single block", lambda: build(FLUX1_DEV),
             "black-forest-labs/FLUX.1-dev"),
            ("flux2", "FLUX.2 [klein] 4B layers, 1 double + 1 single block, in a comfy Flux model", build_klein_4b,
             "black-forest-labs/FLUX.2-klein-4B")):
        t0 = time.time()
        model = make()
        print(f"\n{label}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params")
        check_family(family, model, forge, repo, results)
        print(f"  ({time.time() - t0:.0f} s)")
        del model
        gc.collect()  # nn.Module reference cycles: free this model before the next is built
    print(f"\n{sum(results)} passed, {len(results) - sum(results)} failed ({time.time() - t_start:.0f} s)")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
