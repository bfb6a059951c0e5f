"""FiFA (Yang et al., ICLR 2025): keep the K most informative preference pairs before Diffusion-DPO.

    python filter_fifa.py --data PICKAPIC_PARQUET --out SUBSET.parquet --k 5000 [--alpha A --gamma G ...]
    python filter_fifa.py --data HPDv2/ --out SUBSET.parquet (or SUBSET.jsonl) --k 5000

FiFA maximises over subsets S of K pairs: the sum of preference margins + alpha * the sum of prompt
qualities + gamma * the entropy of S's prompt embeddings. Estimated once over the whole set
(Kozachenko-Leonenko: H ~ d/N sum log rho_k + const), the objective is additive and S is the top K of

    s_i = m_i + alpha * q(c_i) + gamma * log rho_k(c_i)                          (Yang et al., ICLR 2025)

  m_i    R(c_i, x_w) - R(c_i, x_l), R a proxy reward (PickScore: logit_scale.exp() * cos(image, text))
  q(c)   a small instruct LLM's expected 0-10 rating of the prompt, read from the next-token
         probabilities of the digits (one forward pass, no sampling)
  rho_k  distance from c's normalised text embedding to its k-th nearest OTHER unique prompt

Stages: read the small columns; score both images of every pair (cached in chunks, resumable); rate
and embed each unique prompt once (cached); select (seconds at Pick-a-Pic scale, see bench_fifa.py);
write the kept rows, input schema plus fifa_* columns, which train_dpo.py reads as it reads Pick-a-Pic.
Pick-a-Pic parquet is streamed (its 335 GB are read chunk by chunk, twice); any other source that
public_data.load_pairs reads (HPDv2, a JSONL of pairs) is indexed by it, its images are scored through
data.read_images, and the kept pairs are written as Pick-a-Pic-schema parquet (JPEG bytes embedded, the
winner as jpg_0) or, for --out *.jsonl, as a JSONL of pairs (public_data.write_pairs).
Caches are keyed by the data files and the model: a rerun with other --alpha/--gamma/--k scores
nothing again, and a stale cache is never read.

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
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from files import atomic_path, fail, one_line, save_safetensors
from data import decode, pickapic_batches, read_images
from public_data import hpdv2_file, load_pairs, pairs_format, pairs_identity, parquet_files, read_pickapic, write_pairs
from scorers import PICKSCORE_MODEL, PICKSCORE_PROCESSOR, clip_image_embeddings, clip_text_embeddings, is_function, load_clip, load_function

CHUNK_ROWS = 1024  # pairs (or prompts) per cache file: the most scoring work an interruption can lose
QUALITY_PROMPT = ("Rate this text-to-image prompt from 0 to {top}. Rate high a clear prompt with concrete "
                  "visual detail, low an unclear, meaningless or harmful one.\nPrompt: {prompt}\n"
                  "Answer with a single number.")


def short_hash(*parts):
    """A short hash of anything JSON-serialisable: names cache files after what produced them."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def file_identity(path):
    """Path, size and modification time: a changed or replaced file gets a new cache key."""
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def model_identity(name):
    """A local model folder is identified by its files (retrained in place = new key); a hub id by its name."""
    if not os.path.isdir(name):
        return name
    return [file_identity(os.path.join(name, f)) for f in sorted(os.listdir(name))]


def read_chunks(folder, key, n):
    """What a run, maybe killed, left in a chunked cache: ({first row: array}, (n,) bool rows they cover).

    One safetensors file per chunk, rows-<first row>.safetensors, written whole by save_chunk (a killed
    write leaves a .tmp file that is never read), so a rerun computes only the rows no file covers."""
    os.makedirs(folder, exist_ok=True)
    cached = {int(f[5:-12]): load_file(os.path.join(folder, f))[key].numpy()
              for f in os.listdir(folder) if f.startswith("rows-") and f.endswith(".safetensors")}
    done = np.zeros(n, bool)
    for start, values in cached.items():
        done[start:start + len(values)] = True
    return cached, done


def save_chunk(folder, key, start, values):
    path = os.path.join(folder, f"rows-{start:010d}.safetensors")
    save_safetensors({key: torch.from_numpy(np.ascontiguousarray(values))}, path)  # whole or absent


# ------------------------------------------------------------------------------------------------
# data: Pick-a-Pic v2 parquet (schema: README, "Data formats"), files found by public_data.parquet_files

def read_index(files):
    """The small columns of every pair in file order (public_data.read_pickapic), and the row-group sizes of each file."""
    table, groups = read_pickapic(files, ["caption", "label_0", "label_1"], same_schema=True)
    if table.num_rows == 0:
        fail(f"no rows in {len(files)} parquet file(s) {files[:3]}")
    return table, groups


def index_prompts(captions):
    """(unique prompts in order of first appearance, (N,) int64 index of each pair's prompt)."""
    enc = captions.combine_chunks().fill_null("").dictionary_encode()
    return enc.dictionary.to_pylist(), enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def chunks(files, groups, wanted, columns=None):
    """(first row, record batch) of each chunk of at most CHUNK_ROWS rows that holds a wanted row."""
    return pickapic_batches(files, groups, wanted, columns, batch_rows=CHUNK_ROWS)


def parquet_pairs(files, groups):
    """Pick-a-Pic parquet for score_pairs: wanted -> (first row, rows, images) per chunk, images(rows) decoding
    the (jpg_0, jpg_1) of those rows of the chunk (JPEG bytes or an image struct)."""
    def pair_chunks(wanted):
        for start, batch in chunks(files, groups, wanted, columns=["jpg_0", "jpg_1"]):
            jpg0, jpg1 = batch.column("jpg_0").to_pylist(), batch.column("jpg_1").to_pylist()
            yield start, batch.num_rows, lambda rows, a=jpg0, b=jpg1: [(decode(a[r]), decode(b[r])) for r in rows]
    return pair_chunks


def feedback_pairs(fb):
    """Pairs that public_data.load_pairs read, for score_pairs: chunks of CHUNK_ROWS pairs, (winner, loser) images
    read through data.read_images; image 0 of a pair is its winner."""
    def images(idx):
        want = sorted(set(fb.winner[idx].tolist()) | set(fb.loser[idx].tolist()))
        got = dict(zip(want, read_images(fb, want)))
        return [(got[w], got[l]) for w, l in zip(fb.winner[idx], fb.loser[idx])]

    def pair_chunks(wanted):
        for start in range(0, len(fb), CHUNK_ROWS):
            size = min(CHUNK_ROWS, len(fb) - start)
            if wanted[start:start + size].any():
                yield start, size, lambda rows, s=start: images(s + np.asarray(rows, np.int64))
    return pair_chunks


# ------------------------------------------------------------------------------------------------
# margin: the proxy reward of both images of every pair

def score_pairs(pair_chunks, need, pid, load_reward, cache):
    """R(c, x_0), R(c, x_1) of every pair in `need`: (N, 2) float32, NaN where unscored or corrupt.

    pair_chunks(wanted) -> (first row, rows, images) per chunk (parquet_pairs, feedback_pairs).
    load_reward() -> reward(images, pids): the proxy, loaded on first use (clip_reward, function_reward).
    Cached in chunks of at most CHUNK_ROWS pairs (read_chunks): a killed run resumes at the first
    missing chunk. Returns (scores, pairs scored now).
    """
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
    60,000 prompts through CLIP-H's text tower, which a killed run should not redo. Returns (emb, embedded now).
    """
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
        values = torch.arange(top + 1, dtype=torch.float32) * 10 / top  # the 0-10 scale
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
                probs = logits.softmax(-1)
                p_v = torch.stack([probs[:, c].sum(-1) for c in cands], -1)  # (B, top+1)
                mass += p_v.sum(-1).tolist()
                q += (p_v / p_v.sum(-1, keepdim=True) @ values).tolist()  # expected rating
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
# diversity and selection (pure; bench_fifa.py times them at Pick-a-Pic scale)

def knn_log_distance(emb, k=5, floor=0.01, chunk=2048):
    """(U,) log rho_k: log distance from each row of emb (U, d), L2-normalised, to its k-th nearest
    OTHER row, floored. Rows are unique prompts, so excluding a row's self excludes exact duplicates.

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
    x = np.asarray(x, np.float64)
    std = x.std()
    return (x - x.mean()) / std if std > 0 else np.zeros_like(x)


def select(margin, eligible, pid, quality, diversity, k, alpha, gamma, max_per_prompt):
    """Top-k eligible pairs by s = z(m) + alpha z(q) + gamma z(d), at most max_per_prompt per prompt.

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
# output

def write_subset(files, groups, out, keep, columns, swap):
    """Stream the input again and write the kept rows, in input order, with `columns` appended.

    keep, swap: (N,) bool; columns: name -> (N,) array. Swapped rows get label_0/label_1 exchanged
    (and best_image_uid, when present, set to the new winner). Written to a temp file, then renamed."""
    with atomic_path(out) as tmp:
        writer = None
        for start, batch in chunks(files, groups, keep):
            sel = np.flatnonzero(keep[start:start + batch.num_rows])
            t, idx = pa.Table.from_batches([batch]).take(sel), start + sel
            flip = pa.array(swap[idx])
            l0, l1 = pc.if_else(flip, t["label_1"], t["label_0"]), pc.if_else(flip, t["label_0"], t["label_1"])
            t = t.set_column(t.schema.get_field_index("label_0"), "label_0", l0)
            t = t.set_column(t.schema.get_field_index("label_1"), "label_1", l1)
            if {"best_image_uid", "image_0_uid", "image_1_uid"} <= set(t.column_names):
                best = pc.if_else(pc.greater(l0, l1), t["image_0_uid"], t["image_1_uid"])
                t = t.set_column(t.schema.get_field_index("best_image_uid"), "best_image_uid",
                                 pc.if_else(flip, best, t["best_image_uid"]))
            for name, values in columns.items():
                t = t.append_column(name, pa.array(values[idx]))
            writer = writer or pq.ParquetWriter(tmp, t.schema)
            writer.write_table(t)
        writer.close()


def describe(name, every, kept):
    fmt = lambda x: " ".join(f"{v:8.3f}" for v in (x.mean(), x.std(), x.min(), np.median(x), x.max()))
    print(f"{name:<24} all  {fmt(every)}\n{'':<24} kept {fmt(kept)}")


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="FiFA: keep the K most informative preference pairs for Diffusion-DPO.")
    p.add_argument("--data", required=True,
                   help="pairs: Pick-a-Pic v2 parquet (a file, a folder searched recursively, a glob or a hub dataset id, "
                        "its train split; ID:SPLIT for another), or any source train_dpo.py reads (HPDv2, a JSONL of pairs)")
    p.add_argument("--out", required=True, help="output: the kept rows with fifa_* columns; Pick-a-Pic input keeps its "
                                                "columns; other input: .parquet in the Pick-a-Pic schema or .jsonl pairs")
    p.add_argument("--k", type=int, default=5000, help="pairs to keep (paper: ~5,000, under 0.5%% of Pick-a-Pic v2)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of prompt quality, in std per std of margin; 0 = off")
    p.add_argument("--gamma", type=float, default=0.5, help="weight of prompt diversity, in std per std of margin; 0 = off")
    p.add_argument("--margin", choices=["signed", "absolute"], default="signed",
                   help="signed: R(w) - R(l), human labels kept; absolute: |R(0) - R(1)|, pairs relabelled by the proxy")
    p.add_argument("--max_per_prompt", type=int, default=2, help="at most this many kept pairs per prompt; 0 = no cap")
    p.add_argument("--knn", type=int, default=5, help="k of the k-th nearest neighbour distance rho_k (>= 1)")
    p.add_argument("--rho_floor", type=float, default=0.01, help="floor of rho_k, a distance between unit vectors (0-2)")
    p.add_argument("--reward_model", default=PICKSCORE_MODEL,
                   help="proxy reward: a CLIP hub id or folder, or your own function module:function, f(images, prompts) "
                        "-> one number per image (the toy world: toy.scorers:redness; diversity then needs --embed_model "
                        "or --gamma 0)")
    p.add_argument("--reward_processor", default=PICKSCORE_PROCESSOR,
                   help="its processor: a hub id or folder; '' = the model's own")
    p.add_argument("--embed_model", default="", help="CLIP whose text tower embeds prompts for diversity; '' = the reward model")
    p.add_argument("--quality", default="Qwen/Qwen2.5-0.5B-Instruct", help="causal LM (hub id or folder) rating prompts; 'none' = off")
    p.add_argument("--batch_size", type=int, default=32, help="images (or prompts, to embed) per CLIP forward")
    p.add_argument("--quality_batch_size", type=int, default=32, help="prompts per LM forward pass")
    p.add_argument("--cache_dir", default="", help="score caches; '' = fifa_cache/ next to --out")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="weights; auto = float32 on cpu; on cuda float16 for CLIP (scores move ~0.01) and bfloat16 for the LM")
    args = p.parse_args(argv)
    if args.k < 1 or args.knn < 1 or args.max_per_prompt < 0 or args.rho_floor <= 0:
        fail("need --k >= 1, --knn >= 1, --max_per_prompt >= 0 and --rho_floor > 0")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.float16 if device.startswith("cuda") else torch.float32)
    cache = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "fifa_cache")

    # --- data: the small columns only; images are read chunk by chunk when scored and when written
    streamed = pairs_format(args.data) == "pickapic"  # Pick-a-Pic parquet is streamed; any other source is loaded
    if streamed:
        files = parquet_files(args.data)
        table, groups = read_index(files)
        n = table.num_rows
        prompts, pid = index_prompts(table["caption"])
        l0 = table["label_0"].to_numpy().astype(np.float64)  # nulls become NaN: neither 1/0 nor 0/1
        l1 = table["label_1"].to_numpy().astype(np.float64)
        human_w = np.where((l0 == 1) & (l1 == 0), 0, np.where((l0 == 0) & (l1 == 1), 1, -1))  # human winner
        tie = (l0 == 0.5) & (l1 == 0.5)
        pair_chunks, data_key = parquet_pairs(files, groups), [file_identity(f) for f in files]
    else:  # HPDv2, a JSONL of pairs: the reader drops and counts ties, missing files, caption-less entries
        if os.path.splitext(args.out)[1].lower() not in (".parquet", ".jsonl"):
            fail(f"--out {args.out}: write the subset of {args.data} as .parquet (Pick-a-Pic schema) or .jsonl (pairs)")
        fb = load_pairs(args.data)
        files = [hpdv2_file(args.data) or args.data]  # the annotation file: with the pairs it keys the caches
        n, prompts, pid = len(fb), list(fb.captions), fb.caption_idx.copy()
        human_w, tie = np.zeros(n, np.int64), np.zeros(n, bool)  # image 0 of a pair is its winner
        pair_chunks, data_key = feedback_pairs(fb), [file_identity(files[0]), pairs_identity(fb)]
        print(f"read {fb.summary('pairs')}")
    if os.path.realpath(args.out) in {os.path.realpath(f) for f in files}:
        fail(f"--out {args.out} is one of the input files")
    os.makedirs(cache, exist_ok=True)  # not before: a wrong --data leaves no empty cache folder behind
    blank = np.array([not s.strip() for s in prompts], bool)[pid]
    need = (human_w >= 0) & ~blank  # pairs worth scoring
    # keep the prompts of those pairs only, renumbered 0..U-1 (-1 for the others)
    used = np.unique(pid[need])
    remap = np.full(len(prompts), -1)
    remap[used] = np.arange(len(used))
    pid, prompts = remap[pid], [prompts[i] for i in used]
    if not need.any():
        fail(f"no usable pair in {args.data}: all {n:,} are ties, unlabelled or caption-less")
    stats = dict(pairs_in=n, ties=int(tie.sum()), other_labels=int((~tie & (human_w < 0)).sum()),
                 no_caption=int((blank & (human_w >= 0)).sum()))
    if not streamed:  # what the reader dropped, by its reasons (it read no pair it then skipped as a pair)
        stats["ties"] = sum(v for k, v in fb.skipped.items() if k.startswith("tie"))
        stats["other_labels"] = sum(fb.skipped.values()) - stats["ties"]
        stats["pairs_in"] = n + sum(fb.skipped.values())
    print(f"{n:,} pairs in {len(files)} file(s), {len(prompts):,} unique prompts with a usable pair")

    # --- margin: proxy reward of both images (cached per chunk), text embeddings (cached per data + model)
    @functools.lru_cache(maxsize=None)
    def clip(name, processor):  # loaded on first use: a fully cached rerun loads no model at all
        return load_clip(name, processor or None, device=device, dtype=dtype)

    def text(name, processor):
        key = short_hash("text", data_key, model_identity(name), model_identity(processor), str(dtype))
        return text_embeddings(prompts, lambda: clip(name, processor), os.path.join(cache, f"text-{key}"),
                               args.batch_size)

    reward = (args.reward_model, args.reward_processor)
    if is_function(args.reward_model):  # your own reward (the toy world's red user): no text tower
        if args.gamma and not args.embed_model:
            fail(f"--reward_model {args.reward_model} has no text tower for the diversity term: pass --embed_model "
                 f"(a CLIP) or --gamma 0")
        reward_text, embedded, fn = None, 0, load_function(args.reward_model)  # a wrong name stops here, not later
        load_reward = lambda: function_reward(fn, prompts)
    else:
        reward_text, embedded = text(*reward)
        load_reward = lambda: clip_reward(*clip(*reward), reward_text, args.batch_size)
    key = short_hash("reward", data_key, *map(model_identity, reward), str(dtype))
    rewards, stats["pairs_scored"] = score_pairs(pair_chunks, need, pid, load_reward,
                                                 os.path.join(cache, f"reward-{key}"))
    corrupt = need & np.isnan(rewards).any(1)
    eligible = need & ~corrupt
    stats["corrupt"] = int(corrupt.sum())
    proxy_w = np.where(rewards[:, 1] > rewards[:, 0], 1, 0)
    r_w = np.where(human_w == 1, rewards[:, 1], rewards[:, 0])
    r_l = np.where(human_w == 1, rewards[:, 0], rewards[:, 1])
    margin = r_w - r_l if args.margin == "signed" else np.abs(r_w - r_l)
    swap = eligible & (proxy_w != human_w) & (args.margin == "absolute")

    # --- quality and diversity, once per unique prompt
    quality = np.full(len(prompts), np.nan, np.float32)
    stats["prompts_rated"] = 0
    if args.quality != "none":
        # bfloat16 on cuda: Qwen2.5's own dtype (float16 can overflow in its activations)
        lm_dtype = torch.bfloat16 if dtype == torch.float16 and args.dtype == "auto" else dtype
        qcache = os.path.join(cache, "quality-" + short_hash(model_identity(args.quality), QUALITY_PROMPT, str(lm_dtype)))
        quality, stats["prompts_rated"] = rate_prompts(prompts, args.quality, qcache, device, lm_dtype, args.quality_batch_size)
    embedder = (args.embed_model, "") if args.embed_model else reward
    emb, more = text(*embedder) if args.embed_model else (reward_text, 0)
    stats["prompts_embedded"] = embedded + more
    if emb is None:  # a reward function with --gamma 0: no text embeddings, no diversity term
        diversity = np.full(len(prompts), np.nan, np.float32)
    else:  # cached too: at Pick-a-Pic scale the k-NN takes about a minute, and reruns only change alpha/gamma/k
        path = os.path.join(cache, "diversity-" + short_hash(data_key, *map(model_identity, embedder), str(dtype),
                                                               args.knn, args.rho_floor) + ".safetensors")
        if not os.path.exists(path):
            save_safetensors({"log_rho": torch.from_numpy(knn_log_distance(emb, args.knn, args.rho_floor))}, path)
        diversity = load_file(path)["log_rho"].numpy()

    # --- select and write
    alpha = args.alpha if args.quality != "none" else 0.0
    kept, score, stats["capped"] = select(margin, eligible, pid, quality, diversity, args.k, alpha,
                                          args.gamma, args.max_per_prompt)
    keep, rank = np.zeros(n, bool), np.full(n, -1)
    keep[kept], rank[kept] = True, np.arange(len(kept))
    q_pair, d_pair = quality[pid], diversity[pid]  # index -1 (no usable pair) is never kept
    columns = {"fifa_reward_0": rewards[:, 0], "fifa_reward_1": rewards[:, 1], "fifa_margin": margin.astype(np.float32),
               "fifa_quality": q_pair, "fifa_diversity": d_pair, "fifa_score": score.astype(np.float32),
               "fifa_rank": rank, "fifa_relabelled": swap}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if streamed:
        write_subset(files, groups, args.out, keep, columns, swap)
    else:  # the winner is image 0: a pair the proxy relabels swaps its images, and their rewards with them
        fb.winner, fb.loser = np.where(swap, fb.loser, fb.winner), np.where(swap, fb.winner, fb.loser)
        columns["fifa_reward_0"] = np.where(swap, rewards[:, 1], rewards[:, 0])
        columns["fifa_reward_1"] = np.where(swap, rewards[:, 0], rewards[:, 1])
        write_pairs(fb, np.flatnonzero(keep), args.out, columns)

    # --- summary
    stats.update(kept=len(kept), unique_prompts=len(prompts), unique_prompts_kept=len(np.unique(pid[kept])),
                 relabelled=int(swap[kept].sum()), proxy_agrees=float((proxy_w == human_w)[eligible].mean()))
    print(f"pairs in              {stats['pairs_in']:>10,}\n"
          f"ties dropped          {stats['ties']:>10,}\n"
          f"other labels dropped  {stats['other_labels']:>10,}  ({'neither 1/0 nor 0/1' if streamed else 'the reasons above'})\n"
          f"no caption dropped    {stats['no_caption']:>10,}\n"
          f"corrupt image pairs   {stats['corrupt']:>10,}  (skipped: an image missing or not decodable)\n"
          f"eligible              {int(eligible.sum()):>10,}  over {len(np.unique(pid[eligible])):,} unique prompts; "
          f"the proxy agrees with the human label on {stats['proxy_agrees']:.1%}\n"
          f"over the cap          {stats['capped']:>10,}  (--max_per_prompt {args.max_per_prompt})\n"
          f"kept                  {len(kept):>10,}  over {stats['unique_prompts_kept']:,} unique prompts, "
          f"{stats['relabelled']:,} relabelled by the proxy -> {args.out}\n"
          f"scored now: {stats['pairs_scored']:,} pairs, {stats['prompts_rated']:,} prompts rated, "
          f"{stats['prompts_embedded']:,} prompts embedded (the rest from {cache})")
    print(f"{'(over pairs)':<24}      {'mean':>8} {'std':>8} {'min':>8} {'median':>8} {'max':>8}")
    describe(f"margin ({args.margin})", margin[eligible], margin[kept])
    if args.quality != "none":
        describe("quality (0-10)", q_pair[eligible], q_pair[kept])
    if emb is not None:
        describe(f"diversity (log rho_{args.knn})", d_pair[eligible], d_pair[kept])
    return stats


if __name__ == "__main__":
    main()
