"""files.py (atomic writes, the JSONL reader) and common.py (gradient clipping).

    python -m pytest -q tests/test_common.py
"""
import pytest

from files import atomic_path, read_jsonl, write_json


def test_atomic_writes_never_remove_what_they_should_not(tmp_path):
    write_json({"a": 1}, str(tmp_path / "x.json"))
    assert read_jsonl(str(tmp_path / "x.json")) == [{"a": 1}]
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("mine")
    with pytest.raises(OSError):  # a file is never written over a folder of the same name
        write_json({"a": 2}, str(tmp_path / "folder"))
    assert (tmp_path / "folder" / "keep.txt").read_text() == "mine"
    with atomic_path(str(tmp_path / "folder")) as tmp:  # a folder may replace a folder (checkpoints do)
        (tmp_path / tmp.split("/")[-1]).mkdir()
        (tmp_path / tmp.split("/")[-1] / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["new.txt"]
    with pytest.raises(ValueError):  # an error inside leaves the old file and no temporary one
        with atomic_path(str(tmp_path / "x.json")) as tmp:
            open(tmp, "w").write("half")
            raise ValueError
    assert read_jsonl(str(tmp_path / "x.json")) == [{"a": 1}] and sorted(p.name for p in tmp_path.iterdir()) == ["folder", "x.json"]


def test_read_jsonl_skips_a_torn_line_and_raises_on_a_folder(tmp_path):
    (tmp_path / "j.jsonl").write_text('{"a": 1}\n\n{"b": 2}\n{"c": ')
    assert read_jsonl(str(tmp_path / "j.jsonl")) == [{"a": 1}, {"b": 2}]
    assert read_jsonl(str(tmp_path / "missing.jsonl")) == []
    with pytest.raises(OSError):
        read_jsonl(str(tmp_path))


def test_grad_clip_zero_disables_clipping_and_still_reports_the_norm():
    import torch
    from common import clip_gradients
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_gradients([p], 0).item() == 5.0 and p.grad.tolist() == [3.0, 4.0]  # 0: no clipping (not "clip to 0")
    assert clip_gradients([p], 1.0).item() == 5.0 and p.grad.norm().item() == pytest.approx(1.0)
