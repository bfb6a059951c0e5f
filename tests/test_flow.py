"""Flow-matching models (SD3, FLUX.1 [dev], FLUX.2 [klein]), on tiny pipelines built from config: losses.py's
objectives on a transformer's velocity errors are exact at step 0 and move the policy the right way, and both
trainers take each family end to end (conditioning and latents as the pipeline builds them, the transformer called
as the pipeline calls it, LoRA and full, fp32 and bf16 exact at step 0, kill and resume bitwise, the export loading
in the pipeline and generating, 2 ranks = 1 rank).

    python -m pytest -q tests/test_flow.py            # default suite
    python -m pytest -q tests/test_flow.py -m slow    # torchrun with 2 ranks against 1
"""
import copy
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import common
import train_dpo
import train_kto
from conftest import ROOT, torchrun, write_pickapic
from losses import dpo_loss, flow_draw_u, flow_noise_and_target, flow_sigma, kto_loss, per_sample_error
from model import encode_prompts, load_models
from test_sdxl import args_for, records  # the same tiny-run flags and log reader


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline
    from toy.models import build_sd3_pipeline
    path = str(tmp_path_factory.mktemp("tiny_sd3"))
    build_sd3_pipeline(path, seed=0)
    return StableDiffusion3Pipeline.from_pretrained(path)


def test_the_tiny_sd3_pipeline_loads_and_samples(tiny_sd3):
    assert type(tiny_sd3.transformer).__name__ == "SD3Transformer2DModel"
    assert type(tiny_sd3.text_encoder_3).__name__ == "T5EncoderModel"
    assert tiny_sd3.tokenizer_3.convert_ids_to_tokens(tiny_sd3.tokenizer_3("a red circle").input_ids) == \
        ["\u2581a", "\u2581red", "\u2581circle", "</s>"]
    image = tiny_sd3("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and 0 <= image.min() and image.max() <= 1


def velocity_errors(pipe, transformer, prompts, images, seed, autocast=False):
    """Per-sample velocity errors of `transformer` on the images (B,3,H,W) in [-1, 1], each with its own sigma and
    noise from its own generator (as the trainers draw), conditioned as the pipeline's encode_prompt builds it."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                  max_sequence_length=16)
        z = pipe.vae.encode(images).latent_dist.mean
        x0 = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor  # SD3's latents
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    sigma = torch.stack([flow_sigma(flow_draw_u(g), pipe.scheduler.config.shift) for g in gens])  # (B,)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
    x, target = flow_noise_and_target(x0, noise, sigma)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        pred = transformer(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=embeds,
                           pooled_projections=pooled).sample
    return per_sample_error(pred, target)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_dpo_and_kto_on_velocity_errors_are_exact_at_step_0_and_one_step_moves_the_policy(tiny_sd3, autocast):
    prompts = ["a red circle", "a blue square", "a red circle", "a blue square"]  # winners, then losers
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    reference = tiny_sd3.transformer.eval().requires_grad_(False)
    policy = copy.deepcopy(reference).train().requires_grad_(True)
    ref_err = velocity_errors(tiny_sd3, reference, prompts, images, seed=7, autocast=autocast)
    policy_err = velocity_errors(tiny_sd3, policy, prompts, images, seed=7, autocast=autocast)
    assert torch.equal(policy_err, ref_err)  # the same x_sigma, sigma, noise and conditioning for both
    loss, _ = dpo_loss(torch.cat([policy_err[:2], policy_err[2:]]), ref_err, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    _, kto = kto_loss(policy_err, ref_err, torch.tensor([1.0, 1.0, -1.0, -1.0]), torch.tensor(0.0))
    assert torch.equal(kto["reward_d"][:2], torch.zeros(2)) and torch.equal(kto["reward_u"][2:], torch.zeros(2))
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p -= 1e-4 * p.grad / (p.grad.norm() + 1e-12)
    # measured in fp32 (bf16's rounding, times beta, would hide a step this small): the winners' velocity errors
    # went down against the losers'
    after, _ = dpo_loss(velocity_errors(tiny_sd3, policy, prompts, images, seed=7),
                        velocity_errors(tiny_sd3, reference, prompts, images, seed=7))
    assert after.item() < math.log(2)


# ------------------------------------------------------------------------------------------------
# the trainers on each flow family: SD3, FLUX.1 [dev], FLUX.2 [klein]

FAMILIES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "flux2": "Flux2KleinPipeline"}


def build(family, path):
    from toy.models import build_flux2_klein_pipeline, build_flux_pipeline, build_sd3_pipeline
    {"sd3": build_sd3_pipeline, "flux": build_flux_pipeline, "flux2": build_flux2_klein_pipeline}[family](path, seed=0)
    return path


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build("sd3", str(tmp_path_factory.mktemp("sd3_dir")))


@pytest.fixture(scope="module", params=list(FAMILIES))
def flow_dir(request, tmp_path_factory):
    """(family, a tiny pipeline of that family saved to a folder)."""
    return request.param, build(request.param, str(tmp_path_factory.mktemp(request.param)))


def pipeline(family, path):
    import diffusers
    return getattr(diffusers, FAMILIES[family]).from_pretrained(path)


def draw(pipe, **kw):
    return pipe(prompt="a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


def transformer_weights(folder):
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


def test_conditioning_and_latents_are_what_each_pipeline_builds(flow_dir):
    """Prompts as each pipeline's encode_prompt makes them (SD3: 77 CLIP + 256 T5 tokens, the CLIP states zero-padded
    to T5's width, both pooled projections; FLUX.1: 512 T5 tokens and CLIP's pooled output; FLUX.2: Qwen3's states
    after layers 9, 18, 27 side by side), and latents as each trains on them ((z - shift) * scale; FLUX.2: 2x2
    patches normalised by the VAE's batch-norm statistics)."""
    from PIL import Image
    from cache import encode_images
    family, path = flow_dir
    ctx = common.setup(0)
    models = load_models(path, ctx)
    pipe = pipeline(family, path)
    prompts = ["a red square", ""]
    with torch.no_grad():  # as the cache encodes (T5's kernels under autograd round differently)
        emb, pooled = encode_prompts(models, prompts, "cpu")
        if family == "sd3":
            ref_emb, _, ref_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        elif family == "flux":
            ref_emb, ref_pooled, _ = pipe.encode_prompt(prompts, None)
        else:
            (ref_emb, _), ref_pooled = pipe.encode_prompt(prompts), None
    assert emb.shape == {"sd3": (2, 77 + 256, 48), "flux": (2, 512, 48), "flux2": (2, 512, 48)}[family]
    assert torch.equal(emb, ref_emb) and (pooled is None) == (ref_pooled is None)
    assert pooled is None or torch.equal(pooled, ref_pooled)
    image = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    mean, _, _ = encode_images(models, [image], 32, ctx)
    with torch.no_grad():
        z = pipe.vae.encode(torch.full((1, 3, 32, 32), 200 / 127.5 - 1)).latent_dist.mean
        ref = pipe._encode_vae_image(torch.full((1, 3, 32, 32), 200 / 127.5 - 1), None) if family == "flux2" else \
            (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    torch.testing.assert_close(mean, ref)


def test_the_denoiser_is_called_as_each_pipeline_calls_it(flow_dir):
    """model.denoise on (B, C, h, w) latents equals the transformer called with the pipeline's own packing, position
    ids, timestep scale and guidance, unpacked with the pipeline's own unpacking."""
    from model import FLUX_TRAIN_GUIDANCE, denoise
    family, path = flow_dir
    pipe = pipeline(family, path)
    net = pipe.transformer.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = torch.randn(2, *{"sd3": (4, 16, 16), "flux": (16, 16, 16), "flux2": (128, 8, 8)}[family], generator=g)
        emb = torch.randn(2, 7, 48, generator=g)
        pooled = torch.randn(2, {"sd3": 32, "flux": 16, "flux2": 1}[family], generator=g)
        t = torch.tensor([250.0, 800.0])
        ours = denoise(net, x, t, {"encoder_hidden_states": emb, "text_embeds": pooled})
        if family == "sd3":
            ref = net(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled).sample
        elif family == "flux":
            packed = pipe._pack_latents(x, 2, 16, 16, 16)
            ids = pipe._prepare_latent_image_ids(2, 8, 8, "cpu", x.dtype)
            out = net(hidden_states=packed, timestep=t / 1000, guidance=torch.full((2,), FLUX_TRAIN_GUIDANCE),
                      pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=torch.zeros(7, 3), img_ids=ids).sample
            ref = pipe._unpack_latents(out, 32, 32, pipe.vae_scale_factor)
        else:
            ids = pipe._prepare_latent_ids(x)
            out = net(hidden_states=pipe._pack_latents(x), timestep=t / 1000, encoder_hidden_states=emb,
                      txt_ids=pipe._prepare_text_ids(emb), img_ids=ids).sample
            ref = pipe._unpack_latents_with_ids(out, ids, 8, 8)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("lora", [0, 4])
def test_dpo_two_steps_load_and_generate(flow_dir, tmp_path, lora):
    family, path = flow_dir
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=6)
    out = tmp_path / "out"
    train_dpo.main(args_for(path, pairs, out, tmp_path / "cache", "--max_steps", "2", "--lora_rank", str(lora),
                            "--val_every", "2", "--val_seeds", "1", "--val_steps", "2", "--val_prompts", "a red square"))
    log = records(out)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and log[0]["reward_margin"] == 0.0
    assert log[1]["reward_margin"] != 0.0  # the first step moved the policy
    assert os.path.exists(out / "val" / "step_0000002.png")
    if lora:
        pipe = pipeline(family, path)
        before = draw(pipe)
        pipe.load_lora_weights(str(out))
        from peft.utils import get_peft_model_state_dict
        loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="default_0")
        saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
        # every adapter, as trained: SD3's both streams (the last block's text stream has no output projection),
        # FLUX.1's double and single blocks, FLUX.2's fused single-block projections too
        assert len(saved) == 2 * {"sd3": 8 + 7, "flux": 8 + 3, "flux2": 8 + 2}[family]
        assert {f"transformer.{k}" for k in loaded} == set(saved)
        assert all(torch.equal(loaded[k], saved[f"transformer.{k}"]) for k in loaded)
        assert load_file(str(out / "lora_kohya.safetensors"))  # and the front ends' file beside it
    else:
        pipe = pipeline(family, str(out))
        base, tuned = transformer_weights(path), transformer_weights(str(out))
        assert any(not torch.equal(base[k], tuned[k]) for k in base)
    image = draw(pipe)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    if lora:
        assert not np.array_equal(image, before)  # the LoRA changes what it draws


@pytest.mark.parametrize("lora,ref_point", [(0, "batch"), (4, "mismatched")])
def test_kto_two_steps_load_and_generate(flow_dir, tmp_path, lora, ref_point):
    family, path = flow_dir
    root = tmp_path / "likes"
    write_likes(root)
    out = tmp_path / "out"
    train_kto.main(args_for(path, str(root), out, tmp_path / "cache", "--max_steps", "2", "--lora_rank", str(lora),
                            "--ref_point", ref_point))
    log = records(out)
    assert log[0]["loss"] == pytest.approx(0.5, abs=1e-7) and log[0]["ref_point"] == 0.0
    pipe = pipeline(family, path if lora else str(out))
    if lora:
        pipe.load_lora_weights(str(out))
    assert draw(pipe).shape == (1, 32, 32, 3)


def write_likes(root):
    from PIL import Image
    rng = np.random.default_rng(0)
    for label, color in [("liked", (220, 40, 40)), ("disliked", (40, 70, 220))]:
        (root / label).mkdir(parents=True)
        for i in range(4):
            a = np.full((40, 48, 3), 128, np.uint8)
            a[10:30, 10:30] = color
            Image.fromarray(np.clip(a + rng.integers(-8, 8, a.shape), 0, 255).astype(np.uint8)).save(root / label / f"{i}.png")
            (root / label / f"{i}.txt").write_text("a red square" if label == "liked" else "a blue square")


@pytest.mark.parametrize("lora", [0, 4])
def test_bf16_is_exact_at_step_0(flow_dir, tmp_path, lora, capsys):
    family, path = flow_dir
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=8)
    extra = ("--max_steps", "1", "--precision", "bf16", "--lora_rank", str(lora))
    train_dpo.main(args_for(path, pairs, tmp_path / "dpo", tmp_path / "cache", *extra))
    printed = capsys.readouterr().out
    assert f"memory plan per process ({family}, bf16)" in printed
    assert ("transformer weights, frozen (bf16)" in printed) == bool(lora)
    first = records(tmp_path / "dpo")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7) and first["reward_margin"] == 0.0
    train_kto.main(args_for(path, pairs, tmp_path / "kto", tmp_path / "cache", *extra, "--desirable_share", "0.5"))
    first = records(tmp_path / "kto")[0]
    assert (first["reward_d"], first["reward_u"], first["ref_point"]) == (0.0, 0.0, 0.0)


def test_killed_and_resumed_equals_uninterrupted(flow_dir, tmp_path, monkeypatch):
    """Ctrl-C as a finished checkpoint is renamed into place, then --resume: bitwise the run that never stopped (every
    sample's sigma and noise come from its own generator, so the resumed steps draw what they would have)."""
    family, path = flow_dir
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=6)
    cache = tmp_path / "cache"
    train_dpo.main(args_for(path, pairs, tmp_path / "ref", cache, "--max_steps", "3"))
    real_replace = os.replace

    def interrupted_replace(src, dst, *a, **k):
        if "step_0000002.tmp" in str(src):
            raise KeyboardInterrupt("Ctrl-C while saving")
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", interrupted_replace)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train_dpo.main(args_for(path, pairs, out, cache, "--max_steps", "3"))
    monkeypatch.setattr(os, "replace", real_replace)
    train_dpo.main(args_for(path, pairs, out, cache, "--max_steps", "3", "--resume"))
    a, b = transformer_weights(str(tmp_path / "ref")), transformer_weights(str(out))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_ranks_equal_one_rank(flow_dir, tmp_path):
    from test_train_dpo import assert_same_run
    family, path = flow_dir
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=8)
    cache = tmp_path / "cache"
    common_args = ("--max_steps", "3", "--micro_batch", "1", "--lr", "1e-4")
    train_dpo.main(args_for(path, pairs, tmp_path / "one", cache, *common_args))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    proc = subprocess.run(torchrun("train_dpo.py", *args_for(path, pairs, tmp_path / "two", cache, *common_args)),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two", transformer_weights(str(tmp_path / "one")),
                    transformer_weights(str(tmp_path / "two")), transformer_weights(path), lr=1e-4, steps=3)


def test_label_generate_online_kto_and_evaluate_take_each_family(flow_dir, tmp_path):
    """Everywhere a base model goes: label.py --generate's folder of samples, an online KTO round (sample, judge,
    train), and evaluate.py comparing the base with the round's checkpoint, each with the family's pipeline."""
    import evaluate
    import online_kto
    from PIL import Image
    from sample import generate_folder
    from test_online import run_args
    _, path = flow_dir
    (tmp_path / "p.txt").write_text("a red square\na blue square\n")
    generate_folder(str(tmp_path / "likes"), path, str(tmp_path / "p.txt"), 1, steps=2, resolution=32, tag="base")
    assert sorted(os.listdir(tmp_path / "likes")) == ["base_00000_s0.png", "base_00001_s0.png"]
    online_kto.main(run_args(path, tmp_path / "online", "--rounds", "1"))
    checkpoint = online_kto.final_checkpoint(str(tmp_path / "online" / "round_001"), 2)
    result = evaluate.main(["--pretrained", path, "--model", f"round1={checkpoint}", "--prompts", str(tmp_path / "p.txt"),
                            "--n", "2", "--steps", "2", "--resolution", "32", "--scorers", "toy.scorers:redness",
                            "--out", str(tmp_path / "eval")])
    assert set(result["scores"]) == {"base", "round1"} and result["scores"]["round1"] != result["scores"]["base"]
    assert Image.open(tmp_path / "eval" / "images" / "round1" / "00000_s0.png").size == (32, 32)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build("flux", str(tmp_path_factory.mktemp("flux_dir")))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_int8_frozen_base_keeps_step_0_exact_and_trains(flux_dir, tmp_path, precision, capsys):
    """--quantize_base int8 (LoRA): the base's linear layers held as int8 (torchao); policy and reference (adapters
    off) share them, so DPO's step 0 is log 2 and KTO's rewards 0 exactly; the LoRA trains and loads in the pipeline."""
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=8)
    extra = ("--max_steps", "2", "--precision", precision, "--lora_rank", "4", "--quantize_base", "int8")
    train_dpo.main(args_for(flux_dir, pairs, tmp_path / "dpo", tmp_path / "cache", *extra))
    assert "transformer weights, frozen (int8 linear layers" in capsys.readouterr().out
    log = records(tmp_path / "dpo")
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) and log[0]["reward_margin"] == 0.0
    assert log[1]["reward_margin"] != 0.0
    train_kto.main(args_for(flux_dir, pairs, tmp_path / "kto", tmp_path / "cache", *extra, "--desirable_share", "0.5"))
    first = records(tmp_path / "kto")[0]
    assert (first["reward_d"], first["reward_u"], first["ref_point"]) == (0.0, 0.0, 0.0)
    pipe = pipeline("flux", flux_dir)
    pipe.load_lora_weights(str(tmp_path / "dpo"))  # adapters trained on the int8 base load on the full-precision one
    assert np.isfinite(draw(pipe)).all()
    with pytest.raises(SystemExit, match="is for LoRA"):
        train_dpo.main(args_for(flux_dir, pairs, tmp_path / "full", tmp_path / "cache", "--max_steps", "1",
                                "--quantize_base", "int8"))


def test_text_cache_none_stores_no_captions_and_trains_alike(sd3_dir, tmp_path, capsys):
    """--text_cache none: the cache holds the latents only (no texts-*.safetensors), each caption is encoded when
    drawn, and the run matches the stored-text run up to the fp16 rounding of the stored states."""
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=6)
    runs = {}
    for mode in ("store", "none"):
        train_dpo.main(args_for(sd3_dir, pairs, tmp_path / mode, tmp_path / f"cache_{mode}", "--max_steps", "2",
                                "--text_cache", mode))
        runs[mode] = records(tmp_path / mode)
    printed = capsys.readouterr().out
    assert "captions encoded on the fly" in printed
    (folder,) = os.listdir(tmp_path / "cache_none")
    assert not [f for f in os.listdir(tmp_path / "cache_none" / folder) if f.startswith("texts")]
    assert runs["none"][0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert runs["none"][1]["loss"] == pytest.approx(runs["store"][1]["loss"], rel=1e-3)


def test_the_front_end_file_holds_every_adapter_fused_on_the_original_names(flow_dir, tmp_path):
    """frontend_lora.py's file for the flow families: one LoRA per layer of the ORIGINAL checkpoint (what ComfyUI and
    Forge load), q, k, v fused, and alpha / r x up @ down equal, row block by row block, to what each diffusers
    adapter adds (scaling x B @ A), zeros where no adapter is (FLUX.1 linear1's MLP rows). alpha != r, and the B are
    random, so a wrong scale, order or offset shows. FLUX.2's file also loads in diffusers to the same images.
    (ComfyUI's and Forge's own loaders: tools/check_flow_lora_in_comfyui.py, at the real widths.)"""
    from peft import LoraConfig
    import frontend_lora
    import model
    family, path = flow_dir
    pipe = pipeline(family, path)
    net = pipe.transformer
    net.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=model.LORA_TARGETS[family]))
    torch.manual_seed(0)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    out = frontend_lora.frontend_lora_state_dict(net, family)
    modules = dict(net.named_modules())
    covered = set()
    for blocks, (original_blocks, layers) in frontend_lora.LAYOUTS[family].items():
        for i in range(len(getattr(net, blocks, []))):
            for original, parts in layers.items():
                key = f"lora_unet_{original_blocks}.{i}.{original}".replace(".", "_")
                paths = [f"{blocks}.{i}.{p}" for p in parts if f"{blocks}.{i}.{p}" in modules]
                adapted = [p for p in paths if hasattr(modules[p], "lora_A")]
                if not adapted:
                    assert f"{key}.lora_down.weight" not in out
                    continue
                down, up = out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"]
                delta = out[f"{key}.alpha"] / down.shape[0] * up @ down
                row = 0
                for p in paths:
                    m = modules[p]
                    n = getattr(m, "base_layer", m).weight.shape[0]
                    want = (m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
                            if p in adapted else torch.zeros(n, down.shape[1]))
                    torch.testing.assert_close(delta[row:row + n], want.detach(), rtol=1e-5, atol=1e-6)
                    row += n
                assert row == up.shape[0]
                covered |= set(adapted)
    assert covered == {n for n, m in modules.items() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)}
    meta = frontend_lora.frontend_lora_metadata(family, 4, 8, 32, "t", "fp16", frontend_lora.frontend_variant(net, family))
    assert meta["modelspec.architecture"].endswith("/lora") and meta["ss_network_alpha"] == "8.0"
    if family == "flux2":  # diffusers reads FLUX.2's original-name file back (its FLUX.1 reader assumes FLUX.1's widths)
        from safetensors.torch import save_file
        save_file(out, str(tmp_path / "lora_kohya.safetensors"))
        with_adapter = draw(pipe)
        fresh = pipeline(family, path)
        fresh.load_lora_weights(str(tmp_path), weight_name="lora_kohya.safetensors")
        assert np.abs(draw(fresh) - with_adapter).max() < 1e-4
