"""The LoRA file the front ends load (ComfyUI, Forge, AUTOMATIC1111, kohya's sd-scripts): the kohya layout, for every
family. The trainers write it beside the diffusers file (model.export), as lora_kohya.safetensors.

Each key is `lora_unet_<a layer's name, "." -> "_">` with `.lora_down.weight` (A, r x in), `.lora_up.weight` (B,
out x r) and `.alpha`; the front ends scale B A by alpha / r, peft by its `scaling`, so alpha = scaling x r keeps the
strength (without `.alpha` they use 1.0). Which layer names:
- SD1.5 and SDXL: the UNet's diffusers names. ComfyUI's comfy/lora.py model_lora_keys_unet maps exactly these, and
  A1111's Lora extension converts them to its own.
- SD3/SD3.5, FLUX.1, FLUX.2 [klein]: the ORIGINAL (Stability / BFL) checkpoint's names, the one layout ComfyUI,
  Forge and Forge Neo all load (lllyasviel's Forge has no diffusers-name map for SD3 at all). The original keeps
  q, k and v as one fused linear (`...attn.qkv`), and FLUX.1's single-block `linear1` also holds the MLP's input
  rows; diffusers splits them, so peft trains one adapter per piece. The file holds one LoRA per original weight,
  the pieces fused exactly:

      down = [A_q; A_k; A_v]                   (r_q + r_k + r_v) x in, stacked
      up   = B_q, B_k, B_v placed block-diagonally, each at its own rows of the fused weight, zeros elsewhere
      up @ down = [B_q A_q; B_k A_k; B_v A_v]  rows no adapter covers (FLUX.1 linear1's MLP rows) stay zero

Checked with ComfyUI's and Forge's own loaders on the real widths (tools/check_flow_lora_in_comfyui.py): every
key used, every patched weight base + alpha / r up @ down; and in tests/test_flow.py against the adapters.
"""
import torch

LORA_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def write(path, unet, family, resolution, title, dtype_name="fp16"):
    """The front ends' LoRA file for `unet`'s adapter "default" in dtype `dtype_name` (fp16 by default, as front-end
    LoRAs usually are: half the size), with the header they read."""
    from safetensors.torch import save_file
    config, dtype = unet.peft_config["default"], LORA_DTYPES[dtype_name]
    if family in ("sd", "sdxl"):
        weights, meta = kohya_lora_state_dict(unet, dtype=dtype), kohya_metadata(family, config.r, config.lora_alpha,
                                                                                  resolution, title, dtype_name)
    else:
        weights = frontend_lora_state_dict(unet, family, dtype=dtype)
        meta = frontend_lora_metadata(family, config.r, config.lora_alpha, resolution, title, dtype_name,
                                      frontend_variant(unet, family))
    save_file(weights, path, metadata=meta)


# ------------------------------------------------------------------------------------------------
# SD1.5 and SDXL: the UNet's own names

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
# the flow families: the original checkpoints' names, fused


QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADDED_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")

# family -> {diffusers block list: (original block list, {original layer: the diffusers linears whose outputs it
# stacks, in row order})}; a one-name tuple is a 1:1 layer. The names follow diffusers' own checkpoint converters
# (loaders/single_file_utils.py convert_{sd3,flux,flux2}_transformer_checkpoint_to_diffusers), read in reverse.
LAYOUTS = {
    "sd3": {"transformer_blocks": ("joint_blocks", {
        "x_block.attn.qkv": QKV,
        "x_block.attn.proj": ("attn.to_out.0",),
        "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # SD3.5-medium's second image attention
        "x_block.attn2.proj": ("attn2.to_out.0",),
        "x_block.mlp.fc1": ("ff.net.0.proj",),
        "x_block.mlp.fc2": ("ff.net.2",),
        "context_block.attn.qkv": ADDED_QKV,
        "context_block.attn.proj": ("attn.to_add_out",),  # the last block has none: its text stream ends there
        "context_block.mlp.fc1": ("ff_context.net.0.proj",),
        "context_block.mlp.fc2": ("ff_context.net.2",)})},
    "flux": {
        "transformer_blocks": ("double_blocks", {
            "img_attn.qkv": QKV,
            "img_attn.proj": ("attn.to_out.0",),
            "img_mlp.0": ("ff.net.0.proj",),
            "img_mlp.2": ("ff.net.2",),
            "txt_attn.qkv": ADDED_QKV,
            "txt_attn.proj": ("attn.to_add_out",),
            "txt_mlp.0": ("ff_context.net.0.proj",),
            "txt_mlp.2": ("ff_context.net.2",)}),
        "single_transformer_blocks": ("single_blocks", {
            "linear1": QKV + ("proj_mlp",),  # q, k, v and the MLP input, one linear in the original
            "linear2": ("proj_out",)})},  # reads [attention output; MLP hidden], as diffusers' proj_out does
    "flux2": {
        "transformer_blocks": ("double_blocks", {
            "img_attn.qkv": QKV,
            "img_attn.proj": ("attn.to_out.0",),
            "img_mlp.0": ("ff.linear_in",),
            "img_mlp.2": ("ff.linear_out",),
            "txt_attn.qkv": ADDED_QKV,
            "txt_attn.proj": ("attn.to_add_out",),
            "txt_mlp.0": ("ff_context.linear_in",),
            "txt_mlp.2": ("ff_context.linear_out",)}),
        "single_transformer_blocks": ("single_blocks", {  # diffusers keeps FLUX.2's single blocks fused: 1:1
            "linear1": ("attn.to_qkv_mlp_proj",),
            "linear2": ("attn.to_out",)})},
}


def frontend_lora_state_dict(transformer, family, adapter="default", dtype=torch.float32):
    """The transformer's peft adapter `adapter` as a kohya LoRA on the original layer names of `family` ("sd3",
    "flux" for FLUX.1, "flux2" for FLUX.2 [klein]). An adapted module that no original layer holds is an error,
    never a silent drop. Widths (the rows of each fused part) are read from the modules' weights."""
    from peft.tuners.lora import LoraLayer
    if family not in LAYOUTS:
        raise ValueError(f"family {family!r}: expected one of {sorted(LAYOUTS)}")
    modules = dict(transformer.named_modules())
    # diffusers module path -> (original layer, the diffusers paths it stacks, in row order)
    holder = {}
    for blocks, (original_blocks, layers) in LAYOUTS[family].items():
        for i in range(len(getattr(transformer, blocks, []))):
            for original, parts in layers.items():
                stacked = [f"{blocks}.{i}.{p}" for p in parts]
                for path in stacked:
                    holder[path] = (f"{original_blocks}.{i}.{original}", stacked)

    fused = {}  # original layer -> (stacked paths, [(path, A, B, scaling)] of the adapted ones)
    for name, module in modules.items():
        if not (isinstance(module, LoraLayer) and adapter in module.lora_A):
            continue
        if name not in holder:
            raise ValueError(f"{name} carries adapter {adapter!r}, but no layer of the original {family} checkpoint "
                             f"holds it: the front ends could not load it (map it in LAYOUTS or leave it untargeted)")
        if module.use_dora.get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
            raise ValueError(f"{name}: DoRA / LoRA bias cannot be written as a plain kohya LoRA")
        original, stacked = holder[name]
        A, B = module.lora_A[adapter].weight.detach().float(), module.lora_B[adapter].weight.detach().float()
        fused.setdefault(original, (stacked, []))[1].append((name, A, B, module.scaling[adapter]))

    out = {}
    for original, (stacked, adapted) in fused.items():
        rows = [getattr(modules[p], "base_layer", modules[p]).weight.shape[0] for p in stacked]
        first_row = {p: sum(rows[:n]) for n, p in enumerate(stacked)}
        down = torch.cat([A for _, A, _, _ in adapted])  # (sum of ranks, in)
        up = torch.zeros(sum(rows), down.shape[0])  # (out of the original weight, sum of ranks)
        # the file has one alpha per original weight: take the first part's scaling; with one LoraConfig every part
        # has it and B is copied unchanged (a part with another scaling, via alpha_pattern, gets it folded into B)
        scale = adapted[0][3]
        col = 0
        for path, A, B, s in adapted:
            row = first_row[path]
            up[row:row + B.shape[0], col:col + B.shape[1]] = B * (s / scale)
            col += B.shape[1]
        key = "lora_unet_" + original.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(scale * down.shape[0]))  # loaders: alpha / rank = scaling
    return out


def frontend_variant(transformer, family):
    """What frontend_lora_metadata's `variant` should say, read from the transformer's config: FLUX.1 [dev] has
    the guidance input and [schnell] does not. SD3 uses sd-scripts' rule (library/sd3_utils.py): no qk norm means
    3-medium; qk norm with dual-attention layers means 3.5-medium; qk norm without them means 3.5-large.
    FLUX.2 [klein] 4B is 3072 wide and 9B is 4096 wide; for any other width it returns None."""
    config = transformer.config
    if family == "flux":
        return "dev" if config.guidance_embeds else "schnell"
    if family == "sd3":
        return "medium" if config.qk_norm is None else "5-medium" if config.dual_attention_layers else "5-large"
    width = config.num_attention_heads * config.attention_head_dim
    return {3072: "4b", 4096: "9b"}.get(width)


def frontend_lora_metadata(family, rank, alpha, resolution, title, dtype="fp16", variant=None):
    """The safetensors header (all values strings) for a frontend_lora_state_dict file.

    modelspec.architecture follows what each family's trainer writes:
    - FLUX.1: sd-scripts' "flux-1-dev" / "flux-1-schnell" plus "/lora". lllyasviel Forge's LoRA list
      (network.py detect_version) tags a file as Flux when it sees "flux-1-dev/lora" or the BFL implementation
      URL; the URL also covers schnell.
    - SD3: sd-scripts' "stable-diffusion-3-" plus variant ("medium", "5-medium", "5-large"), plus "/lora",
      and implementation "diffusers" (what sd-scripts' determine_implementation gives an SD3 LoRA).
    - FLUX.2: musubi-tuner's "Flux.2-klein-4b" / "Flux.2-klein-9b", with implementation BFL's flux2 repository.
    No front end reads SD3's or FLUX.2's value; Forge lists such a file as "Unknown", offered for every model.
    ss_base_model_version is written only for FLUX.1 ("flux1", sd-scripts' MODEL_VERSION_FLUX_V1). There is no
    released sd-scripts value for FLUX.2 or SD3 that a loader reads.
    prediction_type is left out: these are flow models, and sd-scripts omits it for FLUX too."""
    import datetime
    side = resolution or 1024
    if family == "flux":
        variant = variant or "dev"
        arch, implementation = f"flux-1-{variant}", "https://github.com/black-forest-labs/flux"
    elif family == "sd3":
        arch, implementation = "stable-diffusion-3" + (f"-{variant}" if variant else ""), "diffusers"
    elif family == "flux2":
        arch = "Flux.2-klein" + (f"-{variant}" if variant else "")
        implementation = "https://github.com/black-forest-labs/flux2"
    else:
        raise ValueError(f"family {family!r}: expected sd3, flux or flux2")
    meta = {  # sd-scripts' network modules for FLUX.1 and SD3; FLUX.2 has no released sd-scripts module
        "ss_network_module": {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}.get(family, "networks.lora"),
        "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
        "ss_v2": "False", "ss_resolution": f"({side}, {side})", "ss_output_name": title, "ss_mixed_precision": dtype,
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": arch + "/lora",
        "modelspec.implementation": implementation, "modelspec.title": title,
        "modelspec.resolution": f"{side}x{side}", "modelspec.date": datetime.date.today().isoformat(),
    }
    if family == "flux":
        meta["ss_base_model_version"] = "flux1"
    return meta
