"""The model family: Stable Diffusion's parts loaded for training, LoRA, the frozen reference, the export
users load, and the pipelines evaluation and validation sample with.

Everything that knows which pipeline class a model is lives here, so another family changes one file.
"""
import copy
import json
import os
import shutil
from types import SimpleNamespace

import torch

from common import fail, one_line

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as in the diffusers LoRA scripts
LORA_FILE = "pytorch_lora_weights.safetensors"  # what pipe.load_lora_weights(folder) looks for
KOHYA_FILE = "lora_kohya.safetensors"  # the same LoRA for AUTOMATIC1111, Forge and ComfyUI (see kohya_lora_state_dict)


# ------------------------------------------------------------------------------------------------
# loading for training

def check_model_path(name, what="model"):
    """A path-like name that is not a folder is a typo, not a hub id: say so instead of querying the hub."""
    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        fail(f"{what} not found: {name} (expected a diffusers pipeline folder or a hub id like "
             f"stable-diffusion-v1-5/stable-diffusion-v1-5)")


def load_models(pretrained, ctx):
    """tokenizer, text encoder, VAE, UNet and the training noise scheduler from a diffusers folder or hub id.

    The frozen parts are held in ctx.frozen_dtype (their outputs are cached once); the UNet in fp32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    check_model_path(pretrained)
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
    return SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet.to(ctx.device),
                           noise_scheduler=noise_scheduler)


def add_lora(unet, rank):
    """peft LoRA adapters of rank `rank` on the attention projections (alpha = rank, so scale 1)."""
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def prepare_policy(unet, lora_rank, grad_checkpointing, ctx, need_reference=True):
    """Make the UNet trainable (fully, or through LoRA adapters) and build its frozen reference.

    Returns (trainable parameters, reference forward function or None).
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


def trainable_state(unet, lora):
    """What a checkpoint holds: the LoRA adapters, or the whole UNet."""
    if lora:
        from peft.utils import get_peft_model_state_dict
        return get_peft_model_state_dict(unet)
    return unet.state_dict()


def load_trainable_state(unet, lora, weights, where):
    """Put checkpoint tensors (trainable_state's keys) back into `unet`, on its device."""
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
# the result, in the layout users load

def export(out_dir, pretrained, unet, lora):
    """A LoRA file for `pipe.load_lora_weights(out_dir)`, or a full pipeline for
    `StableDiffusionPipeline.from_pretrained(out_dir)` (the base's other parts, fp32)."""
    from diffusers import StableDiffusionPipeline
    stage = os.path.join(out_dir, f".export.tmp{os.getpid()}")  # written whole here, then moved part by part
    shutil.rmtree(stage, ignore_errors=True)
    try:
        if lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict
            layers = convert_state_dict_to_diffusers({k: v.detach().float().cpu()
                                                      for k, v in get_peft_model_state_dict(unet).items()})
            StableDiffusionPipeline.save_lora_weights(stage, unet_lora_layers=layers, safe_serialization=True,  # with
                                                      unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())  # its alpha
            from safetensors.torch import save_file
            save_file(kohya_lora_state_dict(unet), os.path.join(stage, KOHYA_FILE))
        else:
            pipe = StableDiffusionPipeline.from_pretrained(pretrained, unet=unet, dtype=torch.float32)
            pipe.save_pretrained(stage, safe_serialization=True)
        for name in os.listdir(stage):  # a part is replaced only once it is complete
            dst = os.path.join(out_dir, name)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(stage, name), dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def kohya_lora_state_dict(unet, adapter="default"):
    """The UNet's LoRA in the kohya layout the front ends load: per adapted layer `lora_unet_<module path with
    . -> _>` (ComfyUI's comfy/lora.py model_lora_keys_unet maps exactly these names for SD1.5, A1111's Lora
    extension converts them to its own) with `.lora_down.weight` (A, r x in), `.lora_up.weight` (B, out x r) and
    `.alpha`; the front ends scale by alpha / r, peft by its `scaling`, so alpha = scaling * r keeps the strength.
    (diffusers' convert_state_dict_to_kohya writes alpha = r, right only when lora_alpha equals r.)"""
    from peft.tuners.lora import LoraLayer
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            key, down = "lora_unet_" + name.replace(".", "_"), module.lora_A[adapter].weight
            out[f"{key}.lora_down.weight"] = down.detach().float().cpu().contiguous()
            out[f"{key}.lora_up.weight"] = module.lora_B[adapter].weight.detach().float().cpu().contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(module.scaling[adapter] * down.shape[0]))
    return out


# ------------------------------------------------------------------------------------------------
# pipelines to sample with: evaluation and the trainers' validation grids

def sampling_pipeline(models, scheduler):
    """A pipeline over parts already in memory (the trainer's, with the live UNet), to draw validation images."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
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
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    common = dict(dtype=dtype, scheduler=scheduler, safety_checker=None, requires_safety_checker=False)
    kind = model_kind(source) if source else "base"
    pipe = StableDiffusionPipeline.from_pretrained(source if kind == "pipeline" else base, **common)
    if kind == "lora":
        pipe.load_lora_weights(source)
    elif kind == "unet":
        pipe.unet = UNet2DConditionModel.from_pretrained(source, dtype=dtype)
    elif kind == "checkpoint":
        load_checkpoint_unet(pipe.unet, source)
    return pipe.to(device)
