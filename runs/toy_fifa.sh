#!/usr/bin/env bash
# FiFA in the toy world: does Diffusion-DPO on a FiFA-selected subset reach the full-data result in fewer
# steps than DPO on a random subset of the same size? And does FiFA with the margin the human votes give
# (--margin_source human) do as well as with the proxy reward's margin?
#
#   bash runs/toy_fifa.sh            # needs the toy world: run `bash runs/toy.sh` first (or it stops)
#
# 1. pairs (runs/toy_fifa_pairs.py): each base sample the red user saw is shown again as two red-boosted
#    versions of random strength, labelled by a noisy user (Bradley-Terry): many pairs are near-ties with
#    coin-toss labels, as in Pick-a-Pic. A random subset of K pairs is drawn beside them ($RUNS of them). The
#    same pairs with graded votes: $VOTERS people vote on each (the labeller among them) under the same
#    Bradley-Terry, written as JSONL pairs with chosen_votes/rejected_votes, the parquet's own JPEGs beside them
#    (the format a user's counted votes come in; the labels and the parquet are the same with or without votes);
# 2. FiFA (filter_fifa.py, unchanged) with the user's own reward as the proxy (--reward_model toy.scorers:redness),
#    no LLM (--quality none) and no diversity term (--gamma 0: the toy pipeline has no CLIP text tower
#    with the image tower FiFA's default uses, and the toy's captions are only 108 distinct strings); and FiFA
#    on the votes (--margin_source human: the log-odds of the vote share, no proxy loaded). Here the proxy is
#    the user's exact reward, as PickScore is not, so the votes can at best match it: this measures what a
#    handful of votes loses against the exact margin (with 9 voters many pairs are unanimous and tie);
# 3. the same DPO run (train_dpo.py) on all pairs, on FiFA's K, on FiFA-votes' K and on the random K, a
#    checkpoint every $EVERY steps; then the three K-pair methods again with training seeds 1..RUNS-1 (the
#    random method on another random K each time), their final models only;
# 4. evaluate.py on the base and every checkpoint (same prompts and seeds): the first table (runs/toy_table.py)
#    by step; the second at step $STEPS, each method's RUNS runs as mean (lowest to highest run), and the base
#    evaluated again with other seeds (the evaluation noise), as runs/toy.sh reports its table.
#
# Measured: see README.md, "FiFA data selection" (hardware, time, both tables).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

BASE=${BASE:-toy/data/base}
FEEDBACK=${FEEDBACK:-toy/data/feedback}
OUT=${OUT:-runs/out/toy_fifa}
K=${K:-128}            # pairs FiFA keeps (of 1024: 12.5%)
STEPS=${STEPS:-200}    # optimizer steps of each DPO run
EVERY=${EVERY:-50}     # checkpoint (and evaluation) interval
SEEDS=${SEEDS:-4}      # evaluation images per prompt and model
VOTERS=${VOTERS:-9}    # people voting on each pair for the human margin (9: filter_fifa's smoothing is half a vote a side)
RUNS=${RUNS:-3}        # training runs (seeds 0, 1, ...) of each K-pair method: their spread is the training noise
JOBS=${JOBS:-3}        # trainings side by side (one thread each)

if [ ! -f "$BASE/toy_base.json" ] || [ ! -d "$FEEDBACK/kto/disliked" ]; then
    echo "no toy world in $BASE, $FEEDBACK: run bash runs/toy.sh first"; exit 1
fi
start=$SECONDS
rm -rf "$OUT"; mkdir -p "$OUT"

python -m runs.toy_fifa_pairs --feedback "$FEEDBACK" --out "$OUT/pairs.parquet" --random_k "$K" \
    --random_out "$OUT/random.parquet" --random_draws "$RUNS" --voters "$VOTERS" --votes_out "$OUT/votes/pairs.jsonl"
python filter_fifa.py --data "$OUT/pairs.parquet" --out "$OUT/fifa.parquet" --k "$K" --reward_model toy.scorers:redness \
    --quality none --gamma 0 --max_per_prompt 0 --cache_dir "$OUT/fifa_cache"
python filter_fifa.py --data "$OUT/votes/pairs.jsonl" --out "$OUT/fifa_votes.parquet" --k "$K" --margin_source human \
    --quality none --gamma 0 --max_per_prompt 0 --cache_dir "$OUT/fifa_cache"

common="--pretrained $BASE --resolution 32 --global_batch 16 --micro_batch 16 --max_steps $STEPS --lr 1e-6
        --warmup_steps 20 --beta 5000 --val_every -1 --keep_checkpoints 1000 --log_every 50
        --cache_dir $OUT/cache"
train() {  # train NAME DATA ARGS...: in the background, at most JOBS at a time
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    local name=$1 data=$2; shift 2
    { python train_dpo.py --data "$data" --out_dir "$OUT/$name" $common "$@" > "$OUT/$name.log" 2>&1 || touch "$OUT/$name.failed"; } &
}
for d in full fifa fifa_votes random; do  # seed 0, a checkpoint every $EVERY steps
    data="$OUT/$d.parquet"; [ "$d" = full ] && data="$OUT/pairs.parquet"
    train "$d" "$data" --save_every "$EVERY"
done
for s in $(seq 1 $(( RUNS - 1 ))); do  # more seeds, the final model only
    train "fifa_s$s" "$OUT/fifa.parquet" --seed "$s" --save_every 0
    train "fifa_votes_s$s" "$OUT/fifa_votes.parquet" --seed "$s" --save_every 0
    train "random_s$s" "$OUT/random_$s.parquet" --seed "$s" --save_every 0
done
wait
if ls "$OUT"/*.failed > /dev/null 2>&1; then echo "a DPO run failed: see the .log beside $(ls "$OUT"/*.failed)"; exit 1; fi

models=()
for step in $(seq "$EVERY" "$EVERY" "$STEPS"); do
    for d in full fifa fifa_votes random; do
        models+=(--model "${d}_$step=$OUT/$d/checkpoints/step_$(printf %07d "$step")")
    done
done
runs=()
for s in $(seq 0 $(( RUNS - 1 ))); do
    for d in fifa fifa_votes random; do
        path="$OUT/${d}_s$s"; [ "$s" = 0 ] && path="$OUT/$d/checkpoints/step_$(printf %07d "$STEPS")"  # seed 0: above
        runs+=(--model "${d}_s$s=$path")
    done
done
eval="--prompts $FEEDBACK/prompts.txt --n $SEEDS --steps 20 --guidance 5 --batch_size 72
      --scorers toy.scorers:redness,toy.scorers:color_acc"
python evaluate.py --pretrained "$BASE" "${models[@]}" $eval --grid_prompts 8 --out "$OUT/eval" > "$OUT/eval.log" 2>&1 &
e1=$!
python evaluate.py --pretrained "$BASE" "${runs[@]}" $eval --out "$OUT/eval_runs" > "$OUT/eval_runs.log" 2>&1 &
e2=$!
python evaluate.py --pretrained "$BASE" $eval --seed 1000 --out "$OUT/eval_noise" > "$OUT/eval_noise.log" 2>&1 &
e3=$!
wait $e1 && wait $e2 && wait $e3 || { echo "evaluation failed: see $OUT/eval*.log"; exit 1; }
echo
python -m runs.toy_table "$OUT/eval"
echo
python -m runs.toy_table "$OUT/eval_runs" "$OUT/eval_noise"
echo "time: $(( (SECONDS - start) / 60 )) min (load $(cut -d' ' -f1-3 /proc/loadavg))"
