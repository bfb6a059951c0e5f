"""bench.py end to end on the tiny size, a few steps: it runs the real trainer and the floor, and its
last line carries every figure as key=value pairs. No timing is asserted: the machine is shared. The flow sizes
take the same path: tiny pipelines of each flow family here, the real widths at one block in the slow suite.

    python -m pytest -q tests/test_bench.py
    python -m pytest -q tests/test_bench.py -m slow    # the real SD3.5 / FLUX widths, one block (a few minutes)
"""
import os
import re

import pytest
import torch

import bench  # tools/bench.py (conftest puts tools/ on the path)


def parse_last_line(out):
    last = out.strip().splitlines()[-1]
    return dict(kv.split("=", 1) for kv in last.split())


def test_tiny_dpo_last_line_parses(tiny_pipe_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:  # one thread: on a busy machine two can be many times slower for a model this small
        figures = bench.main(["--size", "tiny", "--steps", "2", "--warmup", "1", "--micro_batch", "2", "--threads", "1",
                              "--pretrained", tiny_pipe_dir, "--work_dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    line = parse_last_line(capsys.readouterr().out)
    assert line["size"] == "tiny" and line["algo"] == "dpo" and line["pairs_per_step"] == "2"
    f = {k: float(v) for k, v in line.items() if re.fullmatch(r"[-+.\deE]+", v)}  # the figures, not the names
    for key in ["pairs/s", "s/step", "floor_pairs/s", "floor_s/step", "efficiency", "cpu_s/step", "floor_cpu_s/step",
                "cpu_efficiency"]:
        assert f[key] > 0, key
    # what the benchmark is for: the floor (the objective's compute alone) is a share of the real step, so the
    # efficiency is floor / step, below 1 but for timing noise (generous: a shared machine), and the rates agree
    assert f["efficiency"] == pytest.approx(f["floor_s/step"] / f["s/step"], rel=0.01)
    assert f["cpu_efficiency"] == pytest.approx(f["floor_cpu_s/step"] / f["cpu_s/step"], rel=0.01)
    assert 0.02 < f["cpu_efficiency"] < 1.5 and 0.02 < f["efficiency"] < 1.5
    assert f["pairs/s"] == pytest.approx(f["pairs_per_step"] / f["s/step"], rel=0.01)
    assert float(line.get("peak_rss_gb", line.get("peak_cuda_gb"))) > 0
    assert line == {k: str(v) for k, v in figures.items()}  # main returns what it printed
    assert os.path.exists(tmp_path / "run-dpo-0" / "log.jsonl")  # the real trainer ran and logged


def test_blocks_cut_only_the_depth():
    """--blocks N keeps every value of the real configuration but the number of blocks of each kind; SD3.5 Medium's
    dual-attention blocks stay its first ones."""
    for size in bench.FLOW_SIZES:
        _, _, real = bench.FLOW_SIZES[size]
        _, _, cut = bench.flow_config(size, 2)
        changed = {k for k in real if cut[k] != real[k]}
        depth = {"num_layers", "num_single_layers", *(["dual_attention_layers"] if size == "sd35m" else [])}
        assert changed == depth & set(real), size
        assert all(cut[k] == 2 for k in ("num_layers", "num_single_layers") if k in real)
    assert bench.flow_config("sd35m", 2)[2]["dual_attention_layers"] == (0, 1)
    assert bench.flow_config("flux1", 0) == bench.FLOW_SIZES["flux1"]  # 0: the real depth


@pytest.mark.parametrize("size,family,lora_rank,algo", [("sd35m", "sd3", "0", "dpo"), ("flux1", "flux", "16", "dpo"),
                                                        ("klein4b", "flux2", "16", "kto")])
def test_each_flow_family_runs_the_trainer_and_the_floor(size, family, lora_rank, algo, tmp_path, capsys):
    """A tiny pipeline of each flow family (toy/models.py) timed as its --size: the real trainer and the floor through
    the family's conditioning, latents and denoiser call (FLUX's packing and guidance, FLUX.2's patchified latents),
    LoRA (the flow sizes' default) and a full fine-tune, DPO and KTO with the mismatched reference point."""
    from toy import models
    pipe = str(tmp_path / "pipe")
    {"sd3": models.build_sd3_pipeline, "flux": models.build_flux_pipeline,
     "flux2": models.build_flux2_klein_pipeline}[family](pipe, seed=0)
    threads = torch.get_num_threads()
    try:
        figures = bench.main(["--size", size, "--resolution", "32", "--steps", "1", "--warmup", "1", "--threads", "1",
                              "--lora_rank", lora_rank, "--algo", algo, "--ref_point", "mismatched", "--pretrained", pipe,
                              "--work_dir", str(tmp_path / "work")])
    finally:
        torch.set_num_threads(threads)
    line = parse_last_line(capsys.readouterr().out)
    assert line == {k: str(v) for k, v in figures.items()}
    assert line["size"] == size and line["blocks"] == ("2" if family == "sd3" else "1+1") and line["lora_rank"] == lora_rank
    assert float(line["floor_s/step"]) > 0 and float(line["s/step"]) > 0 and float(line["cpu_efficiency"]) > 0
    assert line["algo"] == ("dpo" if algo == "dpo" else "kto-mismatched")
    assert os.path.exists(tmp_path / "work" / f"run-{algo}-0" / "log.jsonl")


def test_blocks_is_for_a_built_flow_size():
    for argv in (["--size", "sd15", "--blocks", "2"], ["--size", "flux1", "--blocks", "2", "--pretrained", "x"]):
        with pytest.raises(SystemExit, match="--blocks"):
            bench.main(argv)


@pytest.mark.slow
def test_the_real_widths_at_one_block(tmp_path):
    """Each flow size built at one block of each kind: its lean text encoders and VAE give the conditioning and latents
    the real transformer takes (T5's 4096, the CLIP widths and pooled dims, Qwen3's 3 x 2560, 16 / 32 -> 128 latent
    channels), and its velocity has the latents' shape; then SD3.5 Medium's runs the trainer and the floor."""
    import common
    import model
    ctx = common.setup(0, "fp32")
    for size in bench.FLOW_SIZES:
        pipe = str(tmp_path / size)
        bench.build_model(size, pipe, seed=0, blocks=1)
        m = model.load_models(pipe, ctx)
        config = m.unet.config
        assert model.family_of(pipe) == bench.FLOW_SIZES[size][0] and config.num_layers == 1
        with torch.no_grad():
            emb, pooled = model.encode_prompts(m, ["a red circle"], "cpu")
            assert emb.shape == (1, {"sd35m": 333, "sd35l": 333}.get(size, 512), config.joint_attention_dim)
            assert (pooled is None) == (size == "klein4b")
            assert pooled is None or pooled.shape == (1, config.pooled_projection_dim)
            shape = model.latent_shape(m.vae, 64)
            assert shape[0] == config.in_channels // (4 if size == "flux1" else 1)  # FLUX.1 packs 2x2 patches into tokens
            x = torch.randn(1, *shape)
            cond = {"encoder_hidden_states": emb, **({} if pooled is None else {"text_embeds": pooled})}
            assert model.denoise(m.unet, x, torch.tensor([500.0]), cond).shape == x.shape
        del m
    threads = torch.get_num_threads()
    try:
        figures = bench.main(["--size", "sd35m", "--blocks", "1", "--resolution", "64", "--steps", "1", "--warmup", "1",
                              "--threads", "1", "--work_dir", str(tmp_path / "work")])
    finally:
        torch.set_num_threads(threads)
    assert figures["blocks"] == "1" and float(figures["cpu_efficiency"]) > 0
