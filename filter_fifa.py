"""FiFA (Yang et al., ICLR 2025): keep the K most informative preference pairs before Diffusion-DPO.

    python filter_fifa.py --data PICKAPIC_PARQUET --out SUBSET.parquet --k 5000 [--alpha A --gamma G ...]
    python filter_fifa.py --data HPDv2/ --out SUBSET.parquet (or SUBSET.jsonl) --k 5000
    python filter_fifa.py --data PAIRS_WITH_VOTES --out SUBSET.parquet --k 5000 --margin_source human

FiFA maximises over subsets S of K pairs: the sum of preference margins + alpha * the sum of prompt
qualities + gamma * the entropy of S's prompt embeddings. Estimated once over the whole set
(Kozachenko-Leonenko: H ~ d/N sum log rho_k + const), the objective is additive and S is the top K of

    s_i = m_i + alpha * q(c_i) + gamma * log rho_k(c_i)                          (Yang et al., ICLR 2025)

with each term z-normalised here (select: z(m_i) + alpha z(q) + gamma z(log rho_k)) and at most 2 pairs per
prompt kept (--max_per_prompt); the defaults below say why.

  m_i    R(c_i, x_w) - R(c_i, x_l), R a proxy reward (PickScore: logit_scale.exp() * cos(image, text))
  q(c)   a small instruct LLM's expected 0-10 rating of the prompt, read from the next-token
         probabilities of the digits (one forward pass, no sampling)
  rho_k  distance from c's normalised text embedding to its k-th nearest OTHER unique prompt

The margin's source (--margin_source): the paper uses a proxy R only because Pick-a-Pic's labels are binary. Where
several people voted on a pair (HPDv3's choice_dist, Rapidata's weighted shares, JSONL chosen_votes/rejected_votes),
the votes estimate m_i: human m_i = log(p~ / (1 - p~)), p~ = (1 - s) p_i + s/2, p_i the share of the votes for x_w;
both m_i = z(proxy m_i) + z(human m_i). Why the log-odds: under Bradley-Terry (how PickScore-like rewards are trained)
a voter prefers x_w with probability sigmoid(R(c, x_w) - R(c, x_l)), so logit(p) estimates that margin (p = 0.9 is
2.2, 0.99 is 4.6). Why smoothed (s = 0.1): p = 1 would be infinite; a tenth of the way to 1/2 keeps the order and,
for 9 voters, is the empirical logit log((c + 1/2) / (r + 1/2)). A share below 1/2 sinks (signed) or is relabelled
(absolute). No counts: not eligible (human), human term 0 (both). Tied shares are ordered by quality, diversity (and
the proxy, with both), else input order. human opens no image; a CLIP --reward_model then only embeds prompts.

Read top to bottom: the method (the three scores and the selection, pure functions, these equations beside
them); the I/O (the proxy reward of both images of every pair, cached in chunks and resumable, each unique prompt
embedded and rated once); main, one step per stage. Pick-a-Pic parquet is streamed (335 GB read chunk by chunk,
twice), its kept rows keep every column; any other source that public_data.load_pairs reads (HPDv2, HPDv3,
ImageRewardDB, Rapidata, a JSONL of pairs) is written as Pick-a-Pic-schema parquet (JPEG bytes inside, the winner as
jpg_0) or, for --out *.jsonl, as JSONL pairs. Both add fifa_* columns; train_dpo.py reads either. Caches are keyed
by the data files and the model: a rerun with other --alpha/--gamma/--k scores nothing again, nor reads a stale cache.

Defaults the paper leaves open, and why:
- each term z-normalised (mean 0, std 1): PickScore units, 0-10 ratings and log distances have unrelated
  scales, so alpha and gamma read "std of this term per std of margin". The margin over the eligible
  pairs; quality and diversity over the unique prompts (a prompt repeated 300 times must not set them).
- alpha = gamma = 0.5: the margin, the paper's main signal, stays dominant (weight 1), while a prompt
  2 std below average in quality or diversity costs as much as 1 std of margin.
- signed margin: human labels kept; a pair the proxy disagrees with has a negative margin and sinks
  (with K ~0.5% of the data it is effectively dropped). `absolute` trusts the proxy and relabels such
  pairs (Diffusion-DPO reports PickScore relabelling helped: 63.3% vs 59.8% win rate).
- k = 5: the usual small k of the Kozachenko-Leonenko estimator, less noisy than k = 1.
- rho floor 0.01: CLIP's tokenizer lowercases and cleans whitespace, so different strings can share an
  embedding (rho = 0, log = -inf); the floor caps their penalty at log 0.01 = -4.6, a few nats below a
  typical neighbour, so that a handful of them cannot set the scale of the normalisation.
- at most 2 pairs per prompt: Pick-a-Pic has ~14 pairs per prompt, a few prompts hundreds, and the
  additive score cannot see that a prompt is already in S (S's entropy would count the copy at distance
  0). The cap restores part of that and still lets a prompt give its two most informative pairs.
- Qwen2.5-0.5B-Instruct rates: small (runs on a CPU), ungated, Apache-2.0, follows a rating instruction.
  It splits numbers into digits ("10" is no token), so with such tokenizers the scale asked for is
  0-9, rescaled to 0-10 (the z-normalisation makes the scale moot anyway).
"""
import argparse
import functools
import glob
import os
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from common import PRECISIONS, resolve_precision
from files import (atomic_path, fail, file_identity, model_identity, one_line, read_chunks, save_chunk,
                   save_safetensors, short_hash)
from data import feedback_pair_images, index_prompts, pickapic_pair_images
from public_data import (check_pairs_out, hpdv2_file, imagerewarddb_files, load_pairs, pairs_format, pairs_identity,
                         parquet_files, read_pickapic, write_pairs, write_pickapic_subset)
from scorers import PICKSCORE_MODEL, PICKSCORE_PROCESSOR, clip_image_embeddings, clip_text_embeddings, is_function, load_clip, load_function

CHUNK_ROWS = 1024  # pairs (or prompts) per cache file: the most scoring work an interruption can lose
VOTE_SMOOTHING = 0.1  # s: vote shares pulled this far to 1/2 before the log-odds (the docstring says why)
QUALITY_PROMPT = ("Rate this text-to-image prompt from 0 to {top}. Rate high a clear prompt with concrete "
                  "visual detail, low an unclear, meaningless or harmful one.\nPrompt: {prompt}\n"
                  "Answer with a single number.")


# ------------------------------------------------------------------------------------------------
# the method: the three scores of the docstring's s_i, then the selection; pure functions (no models, no
# files), which bench_fifa.py times at Pick-a-Pic scale

def preference_margin(rewards, human_w, eligible, mode="signed"):
    """The preference margin of every pair, from its proxy rewards (--margin; the docstring above says why signed):

        signed:    m_i = R(c_i, x_w) - R(c_i, x_l)      human labels kept; negative where the proxy disagrees
        absolute:  m_i = |R(c_i, x_0) - R(c_i, x_1)|    the proxy's winner taken as x_w (relabelled)

    rewards: (N, 2) R(c, x_0), R(c, x_1); human_w: (N,) the human winner, 0 or 1 (-1: none); eligible: (N,) bool.
    Returns (N,) m, (N,) the proxy's winner (0 or 1), and (N,) bool: the eligible pairs absolute relabels."""
    proxy_w = np.where(rewards[:, 1] > rewards[:, 0], 1, 0)
    r_w = np.where(human_w == 1, rewards[:, 1], rewards[:, 0])  # (N,) R(c, x_w)
    r_l = np.where(human_w == 1, rewards[:, 0], rewards[:, 1])  # (N,) R(c, x_l)
    margin = r_w - r_l if mode == "signed" else np.abs(r_w - r_l)
    swap = eligible & (proxy_w != human_w) & (mode == "absolute")
    return margin, proxy_w, swap


def human_margin(vote_share, smoothing=VOTE_SMOOTHING):
    """(N,) m_i = log(p~ / (1 - p~)), p~ = (1 - s) p_i + s / 2: the margin the (N,) vote shares p_i estimate (NaN stays)."""
    p = (1 - smoothing) * np.asarray(vote_share, np.float64) + smoothing / 2
    return np.log(p / (1 - p))


def combined_margin(proxy, human, eligible):
    """both: z(proxy m_i) + z(human m_i) over the eligible pairs (equal weight in any units); no counts: human term 0."""
    out, has = np.zeros(len(proxy)), eligible & ~np.isnan(human)
    out[eligible] = zscore(proxy[eligible])
    out[has] += zscore(human[has])
    return out


def expected_rating(logits, digits):
    """q(c): an LM's expected rating of a prompt, from its next-token logits after the rating instruction.

        q(c) = sum_v v' p(v | c) / sum_v p(v | c),   v = 0..top,  v' = 10 v / top (the 0-10 scale)

    logits: (B, V); digits[v]: the token ids that spell v (rate_prompts finds them), whose probabilities add
    up to p(v | c). One forward pass, no sampling. Returns (B,) q and (B,) sum_v p(v | c), the probability
    that the answer is a number at all (a model that answers in words gives a meaningless q)."""
    top = len(digits) - 1
    values = torch.arange(top + 1, dtype=torch.float32) * 10 / top  # the 0-10 scale
    probs = logits.softmax(-1)
    p_v = torch.stack([probs[:, c].sum(-1) for c in digits], -1)  # (B, top+1)
    return p_v / p_v.sum(-1, keepdim=True) @ values, p_v.sum(-1)


def knn_log_distance(emb, k=5, floor=0.01, chunk=2048):
    """(U,) log rho_k: log distance from each row of emb (U, d), L2-normalised, to its k-th nearest
    OTHER row, floored. Rows are unique prompts, so excluding a row's self excludes exact duplicates.
    The diversity term: the Kozachenko-Leonenko estimate of the entropy of N embeddings in d dimensions,

        H ~ (d / N) sum_i log rho_k(e_i) + const,

    is a sum over prompts, so each prompt brings its own log rho_k (computed once over all unique prompts).

    The (U, U) similarity matrix is never held: blocks of (chunk, chunk), 16 MB each, and only the
    upper triangle, since block (j, i) is block (i, j) transposed: half the 5.5 TFLOP at U = 60,000.
    Each row keeps a running list of its k largest similarities, merged block by block."""
    emb = torch.as_tensor(emb, dtype=torch.float32)
    n = len(emb)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros(n, np.float32)  # a single prompt has no neighbour: the term is constant
    best = torch.full((n, k), -2.0)  # (U, k) k largest cosines so far; cosines are >= -1

    def merge(rows, sim):  # fold the k largest of each row of sim into best[rows]
        top = sim.topk(min(k, sim.shape[1]), dim=1).values
        best[rows] = torch.cat([best[rows], top], dim=1).topk(k, dim=1).values

    for i in range(0, n, chunk):
        for j in range(i, n, chunk):
            sim = emb[i:i + chunk] @ emb[j:j + chunk].T  # (ci, cj) cosine similarities
            if i == j:
                sim.fill_diagonal_(-2.0)  # a prompt is not its own neighbour
            merge(slice(i, i + chunk), sim)
            if i != j:
                merge(slice(j, j + chunk), sim.T.contiguous())  # contiguous: topk along rows is 2x faster
    # |a - b| = sqrt(2 - 2 cos) for unit vectors
    return (2 - 2 * best[:, -1]).clamp(min=0).sqrt().clamp(min=floor).log().numpy()


def zscore(x):
    """z(x) = (x - mean x) / std x, in float64; all zeros when x is constant (nothing to rank by)."""
    x = np.asarray(x, np.float64)
    std = x.std()
    return (x - x.mean()) / std if std > 0 else np.zeros_like(x)


def select(margin, eligible, pid, quality, diversity, k, alpha, gamma, max_per_prompt):
    """Top-k eligible pairs by

        s_i = z(m_i) + alpha * z(q(c_i)) + gamma * z(log rho_k(c_i))    (the paper's s_i, each term z-normalised)

    at most max_per_prompt per prompt (0: no cap). z of the margin over the eligible pairs; z of quality and
    diversity over the unique prompts with an eligible pair (a prompt in 300 pairs counts once).
    margin, eligible, pid: (N,) per pair; quality, diversity: (U,) per unique prompt.
    Returns (kept indices best first, (N,) scores (-inf where not eligible), pairs removed by the cap)."""
    used = np.unique(pid[eligible])  # the prompts with an eligible pair set the scale of q and d
    q, d = np.zeros(len(quality)), np.zeros(len(diversity))
    if alpha:
        q[used] = zscore(quality[used])
    if gamma:
        d[used] = zscore(diversity[used])
    score = np.full(len(margin), -np.inf)
    p = pid[eligible]
    score[eligible] = zscore(margin[eligible]) + alpha * q[p] + gamma * d[p]
    order = np.flatnonzero(eligible)
    order = order[np.argsort(-score[order], kind="stable")]  # best first
    capped = 0
    if max_per_prompt > 0:
        # rank of each pair among its prompt's pairs: a stable sort by prompt keeps the score order
        by_prompt = np.argsort(pid[order], kind="stable")
        sorted_pid = pid[order][by_prompt]
        first = np.r_[True, sorted_pid[1:] != sorted_pid[:-1]]  # first pair of each prompt
        group_start = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))
        rank = np.empty(len(order), np.int64)
        rank[by_prompt] = np.arange(len(order)) - group_start
        capped = int((rank >= max_per_prompt).sum())
        order = order[rank < max_per_prompt]
    if k > len(order):
        fail(f"--k {k} but only {len(order):,} pairs are eligible (after dropping ties, unlabelled, corrupt and "
             f"caption-less pairs{f', and {capped:,} over --max_per_prompt' if capped else ''}); scores are cached")
    return order[:k], score, capped


# ------------------------------------------------------------------------------------------------
# margin: the proxy reward of both images of every pair

def score_pairs(pair_chunks, need, pid, load_reward, cache):
    """R(c, x_0), R(c, x_1) of every pair in `need`: (N, 2) float32, NaN where unscored or corrupt.

    pair_chunks(wanted) -> (first row, rows, images) per chunk (data.pickapic_pair_images, feedback_pair_images).
    load_reward() -> reward(images, pids): the proxy, loaded on first use (clip_reward, function_reward).
    Cached in chunks of at most CHUNK_ROWS pairs (read_chunks): a killed run resumes at the first
    missing chunk. Returns (scores, pairs scored now)."""
    scores = np.full((len(pid), 2), np.nan, np.float32)
    cached, done = read_chunks(cache, "scores", len(pid))
    for start, values in cached.items():
        scores[start:start + len(values)] = values
    todo = need & ~done
    if not todo.any():
        return scores, 0
    reward = load_reward()
    bar = tqdm(total=int(todo.sum()), desc="reward", unit="pair")
    for start, size, images in pair_chunks(todo):
        rows = slice(start, start + size)
        scores[rows] = score_chunk(images, size, need[rows], pid[rows], reward, reward.pairs_per_call)
        save_chunk(cache, "scores", start, scores[rows])
        bar.update(int(todo[rows].sum()))
    bar.close()
    return scores, int(todo.sum())


def score_chunk(pair_images, size, need, pid, reward, per):
    """(size, 2) proxy rewards of one chunk; NaN for rows not needed or with an undecodable image."""
    out = np.full((size, 2), np.nan, np.float32)
    rows = np.flatnonzero(need)
    for s in range(0, len(rows), per):  # `per` pairs per call; decode just before it to bound memory
        ok, images = [], []
        for r, pair in zip(rows[s:s + per], pair_images(rows[s:s + per])):
            if None not in pair:  # a corrupt pair stays NaN and is counted in the summary
                ok.append(r)
                images += pair
        if ok:
            out[ok] = reward(images, pid[ok])  # (P, 2)
    return out


def clip_reward(model, proc, text_emb, batch_size):
    """The PickScore recipe as a proxy reward: logit_scale.exp() * cos(image, prompt) (= scorers.clip_scores).

    reward(images, pids) -> (P, 2): images holds each pair's two images in turn, pids the (P,) prompt
    of each pair, whose text embedding is computed once per unique prompt."""
    scale = model.logit_scale.exp().float().item()  # PickScore: 100, so SD1.5 images score ~20-22

    def reward(images, pids):
        img = clip_image_embeddings(model, proc, images, batch_size).view(len(pids), 2, -1)  # (P, 2, d)
        return (scale * (img * text_emb[torch.from_numpy(pids)][:, None]).sum(-1)).numpy()  # (P, 2)
    reward.pairs_per_call = max(1, batch_size // 2)
    return reward


def function_reward(fn, prompts):
    """Your own reward function as the proxy (--reward_model module:function): fn(images, prompts) -> one number
    per image, as evaluate.py's scorers take it. The toy world passes its red user (toy.scorers:redness), whose
    reward is the user's own, so the margins are exact, as PickScore's are not."""
    def reward(images, pids):
        texts = [prompts[p] for p in pids for _ in range(2)]  # each pair's prompt, for both of its images
        return np.asarray(fn(images, texts), np.float32).reshape(len(pids), 2)  # (P, 2)
    reward.pairs_per_call = CHUNK_ROWS
    return reward


def text_embeddings(prompts, clip, cache, batch_size):
    """(U, d) L2-normalised CLIP text embeddings of the unique prompts, batched, with a progress bar.

    Cached like the rewards, in chunks of CHUNK_ROWS prompts (read_chunks): at Pick-a-Pic scale that is
    60,000 prompts through CLIP-H's text tower, which a killed run should not redo. Returns (emb, embedded now)."""
    cached, done = read_chunks(cache, "emb", len(prompts))
    todo = [s for s in range(0, len(prompts), CHUNK_ROWS) if not done[s:s + CHUNK_ROWS].all()]
    embedded = sum(len(prompts[s:s + CHUNK_ROWS]) for s in todo)
    if todo:
        model, proc = clip()
        bar = tqdm(total=embedded, desc="text", unit="prompt")
        for start in todo:
            part, emb = prompts[start:start + CHUNK_ROWS], []
            for b in range(0, len(part), batch_size):
                emb.append(clip_text_embeddings(model, proc, part[b:b + batch_size]))
                bar.update(len(emb[-1]))
            cached[start] = torch.cat(emb).numpy()
            save_chunk(cache, "emb", start, cached[start])
        bar.close()
    emb = np.empty((len(prompts), next(iter(cached.values())).shape[1]), np.float32)
    for start, values in cached.items():
        emb[start:start + len(values)] = values
    return torch.from_numpy(emb), embedded


# ------------------------------------------------------------------------------------------------
# quality: an LLM's expected rating of each unique prompt

def rate_prompts(prompts, name, cache, device, dtype, batch_size):
    """(U,) expected 0-10 rating of each prompt; one forward pass per batch, cached per prompt string.

    Returns (ratings, prompts rated now). Cache parts of CHUNK_ROWS prompts, written atomically."""
    os.makedirs(cache, exist_ok=True)
    known = {}
    for part in sorted(glob.glob(os.path.join(cache, "part-*.parquet"))):
        t = pq.read_table(part).to_pydict()
        known.update(zip(t["prompt"], t["quality"]))
    todo = sorted({p for p in prompts if p not in known}, key=len)  # similar lengths pad little
    if todo:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(name)
            lm = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
        except Exception as e:  # offline, a typo, a folder without weights: one line, not a traceback
            fail(f"cannot load quality LM {name!r}: {one_line(e)}")
        tok.padding_side = "left"  # then the last position is every prompt's next token
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        top = 10 if len(tok.encode("10", add_special_tokens=False)) == 1 else 9
        # each value's single-token spellings: "7", and " 7" as a BPE model writes it after "Score:"
        spell = [[tok.encode(s, add_special_tokens=False) for s in (str(v), " " + str(v))] for v in range(top + 1)]
        cands = [sorted({ids[0] for ids in sp if len(ids) == 1}) for sp in spell]
        if not all(cands):
            fail(f"quality LM {name!r}: no single token for some of the digits 0-{top}")
        chat = bool(getattr(tok, "chat_template", None))
        mass, bar = [], tqdm(total=len(todo), desc="quality", unit="prompt")
        parts = len(glob.glob(os.path.join(cache, "part-*.parquet")))
        for s in range(0, len(todo), CHUNK_ROWS):
            part, q = todo[s:s + CHUNK_ROWS], []
            for b in range(0, len(part), batch_size):
                # a few Pick-a-Pic prompts run to thousands of characters: the first 500 say what they are
                texts = [QUALITY_PROMPT.format(top=top, prompt=p[:500]) for p in part[b:b + batch_size]]
                texts = ([tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                  add_generation_prompt=True) for t in texts]
                         if chat else [t + "\nScore:" for t in texts])
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat).to(device)
                pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # count from each first real token
                with torch.no_grad():
                    logits = lm(**enc, position_ids=pos, logits_to_keep=1).logits[:, -1].float().cpu()  # (B, V)
                rating, digit_mass = expected_rating(logits, cands)
                q += rating.tolist()
                mass += digit_mass.tolist()
                bar.update(len(texts))
            path = os.path.join(cache, f"part-{parts + s // CHUNK_ROWS:06d}.parquet")
            with atomic_path(path) as tmp:
                pq.write_table(pa.table({"prompt": part, "quality": q}), tmp)
            known.update(zip(part, q))
        bar.close()
        # a model that answers with words, not digits, gives a meaningless rating: say so
        print(f"quality LM: mean probability of a digit answer {np.mean(mass):.2f} (want close to 1)")
    return np.array([known[p] for p in prompts], np.float32), len(todo)


# ------------------------------------------------------------------------------------------------
# the steps of a run, in the order main takes them

def parse_args(argv):
    p = argparse.ArgumentParser(description="FiFA: keep the K most informative preference pairs for Diffusion-DPO.")
    p.add_argument("--data", required=True,
                   help="pairs: Pick-a-Pic v2 parquet (a file, a folder searched recursively, a glob or a hub dataset id, "
                        "its train split; ID:SPLIT for another), or any source train_dpo.py reads (HPDv2/v3, Rapidata, JSONL...)")
    p.add_argument("--out", required=True, help="output: the kept rows with fifa_* columns; Pick-a-Pic input keeps its "
                                                "columns; other input: .parquet in the Pick-a-Pic schema or .jsonl pairs")
    p.add_argument("--k", type=int, default=5000, help="pairs to keep (paper: ~5,000, under 0.5%% of Pick-a-Pic v2)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of prompt quality, in std per std of margin; 0 = off")
    p.add_argument("--gamma", type=float, default=0.5, help="weight of prompt diversity, in std per std of margin; 0 = off")
    p.add_argument("--margin", choices=["signed", "absolute"], default="signed",
                   help="signed: R(w) - R(l), human labels kept; absolute: |R(0) - R(1)|, relabelled by the proxy (or votes)")
    p.add_argument("--margin_source", choices=["proxy", "human", "both"], default="proxy", help="proxy: the proxy "
                   "reward's (the paper's); human: log-odds of the vote share (HPDv3, Rapidata, JSONL votes); both: z-sum")
    p.add_argument("--max_per_prompt", type=int, default=2, help="at most this many kept pairs per prompt; 0 = no cap")
    p.add_argument("--knn", type=int, default=5, help="k of the k-th nearest neighbour distance rho_k (>= 1)")
    p.add_argument("--rho_floor", type=float, default=0.01, help="floor of rho_k, a distance between unit vectors (0-2)")
    p.add_argument("--reward_model", default=PICKSCORE_MODEL,
                   help="proxy reward: a CLIP hub id or folder, or your own function module:function, f(images, prompts) "
                        "-> one number per image (the toy world: toy.scorers:redness; diversity then needs --embed_model "
                        "or --gamma 0)")
    p.add_argument("--reward_processor", default=PICKSCORE_PROCESSOR, help="its processor: a hub id or folder; '' = the model's own")
    p.add_argument("--embed_model", default="", help="CLIP whose text tower embeds prompts for diversity; '' = the reward model")
    p.add_argument("--quality", default="Qwen/Qwen2.5-0.5B-Instruct", help="causal LM (hub id or folder) rating prompts; 'none' = off")
    p.add_argument("--batch_size", type=int, default=32, help="images (or prompts, to embed) per CLIP forward")
    p.add_argument("--quality_batch_size", type=int, default=32, help="prompts per LM forward pass")
    p.add_argument("--cache_dir", default="", help="score caches; '' = fifa_cache/ next to --out")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 on CUDA, fp32 on the CPU; bf16: CLIP and the LM held in bf16 (also on the CPU); fp32")
    p.add_argument("--dtype", help=argparse.SUPPRESS,  # the old flag: one clear line, not "unrecognized arguments"
                   type=lambda _: fail("--dtype is gone: use --precision auto|fp32|bf16 (auto: bf16 on CUDA, fp32 on CPU)"))
    args = p.parse_args(argv)
    if args.k < 1 or args.knn < 1 or args.max_per_prompt < 0 or args.rho_floor <= 0:
        fail("need --k >= 1, --knn >= 1, --max_per_prompt >= 0 and --rho_floor > 0")
    if args.margin_source == "both" and args.margin == "absolute":
        fail("--margin_source both needs --margin signed (absolute relabels by one judge, proxy or votes)")
    return args


def read_pairs(data, out):
    """Every pair of --data, its small columns only (images are read chunk by chunk when scored and when written):
    n pairs, their unique prompts and (N,) pid into them, the (N,) human winner human_w (0, 1; -1 neither) and
    tie, pair_chunks for score_pairs, data_key for the caches, and files, groups, fb for writing the subset."""
    fb = groups = None
    fmt = pairs_format(data)
    if fmt == "pickapic":  # streamed (its 335 GB are read chunk by chunk, twice)
        files = parquet_files(data)
        table, groups = read_pickapic(files, ["caption", "label_0", "label_1"], same_schema=True)
        if table.num_rows == 0:
            fail(f"no rows in {len(files)} parquet file(s) {files[:3]}")
        n = table.num_rows
        prompts, pid = index_prompts(table["caption"])
        l0 = table["label_0"].to_numpy().astype(np.float64)  # nulls become NaN: neither 1/0 nor 0/1
        l1 = table["label_1"].to_numpy().astype(np.float64)
        human_w = np.where((l0 == 1) & (l1 == 0), 0, np.where((l0 == 0) & (l1 == 1), 1, -1))
        tie = (l0 == 0.5) & (l1 == 0.5)
        pair_chunks, data_key = pickapic_pair_images(files, groups, CHUNK_ROWS), [file_identity(f) for f in files]
    else:  # HPDv2/v3, ImageRewardDB, Rapidata, JSONL: the reader drops and counts ties, missing files, no captions
        fb = load_pairs(data)  # then the files read (a hub id's parquet files, not its name) key the caches with the pairs
        check_pairs_out(fb, out)  # before any scoring: the subset must be writable where --out asks
        files = (parquet_files(data) if fmt == "rapidata" else imagerewarddb_files(data) if fmt == "imagerewarddb"
                 else [hpdv2_file(data) or data])
        n, prompts, pid = len(fb), list(fb.captions), fb.caption_idx.copy()
        human_w, tie = np.zeros(n, np.int64), np.zeros(n, bool)  # image 0 of a pair is its winner
        pair_chunks, data_key = feedback_pair_images(fb, CHUNK_ROWS), [[file_identity(f) for f in files], pairs_identity(fb)]
        print(f"read {fb.summary('pairs')}")
    if os.path.realpath(out) in {os.path.realpath(f) for f in files}:
        fail(f"--out {out} is one of the input files")
    return SimpleNamespace(streamed=fb is None, files=files, groups=groups, fb=fb, n=n, prompts=prompts, pid=pid,
                           human_w=human_w, tie=tie, pair_chunks=pair_chunks, data_key=data_key)


def usable_pairs(d, data):
    """The pairs worth scoring (a human winner and a caption), what was dropped, and the prompts of the usable
    pairs only: returns (N,) bool need, (N,) pid renumbered 0..U-1 (-1 for the others), their U prompts, stats."""
    blank = np.array([not s.strip() for s in d.prompts], bool)[d.pid]
    need = (d.human_w >= 0) & ~blank
    used = np.unique(d.pid[need])
    remap = np.full(len(d.prompts), -1)
    remap[used] = np.arange(len(used))
    pid, prompts = remap[d.pid], [d.prompts[i] for i in used]
    if not need.any():
        fail(f"no usable pair in {data}: all {d.n:,} are ties, unlabelled or caption-less")
    stats = dict(pairs_in=d.n, ties=int(d.tie.sum()), other_labels=int((~d.tie & (d.human_w < 0)).sum()),
                 no_caption=int((blank & (d.human_w >= 0)).sum()))
    if not d.streamed:  # the pairs the reader dropped, by reason (ImageRewardDB's "image ..." skips are images)
        skipped = [(k, v) for k, v in d.fb.skipped.items() if not k.startswith("image ")]
        stats["ties"] = sum(v for k, v in skipped if k.startswith("tie"))
        stats["pairs_in"] = d.n + sum(v for _, v in skipped)
        stats["other_labels"] = stats["pairs_in"] - d.n - stats["ties"]
    return need, pid, prompts, stats


def write_output(d, out, keep, columns, swap, rewards):
    """The kept pairs with the fifa_* columns. In pairs the winner is image 0: a pair the proxy relabels swaps
    its images, and their rewards with them."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if d.streamed:
        write_pickapic_subset(d.files, d.groups, out, keep, columns, swap, batch_rows=CHUNK_ROWS)
    else:
        d.fb.winner, d.fb.loser = np.where(swap, d.fb.loser, d.fb.winner), np.where(swap, d.fb.winner, d.fb.loser)
        columns["fifa_reward_0"] = np.where(swap, rewards[:, 1], rewards[:, 0])
        columns["fifa_reward_1"] = np.where(swap, rewards[:, 0], rewards[:, 1])
        write_pairs(d.fb, np.flatnonzero(keep), out, columns)


def print_summary(args, stats, d, cache, eligible, kept, pid, margin, q_pair, d_pair):
    """What was dropped, scored and kept, with counts, and how the three scores of the kept pairs compare to all."""
    def describe(name, every, kept):
        fmt = lambda x: " ".join(f"{v:8.3f}" for v in (x.mean(), x.std(), x.min(), np.median(x), x.max()))
        print(f"{name:<24} all  {fmt(every)}\n{'':<24} kept {fmt(kept)}")

    human, judge = args.margin_source == "human", "the voters' majority" if args.margin_source == "human" else "the proxy"
    votes = f"no vote counts        {stats['no_votes']:>10,}\n" if args.margin_source != "proxy" else ""
    print(f"pairs in              {stats['pairs_in']:>10,}\n"
          f"ties dropped          {stats['ties']:>10,}\n"
          f"other labels dropped  {stats['other_labels']:>10,}  ({'neither 1/0 nor 0/1' if d.streamed else 'the reasons above'})\n"
          f"no caption dropped    {stats['no_caption']:>10,}\n"
          f"corrupt image pairs   {stats['corrupt']:>10,}  "
          f"({'not checked: no image opened' if human else 'skipped: an image missing or not decodable'})\n{votes}"
          f"eligible              {int(eligible.sum()):>10,}  over {len(np.unique(pid[eligible])):,} unique prompts; "
          f"{judge} agrees with the {'' if human else 'human '}label on {stats['proxy_agrees']:.1%}\n"
          f"over the cap          {stats['capped']:>10,}  (--max_per_prompt {args.max_per_prompt})\n"
          f"kept                  {len(kept):>10,}  over {stats['unique_prompts_kept']:,} unique prompts, "
          f"{stats['relabelled']:,} relabelled by {judge} -> {args.out}\n"
          f"scored now: {stats['pairs_scored']:,} pairs, {stats['prompts_rated']:,} prompts rated, "
          f"{stats['prompts_embedded']:,} prompts embedded (the rest from {cache})")
    print(f"{'(over pairs)':<24}      {'mean':>8} {'std':>8} {'min':>8} {'median':>8} {'max':>8}")
    describe(f"margin ({args.margin}, {args.margin_source})", margin[eligible], margin[kept])
    if args.quality != "none":
        describe("quality (0-10)", q_pair[eligible], q_pair[kept])
    if d_pair is not None:
        describe(f"diversity (log rho_{args.knn})", d_pair[eligible], d_pair[kept])


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    # the precision rule of every script (auto: bf16 on CUDA, fp32 on the CPU); here, the dtype CLIP and the LM
    # are held in: they only score, and bf16 is Qwen2.5's own dtype (fp16 can overflow in its activations)
    dtype = torch.bfloat16 if resolve_precision(args.precision, device.startswith("cuda")) == "bf16" else torch.float32
    cache = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "fifa_cache")

    # --- data: the small columns of every pair; the pairs worth scoring and their unique prompts
    d = read_pairs(args.data, args.out)
    os.makedirs(cache, exist_ok=True)  # not before: a wrong --data leaves no empty cache folder behind
    need, pid, prompts, stats = usable_pairs(d, args.data)
    print(f"{d.n:,} pairs in {len(d.files)} file(s), {len(prompts):,} unique prompts with a usable pair")
    use_proxy, votes = args.margin_source != "human", getattr(d.fb, "vote_share", None)  # (N,) or None: no counts
    if args.margin_source != "proxy" and (votes is None or np.isnan(votes[need]).all()):  # before any model loads
        why = "Pick-a-Pic has one binary label a pair" if d.streamed else "no usable pair has any"
        fail(f"--margin_source {args.margin_source}: {args.data} has no vote counts ({why}); use --margin_source proxy")
    stats["no_votes"] = int((need & np.isnan(votes)).sum()) if votes is not None else 0

    # --- CLIP, loaded on first use (a fully cached rerun loads no model at all), and its text embeddings
    @functools.lru_cache(maxsize=None)
    def clip(name, processor):
        return load_clip(name, processor or None, device=device, dtype=dtype)

    def text(name, processor):  # (U, d) embeddings of the prompts, cached per data + model
        key = short_hash("text", d.data_key, model_identity(name), model_identity(processor), str(dtype))
        return text_embeddings(prompts, lambda: clip(name, processor), os.path.join(cache, f"text-{key}"),
                               args.batch_size)

    # --- margin: the proxy reward of both images of every usable pair (cached per chunk), and/or the votes
    reward = (args.reward_model, args.reward_processor)
    reward_text, embedded = None, 0
    if is_function(args.reward_model):  # your own reward (the toy world's red user): no text tower
        if args.gamma and not args.embed_model:
            fail(f"--reward_model {args.reward_model} has no text tower for the diversity term: pass --embed_model "
                 f"(a CLIP) or --gamma 0")
        fn = load_function(args.reward_model) if use_proxy else None  # a wrong name stops here, not later
        load_reward = lambda: function_reward(fn, prompts)
    elif use_proxy or (args.gamma and not args.embed_model):  # the CLIP's text tower: its reward, or the embedder
        reward_text, embedded = text(*reward)
        load_reward = lambda: clip_reward(*clip(*reward), reward_text, args.batch_size)
    if use_proxy:
        key = short_hash("reward", d.data_key, *map(model_identity, reward), str(dtype))
        rewards, stats["pairs_scored"] = score_pairs(d.pair_chunks, need, pid, load_reward, os.path.join(cache, f"reward-{key}"))
    else:  # the votes as the images' rewards on the Bradley-Terry scale: winner (image 0) logit p~, loser 0
        rewards, stats["pairs_scored"] = np.stack([human_margin(votes), np.zeros(d.n)], 1).astype(np.float32), 0
    missing = need & np.isnan(rewards).any(1)  # proxy: a corrupt image; human: no vote counts
    eligible, stats["corrupt"] = need & ~missing, int(missing.sum()) if use_proxy else 0
    margin, judge_w, swap = preference_margin(rewards, d.human_w, eligible, args.margin)
    if args.margin_source == "both":
        margin = combined_margin(margin, human_margin(votes), eligible)

    # --- quality and diversity, once per unique prompt
    quality = np.full(len(prompts), np.nan, np.float32)
    stats["prompts_rated"] = 0
    if args.quality != "none":
        qcache = os.path.join(cache, "quality-" + short_hash(model_identity(args.quality), QUALITY_PROMPT, str(dtype)))
        quality, stats["prompts_rated"] = rate_prompts(prompts, args.quality, qcache, device, dtype, args.quality_batch_size)
    embedder = (args.embed_model, "") if args.embed_model else reward
    emb, more = text(*embedder) if args.embed_model else (reward_text, 0)
    stats["prompts_embedded"] = embedded + more
    if emb is None:  # a reward function with --gamma 0: no text embeddings, no diversity term
        diversity = np.full(len(prompts), np.nan, np.float32)
    else:  # cached too: at Pick-a-Pic scale the k-NN takes about a minute, and reruns only change alpha/gamma/k
        path = os.path.join(cache, "diversity-" + short_hash(d.data_key, *map(model_identity, embedder), str(dtype),
                                                               args.knn, args.rho_floor) + ".safetensors")
        if not os.path.exists(path):
            save_safetensors({"log_rho": torch.from_numpy(knn_log_distance(emb, args.knn, args.rho_floor))}, path)
        diversity = load_file(path)["log_rho"].numpy()

    # --- select and write
    alpha = args.alpha if args.quality != "none" else 0.0
    kept, score, stats["capped"] = select(margin, eligible, pid, quality, diversity, args.k, alpha,
                                          args.gamma, args.max_per_prompt)
    keep, rank = np.zeros(d.n, bool), np.full(d.n, -1)
    keep[kept], rank[kept] = True, np.arange(len(kept))
    q_pair, d_pair = quality[pid], diversity[pid]  # index -1 (no usable pair) is never kept
    columns = {"fifa_reward_0": rewards[:, 0], "fifa_reward_1": rewards[:, 1], "fifa_margin": margin.astype(np.float32),
               "fifa_quality": q_pair, "fifa_diversity": d_pair, "fifa_score": score.astype(np.float32),
               "fifa_rank": rank, "fifa_relabelled": swap}
    if votes is not None:  # the share of the votes for the written winner (a relabelled pair's is 1 - share)
        columns["fifa_vote_share"] = np.where(swap, 1 - votes, votes)
    write_output(d, args.out, keep, columns, swap, rewards)

    # --- summary
    stats.update(kept=len(kept), unique_prompts=len(prompts), unique_prompts_kept=len(np.unique(pid[kept])),
                 relabelled=int(swap[kept].sum()), proxy_agrees=float((judge_w == d.human_w)[eligible].mean()))
    print_summary(args, stats, d, cache, eligible, kept, pid, margin, q_pair, d_pair if emb is not None else None)
    return stats


if __name__ == "__main__":
    main()
