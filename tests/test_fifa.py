"""filter_fifa.py with a tiny CLIP and a tiny causal LM built from config, on Pick-a-Pic-shaped parquet.

    python -m pytest -q tests/test_fifa.py

Everything runs in-process through main([...]) (importing transformers costs ~10 s per process) and
loads its models through the same from_pretrained(folder) path a real run takes with PickScore and Qwen.
"""
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import filter_fifa
from filter_fifa import (combined_margin, expected_rating, human_margin, knn_log_distance, main, preference_margin,
                         select, zscore)

WORDS = "a an the red green blue yellow big small circle square triangle star dog cat tree sky photo of".split()
FIFA_COLUMNS = ["fifa_reward_0", "fifa_reward_1", "fifa_margin", "fifa_quality", "fifa_diversity",
                "fifa_score", "fifa_rank", "fifa_relabelled"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIP (hidden 16, 8-d projection, 32 px) saved with its image processor and BPE tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    from toy.models import write_tokenizer
    path = str(tmp_path_factory.mktemp("clip"))
    tok = write_tokenizer(path, WORDS)
    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=8)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def make_lm(path, chat):
    """A random 1-layer Llama with a word-level tokenizer whose vocabulary holds the numbers 0-10."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = ["<unk>", "<pad>", "<eos>"] + [str(v) for v in range(11)] + WORDS + "rate prompt score".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    if chat:  # an instruct model's template, as Qwen2.5-Instruct has one
        tok.chat_template = ("{% for m in messages %}<eos> {{ m['content'] }}{% endfor %}"
                             "{% if add_generation_prompt %} score{% endif %}")
    tok.save_pretrained(path)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                 pad_token_id=1, bos_token_id=2, eos_token_id=2)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_lm(tmp_path_factory.mktemp("lm"), chat=True)


def jpeg(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_pickapic(path, captions, labels=None, corrupt=(), row_group_size=None):
    """Pick-a-Pic v2-schema parquet; labels default to alternating 1/0 and 0/1; `corrupt` rows get a bad jpg_1."""
    n = len(captions)
    labels = labels or [(1.0, 0.0) if i % 2 == 0 else (0.0, 1.0) for i in range(n)]
    jpg_1 = [jpeg(2 * i + 1)[:60] if i in corrupt else jpeg(2 * i + 1) for i in range(n)]  # truncated JPEG
    table = pa.table({
        "caption": captions, "jpg_0": pa.array([jpeg(2 * i) for i in range(n)], pa.binary()),
        "jpg_1": pa.array(jpg_1, pa.binary()),
        "label_0": pa.array([l[0] for l in labels], pa.float64()), "label_1": pa.array([l[1] for l in labels], pa.float64()),
        "image_0_uid": [f"u{i}a" for i in range(n)], "image_1_uid": [f"u{i}b" for i in range(n)],
        "best_image_uid": [f"u{i}a" if l[0] > l[1] else f"u{i}b" if l[1] > l[0] else "" for i, l in enumerate(labels)],
        "ranking_id": pa.array(range(n), pa.int64())})
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a big dog", "a small cat",
            "the sky", "a photo of a tree"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """16 pairs over 8 prompts; row 3 a tie, row 5 a corrupt JPEG; 14 eligible pairs."""
    labels = [(1.0, 0.0) if i % 2 == 0 else (0.0, 1.0) for i in range(16)]
    labels[3] = (0.5, 0.5)
    return make_pickapic(tmp_path_factory.mktemp("data") / "train.parquet", CAPTIONS * 2, labels, corrupt={5},
                         row_group_size=8)


def run(data, out, clip_dir, lm_dir, *extra):
    return main(["--data", data, "--out", str(out), "--reward_model", clip_dir, "--reward_processor", "",
                 "--quality", lm_dir, "--batch_size", "4", *map(str, extra)])


def test_margins_rank_when_alpha_gamma_zero_and_rerun_scores_nothing(data, clip_dir, lm_dir, tmp_path, capsys):
    stats = run(data, tmp_path / "a.parquet", clip_dir, lm_dir, "--k", 5, "--alpha", 0, "--gamma", 0, "--max_per_prompt", 0)
    assert (stats["pairs_in"], stats["ties"], stats["corrupt"], stats["kept"]) == (16, 1, 1, 5)
    assert stats["pairs_scored"] == 15 and stats["prompts_rated"] == 8  # 15 tried, 1 of them corrupt
    assert stats["prompts_embedded"] == 8
    out = pq.read_table(tmp_path / "a.parquet")
    assert out.column_names == pq.read_schema(data).names + FIFA_COLUMNS  # the input schema plus scores
    from public_data import load_pairs
    assert len(load_pairs(str(tmp_path / "a.parquet"))) == 5  # the DPO trainer's loader reads it as is
    # all 14 eligible margins, from the cache of a second run that keeps them all
    stats = run(data, tmp_path / "all.parquet", clip_dir, lm_dir, "--k", 14, "--alpha", 0, "--gamma", 0,
                "--max_per_prompt", 0)
    assert stats["pairs_scored"] == stats["prompts_rated"] == stats["prompts_embedded"] == 0  # all from the cache
    every = pq.read_table(tmp_path / "all.parquet").to_pydict()
    assert sorted(out.column("fifa_margin").to_pylist(), reverse=True) == sorted(every["fifa_margin"], reverse=True)[:5]
    assert 3 not in every["ranking_id"] and 5 not in every["ranking_id"]  # the tie and the corrupt pair
    assert all(0 <= q <= 10 for q in every["fifa_quality"])
    # the margin is the winner's PickScore-style score minus the loser's, as scorers.clip_scores computes it
    from scorers import clip_scores, load_clip
    model, proc = load_clip(clip_dir)
    rows = pq.read_table(data).to_pydict()
    i = every["ranking_id"][0]
    s = clip_scores(model, proc, [Image.open(io.BytesIO(rows[f"jpg_{j}"][i])) for j in (0, 1)], [rows["caption"][i]] * 2)
    w = 0 if rows["label_0"][i] == 1 else 1
    assert every["fifa_margin"][0] == pytest.approx(float(s[w] - s[1 - w]), abs=1e-4)
    # the cap, from the cache again: one pair per prompt
    stats = run(data, tmp_path / "cap.parquet", clip_dir, lm_dir, "--k", 6, "--max_per_prompt", 1)
    captions = pq.read_table(tmp_path / "cap.parquet").column("caption").to_pylist()
    assert len(captions) == len(set(captions)) == 6 and stats["capped"] == 6 and stats["pairs_scored"] == 0
    assert "ties dropped" in capsys.readouterr().out


def test_absolute_margin_relabels_by_the_proxy(data, clip_dir, tmp_path):
    run(data, tmp_path / "abs.parquet", clip_dir, "none", "--k", 14, "--margin", "absolute", "--max_per_prompt", 0)
    t = pq.read_table(tmp_path / "abs.parquet").to_pydict()
    for i in range(14):
        proxy_winner_is_0 = t["fifa_reward_0"][i] > t["fifa_reward_1"][i]
        assert (t["label_0"][i] == 1.0) == proxy_winner_is_0 and t["fifa_margin"][i] >= 0
        assert t["best_image_uid"][i] == t["image_0_uid" if proxy_winner_is_0 else "image_1_uid"][i]
    assert any(t["fifa_relabelled"]) and all(math.isnan(q) for q in t["fifa_quality"])


def test_duplicated_prompts_do_not_win_diversity(clip_dir, tmp_path):
    # CLIP lowercases and cleans whitespace: the three red-circle strings share one embedding;
    # "a blue square" repeats verbatim in 6 pairs but is ONE unique prompt, so it is not its own neighbour
    caps = ["a red circle", "A red circle", "a red  circle", "a green triangle", "a big dog", "the sky",
            "a photo of a tree"] + ["a blue square"] * 6
    path = make_pickapic(tmp_path / "dup.parquet", caps)
    # gamma 1000: diversity decides; one pair per prompt, 5 of the 6 distinct embeddings
    stats = run(path, tmp_path / "o.parquet", clip_dir, "none", "--knn", 1, "--gamma", 1000, "--max_per_prompt", 1, "--k", 5)
    kept = pq.read_table(tmp_path / "o.parquet").to_pydict()
    assert stats["kept"] == 5 and not {"a red circle", "A red circle", "a red  circle"} & set(kept["caption"])
    assert "a blue square" in kept["caption"]  # repeating a prompt is no penalty either
    assert min(kept["fifa_diversity"]) > math.log(0.01)  # no kept prompt sits at the floor


def test_knn_log_distance_matches_brute_force():
    emb = torch.nn.functional.normalize(torch.randn(300, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    emb[1] = emb[0]  # two different strings with the same embedding
    got = knn_log_distance(emb, k=3, floor=0.01, chunk=64)
    dist = torch.cdist(emb.double(), emb.double()).fill_diagonal_(float("inf"))
    want = dist.sort(dim=1).values[:, 2].clamp(min=0.01).log().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    got = knn_log_distance(emb, k=1, floor=0.01)
    assert got[0] == got[1] == pytest.approx(math.log(0.01))


def test_margin_and_quality_are_the_papers_equations():
    # R(c, x_0), R(c, x_1) of 4 pairs: the human prefers x_0, x_1, x_0 (the proxy x_1), and pair 3 is a tie
    rewards = np.array([[3.0, 1.0], [1.0, 4.0], [2.0, 5.0], [7.0, 7.0]], np.float32)
    human_w, eligible = np.array([0, 1, 0, -1]), np.array([True, True, True, False])
    margin, proxy_w, swap = preference_margin(rewards, human_w, eligible, "signed")
    assert margin.tolist() == [2.0, 3.0, -3.0, 0.0]  # m = R(c, x_w) - R(c, x_l): a disagreement sinks
    assert proxy_w.tolist() == [0, 1, 1, 0] and not swap.any()
    margin, _, swap = preference_margin(rewards, human_w, eligible, "absolute")
    assert margin.tolist() == [2.0, 3.0, 3.0, 0.0] and swap.tolist() == [False, False, True, False]  # relabelled
    # q = sum_v v p(v) / sum_v p(v) on the 0-10 scale; digits 0..2 (-> 0, 5, 10), "1" spelled by tokens 1 and 3
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q, mass = expected_rating(probs.log(), [[0], [1, 3], [2]])
    np.testing.assert_allclose(q, [(5 * 0.4 + 10 * 0.3) / 0.8, (5 * 0.4 + 10 * 0.2) / 0.8], rtol=1e-6)
    np.testing.assert_allclose(mass, [0.8, 0.8], rtol=1e-6)  # token 4 is no digit


def test_select_weighs_z_scores_over_unique_prompts():
    np.testing.assert_allclose(zscore([1.0, 2.0, 3.0]), [-1.5 ** 0.5, 0.0, 1.5 ** 0.5])
    assert zscore([4.0, 4.0]).tolist() == [0.0, 0.0]  # a constant term ranks nothing
    margin = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    pid = np.array([0, 0, 0, 1, 2, 3])  # prompt 0 in three pairs; prompt 3's only pair is not eligible
    eligible = np.array([True, True, True, True, True, False])
    quality, diversity = np.array([0.0, 3.0, 9.0, 100.0]), np.array([-1.0, -2.0, 0.0, 50.0])
    kept, score, capped = select(margin, eligible, pid, quality, diversity, 3, 0.5, 2.0, 1)
    # s = z(m) + alpha z(q) + gamma z(log rho): z(m) over the eligible pairs, z(q) and z(log rho) over prompts
    # 0, 1, 2, each once (prompt 0's three pairs do not weigh it thrice, prompt 3 has no eligible pair)
    want = zscore(margin[:5]) + 0.5 * zscore(quality[:3])[pid[:5]] + 2.0 * zscore(diversity[:3])[pid[:5]]
    np.testing.assert_allclose(score[:5], want)
    assert score[5] == -np.inf
    # by score: 4, 2, 1, 3, 0 (diversity sinks pair 3 below prompt 0's); one pair per prompt keeps 4, 2, 3
    assert list(kept) == [4, 2, 3] and capped == 2


def test_select_cap_and_alpha_gamma_zero():
    margin = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0])
    pid = np.array([0, 0, 0, 1, 1, 2, 2])
    eligible = np.ones(7, bool)
    quality, diversity = np.array([0.0, 10.0, 5.0]), np.array([-3.0, 0.0, 1.0])
    kept, _, capped = select(margin, eligible, pid, quality, diversity, 4, 0.0, 0.0, 0)
    assert list(kept) == [0, 1, 2, 3] and capped == 0  # margins alone decide
    with pytest.raises(SystemExit, match="--k 4 but only 3 pairs are eligible"):
        select(margin, eligible, pid, quality, diversity, 4, 0.0, 0.0, 1)  # 3 prompts, one pair each
    kept, _, capped = select(margin, eligible, pid, quality, diversity, 3, 0.0, 0.0, 1)
    assert list(kept) == [0, 3, 5] and capped == 4
    kept, _, _ = select(margin, eligible, pid, quality, diversity, 3, 0.0, 0.0, 2)
    assert list(kept) == [0, 1, 3]
    eligible[0] = False
    kept, _, _ = select(margin, eligible, pid, quality, diversity, 2, 100.0, 0.0, 0)
    assert list(kept) == [3, 4]  # quality dominates: prompt 1 is rated best


def test_bad_input_gives_clear_messages(data, clip_dir, tmp_path):
    with pytest.raises(SystemExit, match="--k 100 but only 14 pairs are eligible"):
        run(data, tmp_path / "o.parquet", clip_dir, "none", "--k", 100, "--max_per_prompt", 0)
    empty = make_pickapic(tmp_path / "empty.parquet", [])
    with pytest.raises(SystemExit, match="no rows in 1 parquet file"):
        run(empty, tmp_path / "o.parquet", clip_dir, "none")
    pq.write_table(pq.read_table(data).drop_columns(["jpg_1"]), str(tmp_path / "nojpg.parquet"))
    with pytest.raises(SystemExit, match=r"lacks the Pick-a-Pic column\(s\) \['jpg_1'\]"):
        run(str(tmp_path / "nojpg.parquet"), tmp_path / "o.parquet", clip_dir, "none")
    ties = make_pickapic(tmp_path / "ties.parquet", ["a red circle"] * 2, labels=[(0.5, 0.5)] * 2)
    with pytest.raises(SystemExit, match="no usable pair"):
        run(ties, tmp_path / "o.parquet", clip_dir, "none")
    with pytest.raises(SystemExit, match=r"no \.parquet files in .*missing"):  # public_data.parquet_files' message
        run(str(tmp_path / "missing" / "*.parquet"), tmp_path / "o.parquet", clip_dir, "none")
    with pytest.raises(SystemExit, match="data not found"):
        run(str(tmp_path / "nowhere"), tmp_path / "new" / "o.parquet", clip_dir, "none")
    assert not (tmp_path / "new").exists()  # no empty cache folder left beside the --out that was never written
    with pytest.raises(SystemExit, match=r"--dtype is gone: use --precision auto\|fp32\|bf16"):
        run(data, tmp_path / "o.parquet", clip_dir, "none", "--dtype", "float16")  # the old flag, one clear line


def test_precision_bf16_holds_the_models_in_bf16_and_keeps_its_own_caches(data, clip_dir, lm_dir, tmp_path):
    args = ("--k", 14, "--max_per_prompt", 0, "--cache_dir", tmp_path / "cache")
    run(data, tmp_path / "fp32.parquet", clip_dir, lm_dir, *args)  # auto: fp32 on the CPU
    stats = run(data, tmp_path / "bf16.parquet", clip_dir, lm_dir, *args, "--precision", "bf16")
    assert (stats["pairs_scored"], stats["prompts_rated"], stats["prompts_embedded"]) == (15, 8, 8)  # none from fp32's
    fp32, bf16 = (pq.read_table(tmp_path / f).to_pydict() for f in ("fp32.parquet", "bf16.parquet"))
    by_row = lambda t, c: [v for _, v in sorted(zip(t["ranking_id"], t[c]))]
    for c in ("fifa_reward_0", "fifa_reward_1", "fifa_quality"):  # rewards ~3, ratings ~5 here
        diff = np.abs(np.subtract(by_row(fp32, c), by_row(bf16, c)))
        assert 0 < diff.max() < 0.25  # CLIP and the LM in bf16: close to their fp32 scores, not equal to them


class Interrupted(Exception):
    pass


def test_scoring_resumes_after_interruption(clip_dir, tmp_path, monkeypatch):
    path = make_pickapic(tmp_path / "d.parquet", CAPTIONS[:6] * 2, row_group_size=6)
    # chunks of 3: 2 text chunks of the 6 unique prompts; 4 reward chunks of 3 pairs, 2 forwards of 2 pairs each
    monkeypatch.setattr(filter_fifa, "CHUNK_ROWS", 3)
    real_image, real_text, texts = filter_fifa.clip_image_embeddings, filter_fifa.clip_text_embeddings, []

    def dies_on_call(real, n, log):  # log the size of each forward; the n-th one is interrupted
        def forward(model, proc, items, *a, **kw):
            log.append(len(items))
            if len(log) == n:
                raise Interrupted
            return real(model, proc, items, *a, **kw)
        return forward

    args = ("--quality", "none", "--k", 12, "--max_per_prompt", 0)
    monkeypatch.setattr(filter_fifa, "clip_text_embeddings", dies_on_call(real_text, 2, texts))
    with pytest.raises(Interrupted):  # killed while embedding the second chunk of prompts
        run(path, tmp_path / "a.parquet", clip_dir, "none", *args)
    texts.clear()
    monkeypatch.setattr(filter_fifa, "clip_text_embeddings", dies_on_call(real_text, 0, texts))
    monkeypatch.setattr(filter_fifa, "clip_image_embeddings", dies_on_call(real_image, 3, []))
    with pytest.raises(Interrupted):  # killed in the first forward of the second reward chunk
        run(path, tmp_path / "a.parquet", clip_dir, "none", *args)
    assert texts == [3]  # only the prompts of the text chunk the first run lost
    monkeypatch.setattr(filter_fifa, "clip_image_embeddings", real_image)
    monkeypatch.setattr(filter_fifa, "clip_text_embeddings", real_text)
    stats = run(path, tmp_path / "a.parquet", clip_dir, "none", *args)
    assert stats["pairs_scored"] == 9 and stats["prompts_embedded"] == 0  # reward chunk 1 and all text was kept
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    stats = run(path, fresh / "a.parquet", clip_dir, "none", *args)
    assert stats["pairs_scored"] == 12 and stats["prompts_embedded"] == 6
    resumed, whole = pq.read_table(tmp_path / "a.parquet"), pq.read_table(fresh / "a.parquet")
    assert resumed.column("fifa_margin").to_pylist() == whole.column("fifa_margin").to_pylist()
    assert resumed.column("fifa_diversity").to_pylist() == whole.column("fifa_diversity").to_pylist()


def test_quality_without_chat_template_is_cached_per_prompt(tmp_path):
    from transformers import AutoModelForCausalLM
    lm = make_lm(tmp_path / "plain", chat=False)
    model = AutoModelForCausalLM.from_pretrained(lm)
    torch.nn.init.zeros_(model.lm_head.weight)  # uniform next token: the expected rating is the mean of 0..10
    model.save_pretrained(lm)
    cache = str(tmp_path / "cache")
    q, rated = filter_fifa.rate_prompts(["a red circle", "the sky"], lm, cache, "cpu", torch.float32, 1)
    np.testing.assert_allclose(q, [5.0, 5.0], atol=1e-5)
    assert rated == 2
    q, rated = filter_fifa.rate_prompts(["the sky", "a big dog", "a red circle"], lm, cache, "cpu", torch.float32, 4)
    assert rated == 1 and len(q) == 3  # only the new prompt


def test_a_reward_function_of_ones_own_is_the_proxy(data, tmp_path):
    """--reward_model toy.scorers:redness, a user's function: no model, the margin is redness(winner) - redness(loser)."""
    from toy.palette import redness
    args = ["--data", data, "--reward_model", "toy.scorers:redness", "--quality", "none", "--max_per_prompt", "0"]
    with pytest.raises(SystemExit, match="--reward_model toy.scorers:redness has no text tower"):
        main(args + ["--out", str(tmp_path / "o.parquet")])  # diversity needs --embed_model or --gamma 0
    stats = main(args + ["--out", str(tmp_path / "all.parquet"), "--gamma", "0", "--k", "14"])
    assert (stats["kept"], stats["pairs_scored"], stats["prompts_embedded"]) == (14, 15, 0)
    t = pq.read_table(tmp_path / "all.parquet").to_pydict()
    for i in range(14):
        r = [redness(Image.open(io.BytesIO(t[f"jpg_{j}"][i]))) for j in (0, 1)]
        w = 0 if t["label_0"][i] == 1.0 else 1
        assert t["fifa_margin"][i] == pytest.approx(r[w] - r[1 - w], abs=1e-5)
    top = main(args + ["--out", str(tmp_path / "top.parquet"), "--gamma", "0", "--k", "5"])
    assert top["pairs_scored"] == 0  # from the cache
    kept = pq.read_table(tmp_path / "top.parquet").column("fifa_margin").to_pylist()
    assert sorted(kept) == sorted(t["fifa_margin"])[-5:]
    with pytest.raises(SystemExit, match="cannot load the function 'toy.scorers:nothing'"):
        main(args[:2] + ["--reward_model", "toy.scorers:nothing", "--gamma", "0", "--out", str(tmp_path / "x.parquet")] + args[4:])


def test_hpdv2_pairs_scored_through_read_images_written_as_pickapic_or_jsonl(clip_dir, tmp_path, capsys):
    """Any source load_pairs reads: HPDv2 (6 decided pairs, one with a corrupt image) -> Pick-a-Pic parquet or JSONL."""
    from conftest import write_hpdv2
    from public_data import load_pairs
    from scorers import clip_scores, load_clip
    root = write_hpdv2(tmp_path / "HPDv2", corrupt=True)
    args = ["--quality", "none", "--max_per_prompt", "0"]
    stats = run(root, tmp_path / "o.parquet", clip_dir, "none", "--k", 5, *args)
    assert (stats["pairs_in"], stats["ties"], stats["corrupt"], stats["kept"], stats["pairs_scored"]) == (10, 1, 1, 5, 6)
    assert "read 6 pairs" in capsys.readouterr().out  # the reader's own summary, with its skips
    t = pq.read_table(tmp_path / "o.parquet").to_pydict()
    assert set(FIFA_COLUMNS) <= set(t) and t["label_0"] == [1.0] * 5 and "a red square again" not in t["caption"]
    model, proc = load_clip(clip_dir)
    for i in range(5):  # jpg_0 is the human winner; the margin is its score minus the loser's
        s = clip_scores(model, proc, [Image.open(io.BytesIO(t[f"jpg_{j}"][i])) for j in (0, 1)], [t["caption"][i]] * 2)
        assert t["fifa_margin"][i] == pytest.approx(float(s[0] - s[1]), abs=1e-4)
    assert len(load_pairs(str(tmp_path / "o.parquet"))) == 5  # train_dpo.py reads it as Pick-a-Pic
    stats = run(root, tmp_path / "top.jsonl", clip_dir, "none", "--k", 2, *args)
    assert stats["pairs_scored"] == 0  # from the cache
    fb = load_pairs(str(tmp_path / "top.jsonl"))
    assert len(fb) == 2 and sorted(r["fifa_margin"] for r in map(json.loads, open(tmp_path / "top.jsonl"))) == \
        sorted(t["fifa_margin"])[-2:]
    run(root, tmp_path / "abs.parquet", clip_dir, "none", "--k", 5, "--margin", "absolute", *args)
    a = pq.read_table(tmp_path / "abs.parquet").to_pydict()  # relabelled pairs swap images, rewards follow them
    assert all(r0 >= r1 for r0, r1 in zip(a["fifa_reward_0"], a["fifa_reward_1"])) and a["label_0"] == [1.0] * 5
    with pytest.raises(SystemExit, match="as .parquet .* or .jsonl"):
        run(root, tmp_path / "o.csv", clip_dir, "none", *args)


# ------------------------------------------------------------------------------------------------
# the human margin (--margin_source): vote shares instead of, or beside, the proxy reward

def write_vote_pairs(folder, votes):
    """A JSONL of pairs with chosen_votes / rejected_votes (None: a line without counts), random JPEGs."""
    (folder / "img").mkdir(parents=True)
    lines = []
    for k, v in enumerate(votes):
        for side in "ab":
            (folder / "img" / f"{k}{side}.jpg").write_bytes(jpeg(100 + 2 * k + (side == "b")))
        rec = {"caption": CAPTIONS[k % len(CAPTIONS)], "chosen": f"img/{k}a.jpg", "rejected": f"img/{k}b.jpg"}
        lines.append(json.dumps(rec if v is None else dict(rec, chosen_votes=v[0], rejected_votes=v[1])))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "pairs.jsonl")


def test_human_margin_is_the_log_odds_of_smoothed_vote_shares():
    # s = 0.1 is 9 voters' empirical logit log((c + 1/2) / (r + 1/2)): 9-0 -> log 19, 7-2 -> log 3, 2-7 -> -log 3
    m = human_margin(np.array([1.0, 7 / 9, 0.5, 2 / 9, np.nan]), 0.1)
    np.testing.assert_allclose(m[:4], [math.log(19), math.log(3), 0.0, -math.log(3)], atol=1e-12)
    assert math.isnan(m[4])  # no counts, no margin
    assert human_margin([0.9], 0.0)[0] == pytest.approx(math.log(9))  # unsmoothed: logit(0.9) = log(0.9 / 0.1)
    # both: z(proxy) + z(human) over the eligible pairs; pair 3 is not eligible, pair 4 has no counts (human term 0)
    proxy, human = np.array([1.0, 2.0, 3.0, 10.0, 5.0]), np.array([0.0, 2.0, 1.0, 7.0, np.nan])
    got = combined_margin(proxy, human, np.array([True, True, True, False, True]))
    z_proxy = (np.array([1.0, 2.0, 3.0, 5.0]) - 2.75) / math.sqrt(2.1875)  # mean 2.75, variance 8.75 / 4
    z_human = np.array([-1.0, 1.0, 0.0]) / math.sqrt(2 / 3)  # mean 1, variance 2 / 3
    np.testing.assert_allclose(got, [*(z_proxy[:3] + z_human), 0.0, z_proxy[3]])


def test_margin_source_on_jsonl_pairs_with_counts(tmp_path, monkeypatch):
    """chosen_votes / rejected_votes (weights too) -> fb.vote_share -> the human margin; no proxy model is loaded."""
    from public_data import load_pairs
    from toy.palette import redness
    path = write_vote_pairs(tmp_path / "votes", [(9, 0), (5, 4), (7, 2), (2, 7), None, (6.5, 2.5)])
    np.testing.assert_allclose(load_pairs(path).vote_share, [1, 5 / 9, 7 / 9, 2 / 9, np.nan, 6.5 / 9])

    def no_proxy(*a, **kw):
        raise AssertionError("the proxy reward was loaded")
    monkeypatch.setattr(filter_fifa, "load_clip", no_proxy)
    monkeypatch.setattr(filter_fifa, "score_pairs", no_proxy)
    args = ["--data", path, "--margin_source", "human", "--reward_model", str(tmp_path / "no_such_model"),
            "--quality", "none", "--gamma", "0", "--max_per_prompt", "0"]
    stats = main(args + ["--out", str(tmp_path / "top.parquet"), "--k", "3"])
    assert (stats["pairs_in"], stats["no_votes"], stats["kept"], stats["pairs_scored"]) == (6, 1, 3, 0)
    t = pq.read_table(tmp_path / "top.parquet").to_pydict()
    np.testing.assert_allclose(t["fifa_vote_share"], [1, 7 / 9, 6.5 / 9])  # the three largest shares (input order)
    np.testing.assert_allclose(t["fifa_margin"], human_margin(np.array(t["fifa_vote_share"])), rtol=1e-6)
    assert t["fifa_reward_0"] == t["fifa_margin"] and t["fifa_reward_1"] == [0.0] * 3  # the votes' rewards: logit p~, 0
    assert t["label_0"] == [1.0] * 3
    # absolute: the 2-7 pair is relabelled by the voters' majority, its images swapped
    stats = main(args + ["--out", str(tmp_path / "abs.jsonl"), "--k", "5", "--margin", "absolute"])
    rows = {r["caption"]: r for r in map(json.loads, open(tmp_path / "abs.jsonl"))}
    swapped = rows[CAPTIONS[3]]
    assert swapped["chosen"] == "votes/img/3b.jpg" and swapped["fifa_relabelled"] and stats["relabelled"] == 1
    assert swapped["fifa_vote_share"] == pytest.approx(7 / 9) and swapped["fifa_margin"] == pytest.approx(math.log(3))
    # both: the toy's redness as the proxy; the pair without counts is eligible with the proxy's term alone
    monkeypatch.undo()
    both = args[:5] + ["toy.scorers:redness"] + args[6:]
    both[3] = "both"
    stats = main(both + ["--out", str(tmp_path / "both.jsonl"), "--k", "6"])
    assert stats["kept"] == 6 and stats["pairs_scored"] == 6 and stats["no_votes"] == 1
    rows = [json.loads(r) for r in open(tmp_path / "both.jsonl")]
    for r in rows:  # the proxy margin of the written pair is redness(chosen) - redness(rejected)
        red = [redness(Image.open(tmp_path / r[k])) for k in ("chosen", "rejected")]
        assert r["fifa_reward_0"] - r["fifa_reward_1"] == pytest.approx(red[0] - red[1], abs=1e-5)
    proxy = np.array([r["fifa_reward_0"] - r["fifa_reward_1"] for r in rows])
    human = human_margin(np.array([np.nan if r["fifa_vote_share"] is None else r["fifa_vote_share"] for r in rows]))
    want = combined_margin(proxy, human, np.ones(6, bool))
    np.testing.assert_allclose([r["fifa_margin"] for r in rows], want, rtol=1e-5, atol=1e-6)


def test_human_margin_on_hpdv3_vote_counts(tmp_path):
    """HPDv3's choice_dist (read by public_data into fb.vote_share) ranks its pairs; the pair without counts is dropped."""
    from conftest import write_hpdv3
    from public_data import load_pairs
    root = write_hpdv3(tmp_path / "HPDv3")
    shares = load_pairs(root).vote_share
    stats = main(["--data", root, "--out", str(tmp_path / "o.jsonl"), "--margin_source", "human", "--quality", "none",
                  "--gamma", "0", "--max_per_prompt", "0", "--k", "3"])
    assert stats["no_votes"] == int(np.isnan(shares).sum()) == 1 and stats["pairs_scored"] == 0
    kept = [r["fifa_vote_share"] for r in map(json.loads, open(tmp_path / "o.jsonl"))]
    np.testing.assert_allclose(sorted(kept), sorted(shares[~np.isnan(shares)])[-3:], rtol=1e-6)  # the 3 largest shares


def test_rapidata_by_hub_id_keys_its_caches_by_the_downloaded_files(tmp_path, monkeypatch):
    """A hub id is not a file: the caches are keyed by the parquet files it downloaded, so a rerun scores nothing and a
    changed download scores again; Rapidata's weighted votes give the human term of --margin_source both."""
    import huggingface_hub
    from test_public_data import RAPIDATA_ROWS, write_rapidata
    snapshot = tmp_path / "snapshot"
    write_rapidata(str(snapshot / "data" / "train-00000-of-00001.parquet"), RAPIDATA_ROWS)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, repo_type, allow_patterns: str(snapshot))
    args = ["--data", "Rapidata/some_t2i_human_preference", "--margin_source", "both", "--reward_model",
            "toy.scorers:redness", "--quality", "none", "--gamma", "0", "--max_per_prompt", "0", "--k", "2",
            "--cache_dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match="inside parquet files; write .parquet"):  # before any scoring: no cache yet
        main(args + ["--out", str(tmp_path / "a.jsonl")])
    assert not (tmp_path / "cache").exists()
    stats = main(args + ["--out", str(tmp_path / "a.parquet")])
    assert (stats["pairs_in"], stats["pairs_scored"], stats["kept"]) == (7, 3, 2)  # 7 rows, 3 usable pairs
    shares = pq.read_table(tmp_path / "a.parquet")["fifa_vote_share"].to_pylist()
    assert sorted(shares) == pytest.approx([0.75, 0.75])  # p2 and p7: the largest shares, and the red image wins both
    assert main(args + ["--out", str(tmp_path / "b.parquet"), "--k", "3"])["pairs_scored"] == 0  # from the cache
    write_rapidata(str(snapshot / "data" / "train-00000-of-00001.parquet"), RAPIDATA_ROWS[:2])  # the dataset changed
    assert main(args + ["--out", str(tmp_path / "c.parquet")])["pairs_scored"] == 2


def test_human_margin_asked_of_data_without_counts_is_one_clear_line(data, tmp_path):
    from public_data import load_pairs
    out = ["--out", str(tmp_path / "o.parquet"), "--quality", "none", "--gamma", "0"]
    with pytest.raises(SystemExit, match=r"--margin_source human: .* has no vote counts \(Pick-a-Pic has one binary"):
        main(["--data", data, "--margin_source", "human"] + out)
    plain = write_vote_pairs(tmp_path / "plain", [None, None])
    assert load_pairs(plain).vote_share is None
    with pytest.raises(SystemExit, match=r"--margin_source both: .* has no vote counts \(no usable pair has any\)"):
        main(["--data", plain, "--margin_source", "both"] + out)
    with pytest.raises(SystemExit, match="pairs.jsonl:1: chosen_votes and rejected_votes must both be numbers >= 0"):
        load_pairs(write_vote_pairs(tmp_path / "bad", [(3, -1)]))
    with pytest.raises(SystemExit, match="--margin_source both needs --margin signed"):
        main(["--data", plain, "--margin_source", "both", "--margin", "absolute"] + out)


def test_toy_votes_follow_the_users_reward_and_leave_the_pairs_as_they_were(tmp_path):
    """runs/toy_fifa_pairs.py --voters: graded votes under the labels' Bradley-Terry, the pairs unchanged by them."""
    from public_data import load_pairs
    from runs import toy_fifa_pairs
    from toy import make_base
    from toy.palette import redness
    folder = tmp_path / "feedback" / "kto" / "disliked"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(30):
        image, caption = make_base.random_scene(rng)
        image.save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(caption)
    args = ["--feedback", str(tmp_path / "feedback"), "--random_k", "5"]
    toy_fifa_pairs.main(args + ["--out", str(tmp_path / "plain" / "pairs.parquet")])
    toy_fifa_pairs.main(args + ["--out", str(tmp_path / "votes" / "pairs.parquet"), "--voters", "400"])
    for f in ("pairs.parquet", "pairs_random_5.parquet"):  # the votes change neither the pairs nor the subset
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "votes" / f).read_bytes()
    jsonl = tmp_path / "votes" / "pairs_votes.jsonl"
    t, rows = pq.read_table(tmp_path / "votes" / "pairs.parquet").to_pydict(), [json.loads(r) for r in open(jsonl)]
    for i, r in enumerate(rows):  # the labelled winner as chosen, the parquet's own JPEG bytes
        w = 0 if t["label_0"][i] == 1.0 else 1
        assert (jsonl.parent / r["chosen"]).read_bytes() == t[f"jpg_{w}"][i]
        assert (jsonl.parent / r["rejected"]).read_bytes() == t[f"jpg_{1 - w}"][i]
        assert r["chosen_votes"] + r["rejected_votes"] == 400 and r["chosen_votes"] >= 1  # the labeller's vote
    # 400 votes' share: P(the labelled image wins) = sigmoid((R(chosen) - R(rejected)) / T), T = 0.02
    share = load_pairs(str(jsonl)).vote_share
    margin = np.array([redness(Image.open(jsonl.parent / r[k])) for r in rows for k in ("chosen", "rejected")]).reshape(-1, 2)
    p = 1 / (1 + np.exp(-(margin[:, 0] - margin[:, 1]) / 0.02))
    assert np.abs(share - p).max() < 0.15 and np.corrcoef(share, p)[0, 1] > 0.95
    assert (share < 0.5).any() and (share > 0.9).any()  # labels the crowd outvotes, and clear pairs
