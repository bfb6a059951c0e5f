"""The model family: Stable Diffusion's parts loaded for training, their conditioning, LoRA, the frozen
reference, the memory plan, the export users load, and the pipelines evaluation and validation sample with.

Two families, read from the pipeline's model_index.json (no flag): SD1.x/2.x (`StableDiffusionPipeline`:
one CLIP text encoder, its last hidden states) and SDXL (`StableDiffusionXLPipeline`: two text encoders,
their penultimate hidden states concatenated, 77 x 2048; the second one's pooled projection; and per
image the six "time ids", original size, crop top-left and target size). Everything that knows which
family a model is lives here, so another family changes this file.
"""
import copy
import json
import os
import shutil
from types import SimpleNamespace

import torch

from files import check_model_path, fail, one_line
from parallel import gather_whole, is_sharded, optimizer_state_bytes, shard_of

FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}  # model_index.json's _class_name
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as in the diffusers LoRA scripts
LORA_FILE = "pytorch_lora_weights.safetensors"  # what pipe.load_lora_weights(folder) looks for
KOHYA_FILE = "lora_kohya.safetensors"  # the same LoRA for AUTOMATIC1111, Forge and ComfyUI (see kohya_lora_state_dict)


# ------------------------------------------------------------------------------------------------
# loading for training

def family_of(pretrained):
    """'sd' or 'sdxl', from the pipeline class in model_index.json; another class gets one clear line."""
    from diffusers import DiffusionPipeline
    check_model_path(pretrained)
    try:
        cls = DiffusionPipeline.load_config(pretrained).get("_class_name")
    except (OSError, ValueError, EnvironmentError) as e:
        fail(f"cannot load a Stable Diffusion pipeline from {pretrained}: {one_line(e)}")
    if cls not in FAMILIES:
        fail(f"{pretrained} is a {cls}: supported are StableDiffusionPipeline (SD1.x, SD2.x) and "
             f"StableDiffusionXLPipeline (SDXL)")
    return FAMILIES[cls]


def pipeline_class(family):
    import diffusers
    return diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline


def load_models(pretrained, ctx, vae=None):
    """Tokenizer(s), text encoder(s), VAE, UNet and the training noise scheduler from a diffusers folder or hub id.

    The text encoders are held in ctx.dtype (their outputs are cached once); the VAE too unless its config
    asks for fp32 (`force_upcast`: SDXL's VAE overflows in fp16), or `vae` names a replacement VAE (a folder
    or hub id, e.g. the community fp16-fix VAE); the UNet in fp32 (trainable weights stay fp32)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    family = family_of(pretrained)
    if vae:
        check_model_path(vae, "VAE")
    m = SimpleNamespace(family=family, tokenizer_2=None, text_encoder_2=None)
    try:
        m.tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
        m.text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=ctx.dtype)
        if family == "sdxl":
            m.tokenizer_2 = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2")
            m.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2",
                                                                           dtype=ctx.dtype)
        m.vae = AutoencoderKL.from_pretrained(vae) if vae else AutoencoderKL.from_pretrained(pretrained, subfolder="vae")
        m.unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", dtype=torch.float32)
        m.noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    except (OSError, ValueError, EnvironmentError) as e:
        fail(f"cannot load a Stable Diffusion pipeline from {pretrained}: {str(e).splitlines()[0][:300]}")
    if not m.vae.config.get("force_upcast", True):  # diffusers' default is True: keep fp32 unless told it is safe
        m.vae.to(ctx.dtype)
    for part in (m.text_encoder, m.text_encoder_2, m.vae):
        if part is not None:
            part.requires_grad_(False).eval().to(ctx.device)
    m.unet.to(ctx.device)
    return m


def encode_prompts(models, texts, device):
    """What the UNet attends to, (n, 77, d), and SDXL's pooled embedding, (n, d2), or None for SD.

    SD: the text encoder's last hidden states. SDXL, as its pipeline's encode_prompt: the penultimate hidden
    states of both encoders concatenated, and the second encoder's projected pooled output."""
    def ids(tok):
        return tok(texts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                   return_tensors="pt").input_ids.to(device)
    if models.family == "sd":
        return models.text_encoder(ids(models.tokenizer)).last_hidden_state, None
    first = models.text_encoder(ids(models.tokenizer), output_hidden_states=True)
    second = models.text_encoder_2(ids(models.tokenizer_2), output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds


def time_ids(original_hw, crop_top_left, target_hw):
    """SDXL's micro-conditioning of one image: (original h, w, crop top, left, target h, w). (6,)"""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)


def denoise(unet, x_t, t, cond):
    """The UNet's prediction for conditioning `cond` (cache.condition's keys): the prompt's hidden states, and
    for SDXL the pooled embedding and time ids. `unet` may be the DDP wrapper."""
    extra = {}
    if "time_ids" in cond:
        extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"], **extra).sample


def add_lora(unet, rank):
    """peft LoRA adapters of rank `rank` on the attention projections (alpha = rank, so scale 1)."""
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def prepare_policy(unet, lora_rank, grad_checkpointing, ctx, need_reference=True):
    """Make the UNet trainable (fully, or through LoRA adapters) and build its frozen reference.

    Returns (trainable parameters, reference forward function reference(x_t, t, cond), or None).
    The reference must reproduce the policy exactly at step 0, in every precision: beta 5000 turns any
    difference into a fake preference. So it computes exactly what the policy computes:
    - full fine-tune: a frozen copy held in fp32, like the policy's weights, and run under the same autocast
      (a copy held in bf16 is not the policy: measured on the trained toy base under bf16 autocast, the
      step-0 DPO loss was 0.936 instead of log 2; held in fp32 the errors were bitwise equal);
    - LoRA: the same module with its adapters disabled, exact by construction and free in memory. Under bf16 the
      frozen base is held in bf16 (half the memory; autocast casts every matmul's weights to bf16 anyway, as the
      diffusers LoRA scripts hold it in the training dtype), the adapters in fp32; policy and reference share the
      base, so step 0 stays exact.
    """
    if lora_rank > 0:
        unet.requires_grad_(False)
        if ctx.precision == "bf16":  # (torch's Module.to: diffusers' own warns about modules kept in fp32; the UNet has none)
            torch.nn.Module.to(unet, torch.bfloat16)
        add_lora(unet, lora_rank)
        for p in unet.parameters():
            if p.requires_grad:  # the adapters: trainable weights stay fp32
                p.data = p.data.float()

        def reference(x_t, t, cond):
            unet.disable_adapters()  # always the unwrapped module: a no-grad forward needs no DDP hooks
            try:
                return denoise(unet, x_t, t, cond)
            finally:
                unet.enable_adapters()
    elif need_reference:
        ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        if ctx.shard:  # split as the trainer splits the policy (after --init_from): bitwise the same gathered forward
            shard_model(ref_unet, ctx, reference=True)

        def reference(x_t, t, cond):
            return denoise(ref_unet, x_t, t, cond)
    else:  # SFT needs no reference
        reference = None
    if grad_checkpointing:
        unet.enable_gradient_checkpointing()  # recompute activations in backward: less memory, ~30% more time
    unet.train()
    return [p for p in unet.parameters() if p.requires_grad], reference and torch.no_grad()(reference)


def memory_plan(models, params, lora, optimizer_name, need_reference, keep_frozen, ctx):
    """The memory training holds per GPU, part by part (activations come on top: gradient checkpointing is what
    shrinks them). Printed at the start, so a run that cannot fit says so before the first step. Under --shard
    (ctx.shard) the rows are per process of ctx.world: see sharded_plan."""
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters()) if m is not None else 0
    n_train = sum(p.numel() for p in params)
    n_unet = sum(p.numel() for p in models.unet.parameters()) - (n_train if lora else 0)
    frozen = size(models.vae) + size(models.text_encoder) + size(models.text_encoder_2)
    frozen_bytes = 2 if lora and ctx.precision == "bf16" else 4  # LoRA under bf16 holds its frozen base in bf16
    rows = [("UNet weights (fp32)" if not lora else f"UNet weights, frozen ({'bf16' if frozen_bytes == 2 else 'fp32'})",
             frozen_bytes * n_unet)]
    if lora:
        rows.append(("LoRA weights (fp32)", 4 * n_train))
    rows += [("gradients (fp32)", 4 * n_train),
             (f"{optimizer_name} state", optimizer_state_bytes(optimizer_name, params)),
             ("reference: " + ("none (SFT)" if not need_reference else "adapters off, shared (exact)" if lora
                               else "frozen copy in fp32 (exact at step 0; a bf16 copy would take half, inexact)"),
              4 * n_unet if need_reference and not lora else 0),
             ("VAE and text encoders" + ("" if keep_frozen else " (freed after caching)"), frozen if keep_frozen else 0)]
    if ctx.shard:
        rows = sharded_plan(rows, models.unet, params, optimizer_name, ctx.world)
    gb = lambda n: f"{n / 2 ** 30:7.2f} GB"
    lines = [f"  {name:<72} {gb(n)}" for name, n in rows]
    total = sum(n for _, n in rows)
    fits = ""
    if ctx.cuda:
        capacity = torch.cuda.get_device_properties(ctx.device).total_memory
        fits = f" of {gb(capacity).strip()} on {torch.cuda.get_device_name(ctx.device)}"
    sharded = f", sharded over {ctx.world} processes" if ctx.shard else ""
    return "\n".join([f"memory plan per process ({models.family}, {ctx.precision}{sharded}):"] + lines +
                     [f"  {'total before activations' + fits:<72} {gb(total)}"])


def trainable_state(unet, lora):
    """What a checkpoint holds: the LoRA adapters, or the whole UNet."""
    if lora:
        from peft.utils import get_peft_model_state_dict
        return get_peft_model_state_dict(unet)
    return unet.state_dict()


def load_trainable_state(unet, lora, weights, where):
    """Put checkpoint tensors (trainable_state's keys) back into `unet`, on its device; a sharded UNet's
    (--shard) each rank cuts its own shard of every tensor."""
    if not lora and any(is_sharded(p) for p in unet.parameters()):
        mine = unet.state_dict()
        unet.load_state_dict({k: shard_of(v, mine.get(k)) for k, v in weights.items()})
        return
    device = next(unet.parameters()).device
    weights = {k: v.to(device) for k, v in weights.items()}
    if lora:
        from peft.utils import set_peft_model_state_dict
        result = set_peft_model_state_dict(unet, weights)
        if getattr(result, "unexpected_keys", None):
            fail(f"checkpoint {where} does not match this LoRA configuration")
    else:
        unet.load_state_dict(weights)


def load_checkpoint_unet(unet, folder):
    """Put the weights of a training checkpoint (out_dir/checkpoints/step_N) into `unet`, a base UNet.

    For evaluating a run part-way: full fine-tunes hold the whole UNet, LoRA runs their adapters."""
    from safetensors.torch import load_file
    with open(os.path.join(folder, "state.json")) as f:
        rank = json.load(f)["config"].get("lora_rank", 0)
    if rank:
        add_lora(unet, rank)
    load_trainable_state(unet, rank > 0, load_file(os.path.join(folder, "model.safetensors")), folder)
    return unet


# ------------------------------------------------------------------------------------------------
# sharding (--shard): the UNet split into FSDP2 units; what happens around them is in parallel.py and checkpoints.py

# the units FSDP2 gathers one at a time: diffusers' residual and transformer blocks, the ones gradient
# checkpointing recomputes. Whole down/up blocks would be too coarse: SDXL's first up block holds ~1B parameters
# (4 GB in fp32, gathered at once), its largest residual block 48M. A transformer family adds its blocks here.
SHARD_UNITS = ("ResnetBlock2D", "BasicTransformerBlock")


def shard_units(unet):
    """The modules fully_shard wraps, innermost first: every residual and transformer block, then each down, mid and
    up block (for what is left in it: samplers, the attention blocks' projections and norms). The root module
    (conv_in, the time and text-time embeddings, conv_out) is wrapped last, by shard_model."""
    blocks = [m for m in unet.modules() if type(m).__name__ in SHARD_UNITS]
    return blocks + [b for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks) if b is not None]


def shard_model(unet, ctx, reference=False):
    """FSDP2 over `unet`, in place: each unit's fp32 parameters are cut into ctx.world blocks of rows, one per process,
    gathered whole just before the unit computes (forward, and backward again) and freed after; gradients are
    reduce-scattered, so each rank keeps the gradient of its rows only. No MixedPrecisionPolicy: the weights are
    gathered in fp32 and the forward runs under the trainers' autocast, as without --shard (bitwise the same
    computation; bf16 gathering would halve the traffic but change the numerics and the step-0 exactness).
    reference: the frozen copy, resharded after its forward too (it has no backward to wait for)."""
    from torch.distributed.fsdp import fully_shard
    for unit in shard_units(unet):
        fully_shard(unit)
    fully_shard(unet, reshard_after_forward=True if reference else None)
    return unet


def shard_groups(unet):
    """(name, parameters) of each FSDP2 group shard_model makes: each unit with its parameters not in an inner unit,
    and the root ('') with the rest. For the memory plan; works on a meta-device UNet."""
    names = {m: n for n, m in unet.named_modules()}
    seen, groups = set(), []
    for module in [*shard_units(unet), unet]:
        own = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        groups.append((names[module], sum(p.numel() for p in own)))
    return groups


def sharded_plan(rows, unet, params, optimizer_name, world):
    """memory_plan's rows of a full fine-tune sharded over `world` processes: the weights, gradients, optimizer state
    and reference 1/world each (Adafactor's state as ShardedAdafactor holds it), and what FSDP2 holds gathered while
    it computes: the root's own parameters (kept from forward to backward), the largest unit's weights and gradients
    (before their reduce-scatter) and the next unit's weights, gathered ahead (an estimate, in fp32)."""
    (_, weights), (_, grads), _, (_, reference), frozen = rows  # a full fine-tune's five rows
    groups = sorted(shard_groups(unet), key=lambda g: -g[1])
    root, (largest, n_largest), (_, n_next) = dict(groups)[""], *[g for g in groups if g[0]][:2]
    state = f"{optimizer_name} state (1/{world}" + (", matrices' column moments whole)" if optimizer_name == "adafactor"
                                                      else ")")
    return [(f"UNet weights (fp32, 1/{world} each)", weights / world), (f"gradients (fp32, 1/{world} each)", grads / world),
            (state, optimizer_state_bytes(optimizer_name, params, world)),
            ("reference: frozen fp32 copy sharded like the policy (exact at step 0)", reference / world),
            (f"in flight (gathered): root + {largest}, its grads, next unit", 4 * (root + 2 * n_largest + n_next)),
            frozen]


def gathered_unet(unet, ctx):
    """The UNet whole, for export: without --shard `unet` itself; a sharded one's weights are gathered (every rank
    must call this, one tensor at a time) into a plain UNet of the same config on rank 0's CPU; None on the others."""
    if not ctx.shard:
        return unet
    from diffusers import UNet2DConditionModel
    weights = gather_whole(unet.state_dict(), ctx)
    if not ctx.master:
        return None
    with torch.device("meta"):
        whole = UNet2DConditionModel.from_config(unet.config)
    whole.load_state_dict(weights, assign=True)
    return whole


# ------------------------------------------------------------------------------------------------
# the result, in the layout users load

LORA_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def export(out_dir, pretrained, unet, lora, resolution=None, lora_dtype="fp16"):
    """A LoRA file for `pipe.load_lora_weights(out_dir)` (fp32) and the kohya file for the front ends (in
    `lora_dtype`, fp16 as front-end LoRAs usually are: half the size, with the metadata they read), or a full
    pipeline for `from_pretrained(out_dir)` of the base's class (StableDiffusionPipeline or
    StableDiffusionXLPipeline; the base's other parts, fp32). `resolution`: the training size, for the metadata."""
    family = family_of(pretrained)
    Pipeline = pipeline_class(family)
    stage = os.path.join(out_dir, f".export.tmp{os.getpid()}")  # written whole here, then moved part by part
    shutil.rmtree(stage, ignore_errors=True)
    try:
        if lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict
            layers = convert_state_dict_to_diffusers({k: v.detach().float().cpu()
                                                      for k, v in get_peft_model_state_dict(unet).items()})
            Pipeline.save_lora_weights(stage, unet_lora_layers=layers, safe_serialization=True,  # with its alpha
                                       unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
            from safetensors.torch import save_file
            rank = unet.peft_config["default"].r
            save_file(kohya_lora_state_dict(unet, dtype=LORA_DTYPES[lora_dtype]), os.path.join(stage, KOHYA_FILE),
                      metadata=kohya_metadata(family, rank, unet.peft_config["default"].lora_alpha, resolution,
                                              os.path.basename(os.path.abspath(out_dir)), lora_dtype))
        else:
            pipe = Pipeline.from_pretrained(pretrained, unet=unet, dtype=torch.float32)
            pipe.save_pretrained(stage, safe_serialization=True)
        for name in os.listdir(stage):  # a part is replaced only once it is complete
            dst = os.path.join(out_dir, name)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(stage, name), dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def kohya_metadata(family, rank, alpha, resolution, title, dtype="fp16"):
    """The header the front ends read from a kohya LoRA file (all values strings, as safetensors metadata are).
    kohya's sd-scripts keys: AUTOMATIC1111 and Forge take the base model from `ss_base_model_version` (SDXL when it
    starts with "sdxl_"; SD1 for any other file with metadata; "Unknown", and so offered for every checkpoint,
    for a file without) and show `ss_network_dim` / `ss_network_alpha`, `ss_output_name` as the name. Stability's
    ModelSpec keys (`modelspec.*`, as sd-scripts' library/sai_model_spec.py writes them for a LoRA): architecture,
    implementation, title, resolution, date, prediction type."""
    import datetime
    sdxl = family == "sdxl"
    side = resolution or (1024 if sdxl else 512)
    return {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1", "ss_v2": "False",
        "ss_resolution": f"({side}, {side})", "ss_output_name": title, "ss_mixed_precision": dtype,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ("stable-diffusion-xl-v1-base" if sdxl else "stable-diffusion-v1") + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.title": title, "modelspec.resolution": f"{side}x{side}", "modelspec.prediction_type": "epsilon",
        "modelspec.date": datetime.date.today().isoformat(),
    }


def kohya_lora_state_dict(unet, adapter="default", dtype=torch.float32):
    """The UNet's LoRA in the kohya layout the front ends load: per adapted layer `lora_unet_<module path with
    . -> _>` (ComfyUI's comfy/lora.py model_lora_keys_unet maps exactly these names for SD1.5 and SDXL, A1111's
    Lora extension converts them to its own) with `.lora_down.weight` (A, r x in), `.lora_up.weight` (B, out x r) and
    `.alpha`; the front ends scale by alpha / r, peft by its `scaling`, so alpha = scaling * r keeps the strength.
    (diffusers' convert_state_dict_to_kohya writes alpha = r, right only when lora_alpha equals r.)"""
    from peft.tuners.lora import LoraLayer
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            key, down = "lora_unet_" + name.replace(".", "_"), module.lora_A[adapter].weight
            out[f"{key}.lora_down.weight"] = down.detach().to(dtype).cpu().contiguous()
            out[f"{key}.lora_up.weight"] = module.lora_B[adapter].weight.detach().to(dtype).cpu().contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(module.scaling[adapter] * down.shape[0]))
    return out


# ------------------------------------------------------------------------------------------------
# pipelines to sample with: evaluation and the trainers' validation grids

def sampling_pipeline(models, scheduler):
    """A pipeline over parts already in memory (the trainer's, with the live UNet), to draw validation images."""
    parts = dict(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer, unet=models.unet,
                 scheduler=scheduler)
    if models.family == "sdxl":
        parts.update(text_encoder_2=models.text_encoder_2, tokenizer_2=models.tokenizer_2)
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(models.family)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_kind(source):
    """What our trainers left in a folder: 'pipeline' (full fine-tune), 'lora', 'unet', 'checkpoint', or None."""
    if os.path.isfile(os.path.join(source, "model_index.json")):  # checked first: it also has unet/config.json
        return "pipeline"
    if os.path.isfile(os.path.join(source, LORA_FILE)):
        return "lora"
    if os.path.isfile(os.path.join(source, "config.json")):
        return "unet"  # a bare UNet folder: config.json + diffusion_pytorch_model.safetensors
    if os.path.isfile(os.path.join(source, "model.safetensors")) and os.path.isfile(os.path.join(source, "state.json")):
        return "checkpoint"  # a trainer checkpoint, out_dir/checkpoints/step_N: a run part-way
    return None


def load_scheduler(base, kind=None):
    """The base pipeline's scheduler, whatever its class (PNDM for the SD1.5 release), or `kind` from its config."""
    import diffusers
    try:
        _, cls = diffusers.DiffusionPipeline.load_config(base)["scheduler"]  # e.g. ["diffusers", "PNDMScheduler"]
        return getattr(diffusers, kind or cls).from_pretrained(base, subfolder="scheduler")
    except Exception as e:
        fail(f"cannot load the base pipeline {base!r}: {one_line(e)}")


def load_pipeline(base, source, scheduler, device, dtype):
    """The base pipeline, or the base with a fine-tuned UNet / LoRA / checkpoint, or a whole fine-tuned pipeline.

    Every model gets the base's scheduler, so that only the weights differ between models."""
    from diffusers import UNet2DConditionModel
    kind = model_kind(source) if source else "base"
    family = family_of(source if kind == "pipeline" else base)
    common = dict(dtype=dtype, scheduler=scheduler)
    if family == "sd":
        common.update(safety_checker=None, requires_safety_checker=False)
    pipe = pipeline_class(family).from_pretrained(source if kind == "pipeline" else base, **common)
    if kind == "lora":
        pipe.load_lora_weights(source)
    elif kind == "unet":
        pipe.unet = UNet2DConditionModel.from_pretrained(source, dtype=dtype)
    elif kind == "checkpoint":
        load_checkpoint_unet(pipe.unet, source)
    return pipe.to(device)
