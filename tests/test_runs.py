"""The experiment helpers in runs/: the toy world's table and the noisy pairs of the FiFA experiment (no models)."""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from runs import toy_fifa_pairs, toy_table
from toy import make_base
from toy.palette import redness


def write_scores(folder, prompts, scores):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "scores.json"), "w") as f:
        json.dump({"prompts": prompts, "scores": scores}, f)
    return str(folder)


def test_table_rows_match_hand_computation(tmp_path):
    base_red = [[0.0, 0.1, 0.2, 0.3], [0.0, 0.0, 0.1, 0.1]]  # per prompt, per seed
    acc = [[1, 1, 0, 1], [1, None, 1, 1]]  # None: no color word (nan), left out of the mean
    redder = [[0.1, 0.3, 0.4, 0.5], [0.2, 0.2, 0.2, 0.2]]
    folder = write_scores(tmp_path / "eval", ["a red circle", "a blue star"],
                          {"base": {"redness": base_red, "color_acc": acc},
                           "red": {"redness": redder, "color_acc": [[0, 0, 0, 0], [1, 1, 1, 1]]}})
    noise = write_scores(tmp_path / "noise", ["a red circle", "a blue star"],
                         {"base": {"redness": base_red, "color_acc": acc}})
    rows = {r["model"]: r for r in toy_table.main([folder, noise])}
    assert rows["base"]["like_rate"] == 0.5  # above the base's own median: half of an even number of seeds
    assert rows["base"]["color_acc"] == pytest.approx(6 / 7)
    assert rows["base, other seeds"]["redness"] == rows["base"]["redness"]
    red = rows["red"]
    assert red["redness"] == pytest.approx(np.mean(redder))
    # medians of the base: 0.15 and 0.05; above them: 3/4 of prompt 1 (not 0.1), 4/4 of prompt 2
    assert red["like_rate"] == pytest.approx(7 / 8) and red["color_acc"] == 0.5
    assert red["win_redness"].startswith("100%")  # both prompts' median images are redder
    assert "| red |" in (tmp_path / "eval" / "toy_table.md").read_text()


def test_runs_of_one_method_make_one_row_with_their_spread(tmp_path):
    base_red = [[0.0, 0.1], [0.0, 0.2]]
    acc = [[1, 1], [1, 1]]
    folder = write_scores(tmp_path / "eval", ["a red circle", "a blue star"],
                          {"base": {"redness": base_red, "color_acc": acc},
                           "kto_s0": {"redness": [[0.2, 0.2], [0.2, 0.2]], "color_acc": [[1, 0], [1, 1]]},
                           "kto_s1": {"redness": [[0.0, 0.0], [0.0, 0.0]], "color_acc": [[1, 1], [1, 1]]},
                           "dpo_s0": {"redness": base_red, "color_acc": acc}})
    rows = {r["model"]: r for r in toy_table.main([folder])}
    assert set(rows) == {"base", "kto", "dpo"}
    kto = rows["kto"]
    assert kto["runs"] == 2 and kto["redness"] == pytest.approx(0.1)
    assert (kto["redness_min"], kto["redness_max"]) == (0.0, 0.2)
    assert kto["color_acc"] == pytest.approx((0.75 + 1.0) / 2) and kto["color_acc_min"] == 0.75
    # the base's median images (the lower of two) score 0.0 on both prompts: s0 wins both, s1 ties both (half)
    assert kto["win_redness_rate"] == pytest.approx(0.75)
    assert (kto["win_redness_rate_min"], kto["win_redness_rate_max"]) == (0.5, 1.0)
    table = (tmp_path / "eval" / "toy_table.md").read_text()
    assert "| kto (2 runs) | 0.1000 (0.0000 to 0.2000) |" in table and "| dpo | -0.0" not in table
    assert "| dpo | 0.0750 | 50% | 100% | 50% (9-91) |" in table  # one run: as it is, with its interval
    assert "| kto_s1 | 0.0000 |" in (tmp_path / "eval" / "toy_runs.md").read_text()


def test_noisy_pairs_follow_the_users_reward(tmp_path):
    feedback = tmp_path / "feedback"
    (feedback / "kto" / "disliked").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        image, caption = make_base.random_scene(rng)
        image.save(feedback / "kto" / "disliked" / f"{i:05d}.png")
        (feedback / "kto" / "disliked" / f"{i:05d}.txt").write_text(caption)
    out = tmp_path / "pairs.parquet"
    # a near-noiseless user: the redder image always wins
    toy_fifa_pairs.main(["--feedback", str(feedback), "--out", str(out), "--temperature", "1e-6", "--random_k", "5"])
    t = pq.read_table(out).to_pydict()
    assert len(t["caption"]) == 12  # two pairs per base image
    import io
    from PIL import Image
    for i in range(12):
        r = [redness(Image.open(io.BytesIO(t[f"jpg_{j}"][i]))) for j in (0, 1)]
        w = 0 if t["label_0"][i] == 1.0 else 1
        assert r[w] >= r[1 - w] - 2e-3, i  # JPEG moves redness a little
    subset = pq.read_table(tmp_path / "pairs_random_5.parquet")
    assert subset.num_rows == 5 and set(subset.column("ranking_id").to_pylist()) <= set(t["ranking_id"])
    with pytest.raises(SystemExit, match="random_k 13 > 12"):
        toy_fifa_pairs.main(["--feedback", str(feedback), "--out", str(out), "--random_k", "13"])
    with pytest.raises(SystemExit, match="no base samples"):
        toy_fifa_pairs.main(["--feedback", str(tmp_path / "nothing"), "--out", str(out)])
