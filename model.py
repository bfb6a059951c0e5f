"""The model family: a text-to-image model's parts loaded for training, their conditioning, LoRA, the frozen
reference, the memory plan, the export users load, and the pipelines evaluation and validation sample with.

The family is read from the pipeline's model_index.json (no flag):
- sd: SD1.x/2.x (`StableDiffusionPipeline`): one CLIP text encoder, its last hidden states; a UNet predicting eps.
- sdxl: SDXL (`StableDiffusionXLPipeline`): two text encoders, their penultimate hidden states concatenated,
  77 x 2048; the second one's pooled projection; and per image the six "time ids", original size, crop
  top-left and target size.
- sd3: SD3 / SD3.5 (`StableDiffusion3Pipeline`), a flow-matching transformer (MMDiT): two CLIP encoders (penultimate
  states side by side, zero-padded to T5's width, then T5-XXL's states after them: 77 + 256 tokens x 4096) and
  their two pooled projections side by side; latents are (z - shift) * scale; it predicts a velocity (losses.py).
- flux: FLUX.1 [dev] and [schnell] (`FluxPipeline`): T5-XXL's states (512 x 4096) and CLIP's pooled output (768);
  latents (z - shift) * scale, 16 channels, packed 2x2 into tokens of 64 with their (0, row, column) position ids;
  [dev] also takes the guidance value it was distilled with.
- flux2: FLUX.2 [klein] (`Flux2KleinPipeline`): one Qwen3 language model, its hidden states after layers 9, 18 and
  27 side by side (512 x 3 x 2560 for klein 4B); no pooled embedding; the FLUX.2 VAE's 32 channels patchified 2x2
  into 128 and normalised by the VAE's batch-norm statistics, one token per position, (0, row, column, 0) ids.
Everything that knows which family a model is lives here, so another family changes this file. The denoising
network, a UNet or a transformer, is `models.unet` everywhere (the trainers' loops do not care which).
"""
import copy
import importlib
import json
import os
import shutil
from types import SimpleNamespace

import torch

import frontend_lora
from files import check_model_path, fail, one_line
from parallel import gather_whole, is_sharded, optimizer_state_bytes, shard_of

# model_index.json's _class_name -> family
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3",
            "FluxPipeline": "flux", "Flux2KleinPipeline": "flux2"}
FLOW_FAMILIES = ("sd3", "flux", "flux2")  # trained by flow matching: a velocity target at a continuous noise level
DENOISER = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer", "flux2": "transformer"}
DENOISER_FAMILY = {"UNet2DConditionModel": "sd", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
                   "Flux2Transformer2DModel": "flux2"}  # (sd and sdxl share the UNet's class and LoRA targets)
# the layers LoRA adapts: the attention projections, as in the diffusers LoRA scripts (train_text_to_image_lora*.py;
# for SD3 train_dreambooth_lora_sd3.py's default, which adds the text stream's projections of the joint attention)
# and for FLUX.1 the same list (it reaches the single blocks' q, k, v too); FLUX.2's single blocks fuse q, k, v with the
# MLP's input (to_qkv_mlp_proj) and the attention's output with the MLP's (attn.to_out, a Linear there, where the double
# blocks' to_out is a list): a regex, as peft takes, adapts both (train_dreambooth_lora_flux2_klein.py lists them by index)
LORA_TARGETS = {"sd": ["to_k", "to_q", "to_v", "to_out.0"], "sdxl": ["to_k", "to_q", "to_v", "to_out.0"],
                "sd3": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"],
                "flux": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"],
                "flux2": r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|to_qkv_mlp_proj)$"
                         r"|.*single_transformer_blocks\.\d+\.attn\.to_out$"}
# how many T5 tokens a flow family's prompt is encoded to: its pipeline's default, so that training conditions the
# model exactly as sampling does (SD3's pipeline pads to 256; diffusers' SD3 LoRA script trains on 77: less cache)
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512, "flux2": 512}
# FLUX.1 [dev]'s guidance input while training: 1, the guidance of the plain conditional velocity that flow matching's
# target is (diffusers' FLUX LoRA script feeds its sampling default, 3.5, instead). Policy and reference see the same.
FLUX_TRAIN_GUIDANCE = 1.0
LORA_FILE = "pytorch_lora_weights.safetensors"  # what pipe.load_lora_weights(folder) looks for
KOHYA_FILE = "lora_kohya.safetensors"  # the same LoRA for ComfyUI, Forge and AUTOMATIC1111 (frontend_lora.py)


# ------------------------------------------------------------------------------------------------
# loading for training

def family_of(pretrained):
    """The family ('sd', 'sdxl', 'sd3', 'flux', 'flux2') from the pipeline class in model_index.json; another class
    gets one clear line."""
    from diffusers import DiffusionPipeline
    check_model_path(pretrained)
    try:
        cls = DiffusionPipeline.load_config(pretrained).get("_class_name")
    except (OSError, ValueError, EnvironmentError) as e:
        fail(f"cannot load a Stable Diffusion pipeline from {pretrained}: {one_line(e)}")
    if cls not in FAMILIES:
        fail(f"{pretrained} is a {cls}: supported are StableDiffusionPipeline (SD1.x, SD2.x), "
             f"StableDiffusionXLPipeline (SDXL), StableDiffusion3Pipeline (SD3, SD3.5), FluxPipeline (FLUX.1) and "
             f"Flux2KleinPipeline (FLUX.2 [klein])")
    return FAMILIES[cls]


def is_flow(family):
    return family in FLOW_FAMILIES


def pipeline_class(family):
    import diffusers
    return getattr(diffusers, next(cls for cls, f in FAMILIES.items() if f == family))


def load_models(pretrained, ctx, vae=None):
    """Tokenizers, text encoders, VAE, the denoiser (UNet or transformer) and the training noise scheduler from a
    diffusers folder or hub id, each of the class its model_index.json names (as DiffusionPipeline loads them).

    The text encoders are held in ctx.dtype (their outputs are cached once); the VAE too unless its config
    asks for fp32 (`force_upcast`: SDXL's VAE overflows in fp16), or `vae` names a replacement VAE (a folder
    or hub id, e.g. the community fp16-fix VAE); the denoiser in fp32 (trainable weights stay fp32). The
    training scheduler: DDPM for the UNet families (whatever the pipeline samples with: the noise of training is
    DDPM's), the pipeline's own flow-matching scheduler for the flow families (its shift)."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
    family = family_of(pretrained)
    if vae:
        check_model_path(vae, "VAE")
    index = DiffusionPipeline.load_config(pretrained)
    m = SimpleNamespace(family=family, tokenizer_2=None, text_encoder_2=None, tokenizer_3=None, text_encoder_3=None,
                        options={k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)})

    def part(name, **kw):  # a component of the class model_index.json names: ["transformers", "CLIPTextModel"]
        library, cls = index[name]
        return getattr(importlib.import_module(library), cls).from_pretrained(pretrained, subfolder=name, **kw)
    try:
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            if index.get(name, [None])[0]:
                setattr(m, name, part(name))
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if index.get(name, [None])[0]:
                setattr(m, name, part(name, dtype=ctx.dtype))
        m.vae = AutoencoderKL.from_pretrained(vae) if vae else part("vae")
        m.unet = part(DENOISER[family], dtype=torch.float32)
        m.noise_scheduler = part("scheduler") if is_flow(family) else \
            DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    except (OSError, ValueError, EnvironmentError) as e:
        fail(f"cannot load a Stable Diffusion pipeline from {pretrained}: {str(e).splitlines()[0][:300]}")
    if not m.vae.config.get("force_upcast", True):  # diffusers' default is True: keep fp32 unless told it is safe
        m.vae.to(ctx.dtype)
    for enc in (m.text_encoder, m.text_encoder_2, m.text_encoder_3, m.vae):
        if enc is not None:
            enc.requires_grad_(False).eval().to(ctx.device)
    m.unet.to(ctx.device)
    return m


def encode_prompts(models, texts, device):
    """What the denoiser attends to, (n, L, d), and the pooled embedding, (n, d2), or None for SD.

    SD: the text encoder's last hidden states. SDXL, as its pipeline's encode_prompt: the penultimate hidden
    states of both encoders concatenated, and the second encoder's projected pooled output. SD3, as its pipeline's
    encode_prompt: both CLIP encoders' penultimate states side by side, zero-padded to T5's width, followed by
    T5's last states (MAX_SEQUENCE_LENGTH tokens); both projected pooled outputs side by side. FLUX.1: T5's last
    states and CLIP's pooled output. FLUX.2 [klein]: the prompt in Qwen3's chat template, its hidden states after
    layers 9, 18 and 27 side by side, no pooled embedding (the pipeline's own function: it is static)."""
    def ids(tok, length=None):
        return tok(texts, padding="max_length", truncation=True, max_length=length or tok.model_max_length,
                   return_tensors="pt").input_ids.to(device)
    if models.family == "sd":
        return models.text_encoder(ids(models.tokenizer)).last_hidden_state, None
    if models.family == "flux":
        pooled = models.text_encoder(ids(models.tokenizer)).pooler_output
        return models.text_encoder_2(ids(models.tokenizer_2, MAX_SEQUENCE_LENGTH["flux"]))[0], pooled
    if models.family == "flux2":
        return pipeline_class("flux2")._get_qwen3_prompt_embeds(models.text_encoder, models.tokenizer, texts, device=device,
                                                                max_sequence_length=MAX_SEQUENCE_LENGTH["flux2"]), None
    first = models.text_encoder(ids(models.tokenizer), output_hidden_states=True)
    second = models.text_encoder_2(ids(models.tokenizer_2), output_hidden_states=True)
    clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (n, 77, d1 + d2)
    if models.family == "sdxl":
        return clip, second.text_embeds
    # sd3 (the pipeline's tokenizer_max_length for CLIP is 77, as here)
    t5 = models.text_encoder_3(ids(models.tokenizer_3, MAX_SEQUENCE_LENGTH["sd3"]))[0]  # (n, 256, 4096)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])).to(t5.dtype)
    return torch.cat([clip, t5], dim=-2), torch.cat([first.text_embeds, second.text_embeds], dim=-1)


def latents_of(vae, posterior_mean, posterior_std):
    """A VAE posterior in the denoiser's latent space: (z - shift) * scale (SD and SDXL have no shift; SD3's VAE
    has shift 0.0609, scale 1.5305, FLUX.1's 0.1159 and 0.3611, from their configs); the std only scales. FLUX.2's VAE
    instead: 2x2 patches of its 32 channels as 128 channels, each normalised by the VAE's batch-norm statistics."""
    if hasattr(vae, "bn"):  # AutoencoderKLFlux2
        patchify = pipeline_class("flux2")._patchify_latents
        bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(posterior_mean)
        bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(posterior_mean)
        return (patchify(posterior_mean) - bn_mean) / bn_std, patchify(posterior_std) / bn_std
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor")
    mean = posterior_mean - shift if shift else posterior_mean
    return mean * scale, posterior_std * scale


def latent_shape(vae, resolution):
    """(C, h, w) of a latent at `resolution` pixels, as latents_of makes it."""
    side, c = resolution // 2 ** (len(vae.config.block_out_channels) - 1), vae.config.latent_channels
    return (4 * c, side // 2, side // 2) if hasattr(vae, "bn") else (c, side, side)


def flow_shift(models, shape):
    """The shift (losses.flow_sigma) of a flow model's noise levels for latents of `shape` (C, h, w): its scheduler's
    fixed shift (SD3: 3.0), or, where the scheduler shifts by image size (FLUX: use_dynamic_shifting), exp(mu), mu
    linear in the number of image tokens as FluxPipeline's calculate_shift samples with (FLUX.1 at 1024 px: 4096 tokens,
    shift 3.16; at 512 px 1.88). FLUX.2 [klein]'s pipeline samples with a steeper empirical mu, which also depends on
    the number of steps; we train it with FLUX.1's rule (diffusers' FLUX scripts train without a shift)."""
    import math
    if not is_flow(models.family):
        return 0.0  # (not used: a UNet's t is drawn uniformly)
    c = models.noise_scheduler.config
    if not c.get("use_dynamic_shifting"):
        return c.shift
    tokens = shape[-1] * shape[-2] // (1 if models.family == "flux2" else 4)  # FLUX.2's latents are patchified already
    slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    return math.exp(c.base_shift + slope * (tokens - c.base_image_seq_len))


def time_ids(original_hw, crop_top_left, target_hw):
    """SDXL's micro-conditioning of one image: (original h, w, crop top, left, target h, w). (6,)"""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)


def denoise(unet, x_t, t, cond):
    """The denoiser's prediction for conditioning `cond` (cache.condition's keys): the prompt's hidden states, and
    for SDXL the pooled embedding and time ids, for SD3 and FLUX.1 the pooled embedding. `unet` may be the DDP
    wrapper.
    t: the trainers' timesteps, (B,) in [0, 1000): a UNet's integer step, a flow model's 1000 sigma (what SD3's
    pipeline passes its transformer)."""
    kind = denoiser_class(unet)
    if kind == "SD3Transformer2DModel":
        return unet(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                    pooled_projections=cond["text_embeds"]).sample
    if kind in ("FluxTransformer2DModel", "Flux2Transformer2DModel"):
        return flux_denoise(unet, x_t, t, cond, kind == "Flux2Transformer2DModel")
    extra = {}
    if "time_ids" in cond:
        extra["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"], **extra).sample


def denoiser_class(unet):
    """The denoiser's diffusers class name through any wrapper: DDP's (.module) or FSDP2's (a subclass it names
    FSDP<class>)."""
    return type(getattr(unet, "module", unet)).__name__.removeprefix("FSDP")


def is_transformer(unet):
    """True for a flow family's transformer, False for a UNet."""
    return denoiser_class(unet) != "UNet2DConditionModel"


def flux_denoise(transformer, x_t, t, cond, flux2):
    """A FLUX transformer's velocity for latents (B, C, h, w), as its pipeline calls it: the latents as a sequence of
    tokens with their position ids, the timestep as sigma = t / 1000, and back to (B, C, h, w).
    FLUX.1: each 2x2 patch is a token of 4C (channel-major: c, then row, then column in the patch), ids (0, row,
    column) of the patch, the text's ids zeros; [dev] gets FLUX_TRAIN_GUIDANCE. FLUX.2: each position is a token
    (its latents are patchified already), ids (0, row, column, 0), the text's (0, 0, 0, index)."""
    b, c, h, w = x_t.shape
    n_text, dev = cond["encoder_hidden_states"].shape[1], x_t.device
    patch = 1 if flux2 else 2
    rows, cols = torch.meshgrid(torch.arange(h // patch), torch.arange(w // patch), indexing="ij")
    zero = torch.zeros_like(rows.flatten())
    if flux2:
        tokens = x_t.reshape(b, c, h * w).permute(0, 2, 1)  # (B, h w, C)
        img_ids = torch.stack([zero, rows.flatten(), cols.flatten(), zero], dim=-1).to(dev)  # (h w, 4) int64
        txt_ids = torch.stack([torch.zeros(n_text, dtype=torch.long)] * 3 + [torch.arange(n_text)], dim=-1).to(dev)
        extra = {}
    else:
        tokens = x_t.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.stack([zero, rows.flatten(), cols.flatten()], dim=-1).to(dev, x_t.dtype)  # (h w / 4, 3)
        txt_ids = torch.zeros(n_text, 3, device=dev, dtype=x_t.dtype)
        distilled = getattr(transformer, "module", transformer).config.guidance_embeds  # [dev], not [schnell]
        guidance = torch.full((b,), FLUX_TRAIN_GUIDANCE, device=dev) if distilled else None
        extra = {"pooled_projections": cond["text_embeds"], "guidance": guidance}
    out = transformer(hidden_states=tokens, timestep=t / 1000, encoder_hidden_states=cond["encoder_hidden_states"],
                      img_ids=img_ids, txt_ids=txt_ids, **extra).sample
    if flux2:
        return out.permute(0, 2, 1).reshape(b, c, h, w)
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def add_lora(unet, rank):
    """peft LoRA adapters of rank `rank` on the attention projections (alpha = rank, so scale 1)."""
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS[DENOISER_FAMILY[denoiser_class(unet)]]))


def prepare_policy(unet, lora_rank, grad_checkpointing, ctx, need_reference=True, quantize=False):
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
      base, so step 0 stays exact. `quantize` (--quantize_base int8, LoRA only) holds the frozen base's linear layers
      as int8 weights with one scale per output row (torchao's Int8WeightOnlyConfig; the rest stays as it was):
      half of bf16's memory, so that FLUX.1 [dev]'s 12B transformer (24 GB in bf16) takes a LoRA on a 24 GB card. It
      changes what the base computes, for policy and reference alike: step 0 stays exact (tests/test_flow.py).
    """
    if quantize and not lora_rank:
        fail("--quantize_base int8 is for LoRA (--lora_rank R): a full fine-tune trains every weight in fp32")
    if lora_rank > 0:
        unet.requires_grad_(False)
        if ctx.precision == "bf16":  # (torch's Module.to: diffusers' own warns about modules kept in fp32; the UNet has none)
            torch.nn.Module.to(unet, torch.bfloat16)
        if quantize:
            try:
                from torchao.quantization import Int8WeightOnlyConfig, quantize_
            except ImportError as e:
                fail(f"--quantize_base int8 needs torchao (pip install torchao==0.18.0): {one_line(e)}")
            quantize_(unet, Int8WeightOnlyConfig())  # peft then wraps each quantized layer (TorchaoLoraLinear)
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


def memory_plan(models, params, lora, optimizer_name, need_reference, keep_frozen, ctx, quantized=False):
    """The memory training holds per GPU, part by part (activations come on top: gradient checkpointing is what
    shrinks them). Printed at the start, so a run that cannot fit says so before the first step. Under --shard
    (ctx.shard) the rows are per process of ctx.world: see sharded_plan."""
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters()) if m is not None else 0
    n_train = sum(p.numel() for p in params)
    n_unet = sum(p.numel() for p in models.unet.parameters()) - (n_train if lora else 0)
    frozen = sum(size(getattr(models, name, None)) for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"))
    frozen_bytes = 2 if lora and ctx.precision == "bf16" else 4  # LoRA under bf16 holds its frozen base in bf16
    net, held = "transformer" if is_flow(models.family) else "UNet", "bf16" if frozen_bytes == 2 else "fp32"
    rows = [(f"{net} weights (fp32)" if not lora else f"{net} weights, frozen ({held})", frozen_bytes * n_unet)]
    if quantized:  # the frozen linear layers' weights in int8 (and an fp32 scale a row), the rest as it was
        linear = [m.weight for m in models.unet.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
        n_int8, rows_int8 = sum(w.numel() for w in linear), sum(w.shape[0] for w in linear)
        rows = [(f"{net} weights, frozen (int8 linear layers, the rest {held})",
                 n_int8 + 4 * rows_int8 + frozen_bytes * (n_unet - n_int8))]
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
    if is_transformer(unet):  # a flow family's transformer: its blocks (diffusers lists them as _no_split_modules)
        return [m for m in unet.modules() if type(m).__name__ in type(unet)._no_split_modules]
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
    import diffusers
    weights = gather_whole(unet.state_dict(), ctx)
    if not ctx.master:
        return None
    with torch.device("meta"):  # the class by name: fully_shard made `type(unet)` a subclass of its own
        whole = getattr(diffusers, denoiser_class(unet)).from_config(unet.config)
    whole.load_state_dict(weights, assign=True)
    return whole


# ------------------------------------------------------------------------------------------------
# the result, in the layout users load

def export(out_dir, pretrained, unet, lora, resolution=None, lora_dtype="fp16"):
    """A LoRA file for `pipe.load_lora_weights(out_dir)` (fp32) and the kohya file for the front ends (in
    `lora_dtype`, with the metadata they read: frontend_lora.py), or a full pipeline for `from_pretrained(out_dir)`
    of the base's class (the base's other parts, fp32). `resolution`: the training size, for the metadata."""
    family = family_of(pretrained)
    Pipeline = pipeline_class(family)
    stage = os.path.join(out_dir, f".export.tmp{os.getpid()}")  # written whole here, then moved part by part
    shutil.rmtree(stage, ignore_errors=True)
    try:
        if lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict
            layers = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(unet).items()}
            if not is_flow(family):  # the UNet loaders read diffusers' older names (to_q.lora.down); a transformer's
                layers = convert_state_dict_to_diffusers(layers)  # loader reads peft's own (lora_A), and only those
            net = DENOISER[family]  # unet_lora_layers or transformer_lora_layers, with its alpha in the metadata
            Pipeline.save_lora_weights(stage, safe_serialization=True, **{f"{net}_lora_layers": layers,
                                       f"{net}_lora_adapter_metadata": unet.peft_config["default"].to_dict()})
            frontend_lora.write(os.path.join(stage, KOHYA_FILE), unet, family, resolution,
                                os.path.basename(os.path.abspath(out_dir)), lora_dtype)
        else:
            pipe = Pipeline.from_pretrained(pretrained, dtype=torch.float32, **{DENOISER[family]: unet})
            pipe.save_pretrained(stage, safe_serialization=True)
        for name in os.listdir(stage):  # a part is replaced only once it is complete
            dst = os.path.join(out_dir, name)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(stage, name), dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


