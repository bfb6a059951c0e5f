"""The LoRA file the front ends load (AUTOMATIC1111, Forge, ComfyUI), for SD1.5 and SDXL: the trainer's export
writes it beside the diffusers file, diffusers' own kohya loader reads it back to the same images, its alpha keeps
the strength, and every key names a real linear layer of the UNet with matching shapes.

    python -m pytest -q tests/test_kohya.py
"""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import frontend_lora
import model


def lora_unet(pipe_dir, rank, alpha, seed=0):
    """The tiny UNet with LoRA adapters as a trained run leaves them: B is zero at initialisation, so give it weights."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    unet = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=model.LORA_TARGETS["sd"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return unet


def images(pipe_dir, unet=None, lora=None, weight_name=None):
    """Two images of a fixed prompt and seed, as float arrays in [0, 1], from the folder's own pipeline class."""
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(pipe_dir, **({"unet": unet} if unet is not None else {}))
    if lora:
        pipe.load_lora_weights(lora, weight_name=weight_name)
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a red square", "a blue circle"], num_inference_steps=3, guidance_scale=7.5, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family, alpha", [("sd15", 4), ("sd15", 8), ("sdxl", 8)],
                         ids=["alpha=rank (the trainers)", "alpha=2*rank", "sdxl"])
def test_kohya_file_gives_the_images_of_the_trained_lora(tmp_path, request, family, alpha):
    tiny_pipe_dir = request.getfixturevalue("tiny_sdxl_dir" if family == "sdxl" else "tiny_pipe_dir")
    unet = lora_unet(tiny_pipe_dir, rank=4, alpha=alpha)
    model.export(str(tmp_path), tiny_pipe_dir, unet, lora=True, lora_dtype="fp32")  # exact; fp16: the next test
    kohya = load_file(str(tmp_path / model.KOHYA_FILE))
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {float(alpha)}
    trained = images(tiny_pipe_dir, unet=unet)  # the adapters in memory, as training ended
    from_kohya = images(tiny_pipe_dir, lora=str(tmp_path), weight_name=model.KOHYA_FILE)
    base = images(tiny_pipe_dir)
    diff = float(np.abs(from_kohya - trained).max())
    print(f"{family} alpha {alpha}: kohya file vs trained LoRA, max abs pixel difference {diff:.2e}; "
          f"LoRA vs base {float(np.abs(trained - base).max()):.3f}")
    assert diff < 1e-4  # fp32 rounding
    assert np.abs(trained - base).max() > 0.05  # the LoRA changes the images: an ignored file would fail above
    # the diffusers file (what load_lora_weights(out_dir) picks) agrees too: it carries the adapter's config, so
    # an alpha other than the rank is not read back as alpha = rank
    assert np.abs(images(tiny_pipe_dir, lora=str(tmp_path)) - from_kohya).max() < 1e-4


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_kohya_file_is_fp16_with_the_metadata_front_ends_read(tmp_path, request, family):
    """By default the kohya file is fp16 (half the size) and its header names the base model: AUTOMATIC1111 and
    Forge list a LoRA without metadata as version "Unknown" and offer it for every checkpoint."""
    from safetensors import safe_open
    tiny_pipe_dir = request.getfixturevalue("tiny_sdxl_dir" if family == "sdxl" else "tiny_pipe_dir")
    unet = lora_unet(tiny_pipe_dir, rank=4, alpha=8)
    out = tmp_path / "my_likes"
    model.export(str(out), tiny_pipe_dir, unet, lora=True, resolution=32)
    with safe_open(str(out / model.KOHYA_FILE), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")}
    assert dtypes == {torch.float16}
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_output_name"]) == ("4", "8.0", "my_likes")
    sdxl = family == "sdxl"
    # AUTOMATIC1111's and Forge's rule (extensions-builtin/Lora/network.py, NetworkOnDisk.detect_version)
    detected = "SDXL" if meta.get("ss_base_model_version", "").startswith("sdxl_") else \
        "SD2" if meta.get("ss_v2") == "True" else "SD1" if meta else "Unknown"
    assert detected == ("SDXL" if sdxl else "SD1")
    assert meta["modelspec.architecture"] == ("stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora")
    assert meta["modelspec.resolution"] == "32x32" and meta["modelspec.title"] == "my_likes"
    fp32 = frontend_lora.kohya_lora_state_dict(unet)
    nbytes = lambda sd: sum(v.numel() * v.element_size() for k, v in sd.items() if not k.endswith(".alpha"))
    assert 2 * nbytes(load_file(str(out / model.KOHYA_FILE))) == nbytes(fp32)  # half the weights' bytes
    trained = images(tiny_pipe_dir, unet=unet)
    from_kohya = images(tiny_pipe_dir, lora=str(out), weight_name=model.KOHYA_FILE)
    assert np.abs(from_kohya - trained).max() < 2e-2  # fp16 rounding of the adapters, far below the LoRA's effect
    assert np.abs(trained - images(tiny_pipe_dir)).max() > 0.05


@pytest.mark.parametrize("fixture", ["tiny_pipe_dir", "tiny_sdxl_dir"])
def test_every_kohya_key_names_a_linear_layer_of_the_unet(request, fixture):
    from diffusers import UNet2DConditionModel
    tiny_pipe_dir = request.getfixturevalue(fixture)
    rank = 4
    kohya = frontend_lora.kohya_lora_state_dict(lora_unet(tiny_pipe_dir, rank=rank, alpha=rank))
    # ComfyUI's model_lora_keys_unet names a layer "lora_unet_" + its diffusers key without ".weight", dots to
    # underscores; the same rule over the module paths of a plain UNet, with no adapters, gives every name
    plain = UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet")
    layers = {"lora_unet_" + name.replace(".", "_"): m for name, m in plain.named_modules() if name}
    prefixes = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya})
    expected = sorted(n for n, m in layers.items() if n.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0"))
                      and isinstance(m, torch.nn.Linear))
    assert prefixes == expected and len(expected) > 0  # every adapted projection, nothing else
    assert any("_attn1_" in p for p in prefixes) and any("_attn2_" in p for p in prefixes)
    assert any(p.startswith("lora_unet_mid_block_") for p in prefixes) and any(p.startswith("lora_unet_up_blocks_") for p in prefixes)
    for p in prefixes:
        layer = layers[p]
        assert isinstance(layer, torch.nn.Linear)
        assert kohya[f"{p}.lora_down.weight"].shape == (rank, layer.in_features)
        assert kohya[f"{p}.lora_up.weight"].shape == (layer.out_features, rank)
        assert kohya[f"{p}.alpha"].shape == () and set(kohya) >= {f"{p}.lora_down.weight", f"{p}.lora_up.weight"}
    assert len(kohya) == 3 * len(prefixes)
