"""Write front-end LoRA files (frontend_lora.py) of diffusers transformers at the REAL widths of SD3.5-medium,
FLUX.1 [dev] and FLUX.2 [klein] 4B, cut to 1-2 blocks, with random weights. tools/check_flow_lora_in_comfyui.py then
loads them with ComfyUI's and Forge's own code, in a venv of their own (no diffusers there).

Set-up: the trainers' environment (pip install -r requirements.txt: diffusers and peft are what this uses). The
check's own set-up (ComfyUI @ a125cd84, Forge @ dfdcbab6, a venv with torch 2.14.1) is in its docstring. Run, from
the repository:
    python tools/flow_lora_realwidth.py --out /tmp/flow_lora_realwidth                 # 2 CPU cores: 40 s, peak 4 GB
    /work/venvs/comfy/bin/python tools/check_flow_lora_in_comfyui.py --files /tmp/flow_lora_realwidth \
        --comfy ComfyUI --forge forge

Writes, per family (sd3, flux, flux2) and adapter (trainer, wide), into --out:
  {family}_{adapter}.safetensors          the front-end file: frontend_lora_state_dict + frontend_lora_metadata
  {family}_{adapter}_modules.safetensors  each adapted diffusers module's lora_A, lora_B and scaling: the check builds
                                          its expected weights from these through ComfyUI's own diffusers-name map
Adapters: "trainer" = the trainers' targets (model.LORA_TARGETS), r=4, lora_alpha=8; "wide" adds the MLPs (FLUX.1:
also the single blocks' proj_mlp and proj_out), r=2, lora_alpha=6. Every lora_B is random: peft starts it at zero,
and a zero LoRA passes any check.
"""
import argparse
import os
import re
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: tools/..
sys.path.insert(0, ROOT)
from frontend_lora import frontend_lora_metadata, frontend_lora_state_dict, frontend_variant  # noqa: E402
from model import LORA_TARGETS  # noqa: E402

# the released configs with the block counts cut. SD3.5-medium: 24 heads of 64 = 1536 wide, qk RMS norm, attn2 in
# block 0; block 1 is the last block, whose text stream is pre-only (no to_add_out, no ff_context)
CONFIGS = {
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, dual_attention_layers=(0,), qk_norm="rms_norm")),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    "flux2": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
        guidance_embeds=False)),
}
MLPS = {"sd3": r".*\.(ff|ff_context)\.net\.(0\.proj|2)$",
        "flux": r".*\.(ff|ff_context)\.net\.(0\.proj|2)$|.*single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$",
        "flux2": r".*\.(ff|ff_context)\.linear_(in|out)$"}


def as_regex(targets):
    """peft's target_modules as one regex: a list of names matches a module whose path ends in one of them"""
    return targets if isinstance(targets, str) else r".*\.(" + "|".join(map(re.escape, targets)) + r")$"


ADAPTERS = {"trainer": (4, 8, lambda family: LORA_TARGETS[family]),
            "wide": (2, 6, lambda family: as_regex(LORA_TARGETS[family]) + "|" + MLPS[family])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "flow_lora_realwidth"),
                        help="folder for the files (made if missing); default: flow_lora_realwidth in the temp dir")
    args = parser.parse_args()

    import diffusers
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    os.makedirs(args.out, exist_ok=True)
    for family, (cls, config) in CONFIGS.items():
        t0 = time.time()
        torch.manual_seed(0)
        transformer = getattr(diffusers, cls)(**config)
        for adapter, (r, alpha, targets) in ADAPTERS.items():
            transformer.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian",
                                               target_modules=targets(family)), adapter_name=adapter)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in transformer.modules():
                if isinstance(m, LoraLayer):
                    for a in m.lora_B:
                        m.lora_B[a].weight.copy_(torch.randn(m.lora_B[a].weight.shape, generator=g) * 0.3)
        for adapter, (r, alpha, _) in ADAPTERS.items():
            lora = frontend_lora_state_dict(transformer, family, adapter)
            meta = frontend_lora_metadata(family, r, alpha, 1024, f"{family}-{adapter}",
                                          variant=frontend_variant(transformer, family))
            save_file(lora, os.path.join(args.out, f"{family}_{adapter}.safetensors"), metadata=meta)
            modules = {}
            for n, m in transformer.named_modules():
                if isinstance(m, LoraLayer) and adapter in m.lora_A:
                    modules[f"{n}.lora_A"] = m.lora_A[adapter].weight.detach().contiguous()
                    modules[f"{n}.lora_B"] = m.lora_B[adapter].weight.detach().contiguous()
                    modules[f"{n}.scaling"] = torch.tensor(float(m.scaling[adapter]))
            save_file(modules, os.path.join(args.out, f"{family}_{adapter}_modules.safetensors"))
            print(f"{family} {adapter}: {len(modules) // 3} adapted modules -> {len(lora)} tensors "
                  f"({len(lora) // 3} original weights), {meta['modelspec.architecture']}")
        width = config["num_attention_heads"] * config["attention_head_dim"]
        print(f"  {cls} width {width}: {sum(p.numel() for p in transformer.parameters()) / 1e6:.0f}M params, "
              f"{time.time() - t0:.0f} s")
        del transformer
    print(f"wrote {len(CONFIGS) * len(ADAPTERS) * 2} files to {args.out}")


if __name__ == "__main__":
    main()
