"""bench.py end to end on the tiny size, a few steps: it runs the real trainer and the floor, and its
last line carries every figure as key=value pairs. No timing is asserted: the machine is shared.

    python -m pytest -q tests/test_bench.py
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
