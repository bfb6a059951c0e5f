"""SDXL in both trainers, the cache, evaluation and the validation grid, on a tiny SDXL pipeline built from config.

    python -m pytest -q tests/test_sdxl.py            # default suite
    python -m pytest -q tests/test_sdxl.py -m slow    # torchrun with 2 ranks against 1
"""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
from public_data import load_singles
import train_dpo
import train_kto
from cache import LatentCache, build_cache, open_cache
from conftest import ROOT, torchrun, write_pickapic
from model import encode_prompts, load_models


def args_for(pipe, data_path, out, cache, *extra):
    return ["--pretrained", pipe, "--data", data_path, "--out_dir", str(out), "--cache_dir", str(cache),
            "--resolution", "32", "--global_batch", "4", "--micro_batch", "2", "--val_every", "-1",
            "--log_every", "1", "--save_every", "1", "--lr", "1e-3", "--warmup_steps", "1", "--beta", "100", *extra]


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def likes(tmp_path):
    root = tmp_path / "likes"
    rng = np.random.default_rng(0)
    for label, color in [("liked", (220, 40, 40)), ("disliked", (40, 70, 220))]:
        (root / label).mkdir(parents=True)
        for i in range(4):
            a = np.full((40, 48 + 8 * i, 3), 128, np.uint8)  # several sizes: the time ids differ per image
            a[10:30, 10:30] = color
            Image.fromarray(np.clip(a + rng.integers(-8, 8, a.shape), 0, 255).astype(np.uint8)).save(root / label / f"{i}.png")
            (root / label / f"{i}.txt").write_text("a red square" if label == "liked" else "a blue square")
    return str(root)


def test_conditioning_is_what_the_sdxl_pipeline_builds(tiny_sdxl_dir, tmp_path):
    """Prompts as StableDiffusionXLPipeline.encode_prompt makes them (77 x (16 + 16) hidden states, the pooled
    projection), and per image the time ids (original h, w, crop top, left, target h, w) of our crop."""
    from diffusers import StableDiffusionXLPipeline
    ctx = common.setup(0)
    models = load_models(tiny_sdxl_dir, ctx)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    emb, pooled = encode_prompts(models, ["a red square", ""], "cpu")
    ref_emb, _, ref_pooled, _ = pipe.encode_prompt(["a red square", ""], do_classifier_free_guidance=False)
    assert emb.shape == (2, 77, 32) and pooled.shape == (2, 16)
    torch.testing.assert_close(emb, ref_emb)
    torch.testing.assert_close(pooled, ref_pooled)
    # a non-square image: 40 x 56 (h x w) -> shorter side to 32: 32 x 45 (w), center crop left (45 - 32) // 2 = 6
    (tmp_path / "liked").mkdir()
    (tmp_path / "disliked").mkdir()
    Image.new("RGB", (56, 40), (200, 30, 30)).save(tmp_path / "liked" / "wide.png")
    Image.new("RGB", (30, 50), (30, 30, 200)).save(tmp_path / "disliked" / "tall.png")  # 30 x 50 -> 32 x 53, top 10
    for name in ("liked/wide", "disliked/tall"):
        (tmp_path / f"{name}.txt").write_text("a square")
    fb = load_singles(str(tmp_path))
    cache = LatentCache(build_cache(fb, str(tmp_path / "cache"), models, 32, True, ctx))
    ids = {os.path.basename(p): i for i, p in enumerate(fb.paths)}
    wide, tall = ids["wide.png"], ids["tall.png"]
    assert cache.condition(0, wide, False)["time_ids"].tolist() == [40, 56, 0, 6, 32, 32]
    assert cache.condition(0, wide, True)["time_ids"].tolist() == [40, 56, 0, 7, 32, 32]  # the mirror's crop: 45 - 32 - 6
    assert cache.condition(0, tall, False)["time_ids"].tolist() == [50, 30, 10, 0, 32, 32]
    cond = cache.condition(int(fb.caption_idx[0]), wide, False)
    torch.testing.assert_close(cond["encoder_hidden_states"], encode_prompts(models, ["a square"], "cpu")[0][0], atol=2e-3, rtol=2e-3)
    assert cond["text_embeds"].shape == (16,)
    # the empty prompt of prompt dropout is encoded the same way
    empty = cache.condition(cache.empty_caption, wide, False)
    torch.testing.assert_close(empty["text_embeds"], pooled[1], atol=2e-3, rtol=2e-3)
    # no cache at all: the same conditioning, encoded on the fly
    args = type("A", (), dict(latent_cache="none", resolution=32))()
    fly = open_cache(fb, args, models, ctx)
    assert fly.condition(0, wide, True)["time_ids"].tolist() == [40, 56, 0, 7, 32, 32]
    torch.testing.assert_close(fly.latent(wide, False, torch.zeros(fly.latent_shape())),
                               cache.latent(wide, False, torch.zeros(cache.latent_shape())), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("lora", [0, 4])
def test_dpo_two_steps_load_and_generate(tiny_sdxl_dir, tmp_path, lora):
    from diffusers import StableDiffusionXLPipeline
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=6)
    out = tmp_path / "out"
    train_dpo.main(args_for(tiny_sdxl_dir, pairs, out, tmp_path / "cache", "--max_steps", "2", "--lora_rank", str(lora),
                            "--val_every", "2", "--val_seeds", "1", "--val_steps", "2", "--val_prompts", "a red square"))
    log = records(out)
    assert log[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert os.path.exists(out / "val" / "step_0000002.png")
    if lora:
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        pipe.load_lora_weights(str(out))
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
        base = load_file(os.path.join(tiny_sdxl_dir, "unet", "diffusion_pytorch_model.safetensors"))
        tuned = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
        assert any(not torch.equal(base[k], tuned[k]) for k in base)
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("lora,ref_point", [(0, "batch"), (4, "mismatched")])
def test_kto_two_steps_load_and_generate(tiny_sdxl_dir, likes, tmp_path, lora, ref_point):
    from diffusers import StableDiffusionXLPipeline
    out = tmp_path / "out"
    train_kto.main(args_for(tiny_sdxl_dir, likes, out, tmp_path / "cache", "--max_steps", "2", "--lora_rank", str(lora),
                            "--ref_point", ref_point))
    log = records(out)
    assert log[0]["loss"] == pytest.approx(0.5, abs=1e-6) and log[0]["ref_point"] == 0.0
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir if lora else str(out))
    if lora:
        pipe.load_lora_weights(str(out))
    assert pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np").images.shape == (1, 32, 32, 3)


def test_killed_and_resumed_equals_uninterrupted(tiny_sdxl_dir, tmp_path, monkeypatch):
    """Ctrl-C as a finished checkpoint is renamed into place (os.replace, the call every whole-or-absent write ends
    with), then --resume: bitwise the run that never stopped, Adafactor's state included. (A real SIGKILL during a
    save: tests/test_train_dpo.py and tests/test_train_kto.py, in a child process.)"""
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=6)
    cache = tmp_path / "cache"
    train_dpo.main(args_for(tiny_sdxl_dir, pairs, tmp_path / "ref", cache, "--max_steps", "3", "--optimizer", "adafactor"))
    real_replace = os.replace

    def interrupted_replace(src, dst, *a, **k):
        if "step_0000002.tmp" in str(src):
            raise KeyboardInterrupt("Ctrl-C while saving")
        return real_replace(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", interrupted_replace)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train_dpo.main(args_for(tiny_sdxl_dir, pairs, out, cache, "--max_steps", "3", "--optimizer", "adafactor"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_0000001"]  # the unnamed one cleared on the way out
    train_dpo.main(args_for(tiny_sdxl_dir, pairs, out, cache, "--max_steps", "3", "--optimizer", "adafactor", "--resume"))
    a = load_file(str(tmp_path / "ref" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise on the CPU, Adafactor's state included


def test_an_unsupported_family_is_one_line(tiny_pipe_dir, tmp_path):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(tiny_pipe_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=2)
    with pytest.raises(SystemExit, match="is a KandinskyPipeline: supported are StableDiffusionPipeline"):
        train_dpo.main(args_for(str(other), pairs, tmp_path / "o", tmp_path / "c", "--max_steps", "1"))


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tiny_sdxl_dir, tmp_path):
    from test_train_dpo import assert_same_run
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=8)
    cache = tmp_path / "cache"
    common_args = ("--max_steps", "3", "--micro_batch", "1", "--lr", "1e-4")
    train_dpo.main(args_for(tiny_sdxl_dir, pairs, tmp_path / "one", cache, *common_args))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    proc = subprocess.run(torchrun("train_dpo.py", *args_for(tiny_sdxl_dir, pairs, tmp_path / "two", cache, *common_args)),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    unet = lambda d: load_file(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors"))
    assert_same_run(tmp_path / "one", tmp_path / "two", unet(str(tmp_path / "one")), unet(str(tmp_path / "two")),
                    unet(tiny_sdxl_dir), lr=1e-4, steps=3)


def test_evaluate_generates_with_the_sdxl_pipeline_in_bf16(tiny_sdxl_dir, tmp_path):
    import evaluate
    (tmp_path / "p.txt").write_text("a red square\na blue square\n")
    result = evaluate.main(["--pretrained", tiny_sdxl_dir, "--model", f"same={tiny_sdxl_dir}", "--prompts",
                            str(tmp_path / "p.txt"), "--n", "2", "--steps", "2", "--resolution", "32",
                            "--precision", "bf16", "--scorers", "toy.scorers:redness", "--out", str(tmp_path / "out")])
    assert result["scores"]["same"] == result["scores"]["base"]  # same weights, same seeds: the same images
    assert Image.open(tmp_path / "out" / "images" / "base" / "00000_s0.png").size == (32, 32)
    with pytest.raises(SystemExit, match="precision"):  # images made in bf16 are not reused for an fp32 run
        evaluate.main(["--pretrained", tiny_sdxl_dir, "--prompts", str(tmp_path / "p.txt"), "--n", "2", "--steps", "2",
                       "--resolution", "32", "--precision", "fp32", "--scorers", "toy.scorers:redness",
                       "--out", str(tmp_path / "out")])


def test_latent_cache_choices_vae_flag_and_a_full_disk(tiny_sdxl_dir, tmp_path, monkeypatch, capsys):
    """--latent_cache mean stores no std (every draw is the mean), none encodes on the fly and trains like the cache
    (up to its fp16 rounding), --vae takes a replacement VAE, and a cache the disk cannot hold stops before encoding."""
    import shutil
    from safetensors import safe_open
    pairs = write_pickapic(str(tmp_path / "pairs.parquet"), n=6)
    runs = {}
    for mode in ("posterior", "mean", "none"):
        out = tmp_path / mode
        train_dpo.main(args_for(tiny_sdxl_dir, pairs, out, tmp_path / "cache", "--max_steps", "1", "--latent_cache", mode,
                                "--vae", os.path.join(tiny_sdxl_dir, "vae")))
        runs[mode] = records(out)[0]
    printed = capsys.readouterr().out
    import re
    # 4 x 16 x 16 latents in fp16, mean and std, and the mirror image's: 8 KB; 2 captions and the empty one
    assert re.search(r"cache: 12 images x 8.0 KB \+ 3 captions x [0-9.]+ KB = [0-9.]+ KB \(posterior, with mirror images\)", printed)
    assert "; cache none (encoded on the fly)" in printed
    folders = {json.load(open(os.path.join(tmp_path / "cache", d, "meta.json")))["mode"]: d for d in os.listdir(tmp_path / "cache")}
    assert set(folders) == {"posterior", "mean"}
    with safe_open(os.path.join(tmp_path / "cache", folders["mean"], "images-000000.safetensors"), "pt") as f:
        assert "std" not in f.keys() and "mean" in f.keys() and "time_ids_flip" in f.keys()
    assert runs["none"]["policy_err_w"] == pytest.approx(runs["posterior"]["policy_err_w"], rel=1e-2)
    assert runs["mean"]["policy_err_w"] != runs["posterior"]["policy_err_w"]
    with pytest.raises(SystemExit, match="VAE not found"):
        train_dpo.main(args_for(tiny_sdxl_dir, pairs, tmp_path / "o", tmp_path / "cache", "--vae", str(tmp_path / "novae")))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(SystemExit, match="the cache needs .* more in .* but only 1000.0 B are free"):
        train_dpo.main(args_for(tiny_sdxl_dir, pairs, tmp_path / "o", tmp_path / "cache2", "--max_steps", "1"))
    assert os.listdir(tmp_path / "cache2") == []  # nothing encoded (the folder is made to ask its disk what is free)
