"""evaluate.py: generation, the scorers' recipes, the win-rate math and an end-to-end CLI run.

    python -m pytest -q tests/test_evaluate.py

Scorer models are tiny CLIPs built from config and saved to folders, loaded through the same
`from_pretrained(dir)` path as the real PickScore / CLIP ViT-L/14 checkpoints; nothing is downloaded.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import evaluate
import sample
import model
from scorers import aesthetic_mlp, clip_text_embeddings, load_clip, load_scorers


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight CLIPModel (32 px images, 8-d projection) with its processor, saved to a folder."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor
    from toy.models import write_tokenizer
    path = str(tmp_path_factory.mktemp("tiny_clip"))
    tok = write_tokenizer(path)
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=8)
    model = CLIPModel(config)
    model.logit_scale.data.fill_(np.log(100.0))  # PickScore's trained value, so scores have its scale
    model.save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def aesthetic_weights(tmp_path_factory):
    """Random aesthetic-MLP weights for the tiny CLIP's 8-d embedding, saved with the original's key names."""
    path = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(1)
    state = {"layers." + k: v for k, v in aesthetic_mlp(8).state_dict().items()}
    torch.save(state, path / "aesthetic.pth")
    from safetensors.torch import save_file
    save_file(state, str(path / "aesthetic.safetensors"))
    return state, str(path / "aesthetic.pth"), str(path / "aesthetic.safetensors")


def scorer_args(clip_dir, weights_file):
    return argparse.Namespace(pickscore_model=clip_dir, pickscore_processor=clip_dir, clip_model=clip_dir,
                              aesthetic_clip=clip_dir, aesthetic_weights=weights_file,
                              hpsv2_weights="missing.pt", hpsv2_tokenizer=clip_dir,
                              imagereward_weights="missing.pt", imagereward_tokenizer=clip_dir)


def shape_image(color, background=(250, 250, 250)):
    image = Image.new("RGB", (32, 32), background)
    ImageDraw.Draw(image).ellipse((8, 8, 22, 22), fill=color)
    return image


# ------------------------------------------------------------------------------------------------
# generation


def test_generate_does_not_depend_on_batch_size(tiny_pipe_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    a = sample.generate(pipe, prompts, seeds, steps=1, batch_size=4, progress=False)
    b = sample.generate(pipe, prompts, seeds, steps=1, batch_size=3, progress=False)
    assert len(a) == 2 and len(a[0]) == 2 and a[0][0].size == (32, 32)
    for row_a, row_b in zip(a, b):
        for x, y in zip(row_a, row_b):
            np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float), atol=1)  # 8-bit rounding
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(a[0][1]))  # different seeds, different images
    sample.save_grid(a, str(tmp_path / "grid.png"))
    assert Image.open(tmp_path / "grid.png").size == (64, 64)


# ------------------------------------------------------------------------------------------------
# scorers: each recipe against a hand computation from the model's own forward


def test_scorers_match_hand_computation(tiny_clip_dir, aesthetic_weights):
    from transformers import CLIPModel
    state, pth, safetensors_file = aesthetic_weights
    images = [shape_image((220, 40, 40)), shape_image((40, 70, 220)), Image.new("RGB", (40, 40), (220, 40, 40))]
    prompts = ["a red circle", "a blue circle", "a big dog"]
    scorers = load_scorers(["pickscore", "clip", "aesthetic", "toy.scorers:redness", "toy.scorers:color_acc"],
                                    scorer_args(tiny_clip_dir, pth), "cpu")
    got = {name: score(images, prompts) for name, score in scorers.items()}

    model, processor = load_clip(tiny_clip_dir)
    ref = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ref(**inputs)
    logits = out.logits_per_image.diagonal()  # logit_scale.exp() * cos for each (image, its prompt)
    cos = logits / ref.logit_scale.exp().detach()
    np.testing.assert_allclose(got["pickscore"], logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["pickscore"], 100 * cos.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["clip"], 100 * cos.clamp(min=0).numpy(), rtol=1e-4, atol=1e-4)
    # aesthetic: normalised image embedding through the five linear layers, no activations
    x = F.normalize(out.image_embeds, dim=-1)
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    np.testing.assert_allclose(got["aesthetic"], x.squeeze(-1).numpy(), rtol=1e-4, atol=1e-5)
    # the same weights from safetensors give the same scores
    from_safetensors = load_scorers(["aesthetic"], scorer_args(tiny_clip_dir, safetensors_file), "cpu")
    np.testing.assert_allclose(from_safetensors["aesthetic"](images, prompts), got["aesthetic"], rtol=1e-6)
    # redness of a red shape on near-white, and of a solid (220, 40, 40): (220 - (220+40+40)/3) / 255
    np.testing.assert_allclose(got["redness"][2], (220 - 100) / 255, rtol=1e-5)
    assert got["redness"][0] > 0 > got["redness"][1]
    # color accuracy: right color 1, wrong color 0, a caption without a color is undefined
    assert got["color_acc"][0] == 1.0 and got["color_acc"][1] == 1.0 and np.isnan(got["color_acc"][2])
    assert scorers["color_acc"]([images[0]], ["a blue circle"])[0] == 0.0
    # the embeddings filter_fifa.py uses are unit vectors
    emb = clip_text_embeddings(model, processor, prompts)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_hpsv2_and_imagereward_need_their_weights_not_packages(tiny_clip_dir, monkeypatch):
    # they no longer import open_clip or ImageReward: without those packages, missing weights are what stops them,
    # with one line each (their key maps and scores are tested in test_reward_models.py)
    monkeypatch.setitem(sys.modules, "open_clip", None)  # None in sys.modules makes `import` fail
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    for scorer in ["hpsv2", "imagereward"]:
        with pytest.raises(SystemExit, match="weights file not found: missing.pt"):
            load_scorers([scorer, "toy.scorers:redness"], scorer_args(tiny_clip_dir, ""), "cpu")


# ------------------------------------------------------------------------------------------------
# the protocol's math, on worked examples


def test_wilson_interval_worked_examples():
    # 7 successes in 10: the textbook Wilson 95% interval is (0.3968, 0.8922)
    low, high = evaluate.wilson_interval(7, 10)
    assert low == pytest.approx(0.3968, abs=1e-4) and high == pytest.approx(0.8922, abs=1e-4)
    # 3 in 5: (0.2307, 0.8824); 0 in 10 still has a positive upper end, (0, 0.2775)
    assert evaluate.wilson_interval(3, 5) == pytest.approx((0.2307, 0.8824), abs=1e-4)
    assert evaluate.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert all(np.isnan(evaluate.wilson_interval(0, 0)))


def test_win_rate_counts_ties_half_and_skips_undefined_prompts():
    a = np.array([3.0, 2.0, 5.0, 1.0, 4.0, np.nan])
    b = np.array([1.0, 2.0, 6.0, 0.0, 4.0, 9.0])
    w = evaluate.win_rate(a, b)  # win, tie, loss, win, tie; the nan prompt is left out
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 2, 1, 5)
    assert w["rate"] == pytest.approx(0.6)  # (2 + 2/2) / 5
    assert (w["low"], w["high"]) == pytest.approx((0.2307, 0.8824), abs=1e-4)  # Wilson for 3 of 5
    same = evaluate.win_rate(a[:5], a[:5])
    assert same["rate"] == 0.5 and same["ties"] == 5


def test_median_image_is_the_lower_median():
    scores = np.array([[3.0, 1.0, 2.0, 5.0, 4.0], [4.0, 1.0, 3.0, 2.0, 0.0]])
    assert evaluate.median_index(scores).tolist() == [0, 3]  # values 3 (of 1..5) and 2 (of 0..4)
    assert evaluate.median_index(np.array([[4.0, 1.0, 3.0, 2.0]])).tolist() == [3]  # even N: 2, not 3


# ------------------------------------------------------------------------------------------------
# inputs


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n a blue square \n")
    (tmp_path / "p.jsonl").write_text('{"caption": "a red circle"}\n{"caption": "a dog"}\n')
    (tmp_path / "p.csv").write_text("id,prompt\n1,a red circle\n2,\"a cat, small\"\n")
    (tmp_path / "p.tsv").write_text("Prompt\tCategory\na red circle\tx\n")  # PartiPrompts' layout
    (tmp_path / "p.json").write_text('["a red circle", "a tree"]')
    (tmp_path / "bad.csv").write_text("id,words\n1,a red circle\n")
    read = lambda name: sample.load_prompts(str(tmp_path / name))
    assert read("p.txt") == ["a red circle", "a blue square"]
    assert read("p.jsonl") == ["a red circle", "a dog"]
    assert read("p.csv") == ["a red circle", "a cat, small"]
    assert read("p.tsv") == ["a red circle"]
    assert read("p.json") == ["a red circle", "a tree"]
    with pytest.raises(SystemExit, match="no column named"):
        read("bad.csv")
    with pytest.raises(SystemExit, match="not reachable"):  # the tests run with HF_HUB_OFFLINE=1
        sample.load_prompts("partiprompts")


def test_bad_input_is_one_line(tmp_path, tiny_pipe_dir):
    (tmp_path / "p.txt").write_text("a red circle\n")
    base = ["--pretrained", tiny_pipe_dir, "--out", str(tmp_path / "out"), "--scorers", "toy.scorers:redness"]
    cases = [(["--prompts", str(tmp_path / "missing.txt")], "no such file"),
             (["--prompts", str(tmp_path / "p.txt"), "--model", f"A={tmp_path / 'nope'}"], "no such folder"),
             (["--prompts", str(tmp_path / "p.txt"), "--model", "A"], "NAME=DIR"),
             (["--prompts", str(tmp_path / "p.txt"), "--model", f"base={tiny_pipe_dir}"], "NAME=DIR"),
             (["--prompts", str(tmp_path / "p.txt"), "--scorers", "pickscroe"], "unknown scorer"),
             (["--prompts", str(tmp_path / "p.txt"), "--model", f"A={tmp_path}"], "not a pipeline folder")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            evaluate.main(base + argv)


def test_lora_and_unet_folders_load(tiny_pipe_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    # a LoRA folder as the trainers write it: random A and B so that the adapter changes the output
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "lora"), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    shutil.copytree(os.path.join(tiny_pipe_dir, "unet"), tmp_path / "unet")  # a bare UNet folder
    scheduler = sample.load_scheduler(tiny_pipe_dir)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 16)
    outputs = {}
    for name, source in [("base", None), ("lora", str(tmp_path / "lora")), ("unet", str(tmp_path / "unet"))]:
        p = sample.load_pipeline(tiny_pipe_dir, source, scheduler, "cpu", torch.float32)
        assert p.scheduler is scheduler
        with torch.no_grad():
            outputs[name] = p.unet(x, t, c).sample
    torch.testing.assert_close(outputs["unet"], outputs["base"])
    assert not torch.allclose(outputs["lora"], outputs["base"])


@pytest.mark.parametrize("rank", [0, 2])
def test_trainer_checkpoints_load(tiny_pipe_dir, tmp_path, rank):
    """A run part-way: out_dir/checkpoints/step_N (full UNet or LoRA adapters) evaluates as that step's model."""
    import checkpoints
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(os.path.join(tiny_pipe_dir, "unet"))
    if rank:
        model.add_lora(unet, rank)
    params = [p for n, p in unet.named_parameters() if not rank or "lora" in n]
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))  # a trained model: moved away from the base (and B from 0)
    checkpoints.save_checkpoint(str(tmp_path), 3, model.trainable_state(unet, rank > 0), torch.optim.AdamW(params),
                                {"lora_rank": rank})
    folder = str(tmp_path / "checkpoints" / "step_0000003")
    assert sample.model_kind(folder) == "checkpoint"
    p = sample.load_pipeline(tiny_pipe_dir, folder, sample.load_scheduler(tiny_pipe_dir), "cpu", torch.float32)
    base = sample.load_pipeline(tiny_pipe_dir, None, sample.load_scheduler(tiny_pipe_dir), "cpu", torch.float32)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 16)
    with torch.no_grad():
        torch.testing.assert_close(p.unet(x, t, c).sample, unet(x, t, c).sample)
        assert not torch.allclose(base.unet(x, t, c).sample, unet(x, t, c).sample)


# ------------------------------------------------------------------------------------------------
# the command line, end to end


def test_cli_identical_models_tie_and_a_rerun_resumes(tiny_pipe_dir, tiny_clip_dir, aesthetic_weights, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    shutil.copytree(os.path.join(tiny_pipe_dir, "unet"), tmp_path / "unet")  # the base's own UNet, bare
    out = tmp_path / "out"
    argv = ["--pretrained", tiny_pipe_dir, "--model", f"same={tiny_pipe_dir}", "--model", f"unet={tmp_path / 'unet'}",
            "--prompts", str(tmp_path / "prompts.txt"), "--n", "2", "--steps", "2", "--out", str(out),
            "--scorers", "pickscore,clip,aesthetic,toy.scorers:redness,toy.scorers:color_acc",
            "--pickscore_model", tiny_clip_dir, "--pickscore_processor", tiny_clip_dir,
            "--clip_model", tiny_clip_dir, "--aesthetic_clip", tiny_clip_dir, "--aesthetic_weights", aesthetic_weights[1]]
    result = evaluate.main(argv)
    # identical weights: identical images, identical scores, every prompt a tie
    for scorer in ["pickscore", "clip", "aesthetic", "redness", "color_acc"]:
        for name in ["same", "unet"]:
            w = result["win_rate"][scorer][f"{name}_vs_base"]
            assert (w["rate"], w["ties"], w["n"]) == (0.5, 2, 2), (scorer, name, w)
    assert result["scores"]["same"] == result["scores"]["base"]
    saved = json.loads((out / "scores.json").read_text())
    assert saved["seeds"] == [0, 1] and len(saved["scores"]["base"]["pickscore"]) == 2
    report = (out / "results.md").read_text()
    assert "| same | 50.0% (" in report and "| same vs unet |" in report
    # labelled grid: a header row with the model names, each prompt beside its row, 32 px cells scaled 4x
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    left, top, cell = 220, 26, 128
    assert grid.shape == (top + 2 * cell, left + 3 * cell, 3)  # 3 models x 2 prompts
    assert (grid[:top, left:left + 40] < 128).any() and (grid[top:top + 20, :100] < 128).any()  # text drawn
    median = result["median_seed"]["unet"]["pickscore"][1]  # prompt 1, model 2 (unet): its median image, upscaled
    cell_img = grid[top + cell:top + 2 * cell, left + 2 * cell:left + 3 * cell]
    small = np.asarray(Image.open(out / "images" / "unet" / f"00001_s{median}.png").convert("RGB"))
    assert np.array_equal(cell_img, small.repeat(4, 0).repeat(4, 1))
    images = sorted(os.listdir(out / "images" / "base"))
    assert images == ["00000_s0.png", "00000_s1.png", "00001_s0.png", "00001_s1.png"]

    # a rerun regenerates only what is missing, and a regenerated image is the same image, bit for bit (it is
    # made again in the batch it was first made in: alone, its pixels differed by rounding on some CPUs)
    kept = out / "images" / "base" / "00000_s0.png"
    before = kept.stat().st_mtime_ns
    lost = np.asarray(Image.open(out / "images" / "unet" / "00001_s1.png"))
    os.remove(out / "images" / "unet" / "00001_s1.png")
    again = evaluate.main(argv)
    assert kept.stat().st_mtime_ns == before
    assert np.array_equal(np.asarray(Image.open(out / "images" / "unet" / "00001_s1.png")), lost)
    assert again["scores"] == result["scores"]
    with pytest.raises(SystemExit, match="steps"):  # other settings would mix incomparable images
        evaluate.main([a if a != "2" else "3" for a in argv])
    with pytest.raises(SystemExit, match="batch_size"):  # so would another batch (rounding may depend on it)
        evaluate.main(argv + ["--batch_size", "1"])
