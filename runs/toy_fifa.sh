#!/usr/bin/env bash
# FiFA in the toy world: does Diffusion-DPO on a FiFA-selected subset reach the full-data result in fewer
# steps than DPO on a random subset of the same size?
#
#   bash runs/toy_fifa.sh            # needs the toy world: run `bash runs/toy.sh` first (or it stops)
#
# 1. pairs (runs/toy_fifa_pairs.py): each base sample the red user saw is shown again as two red-boosted
#    versions of random strength, labelled by a noisy user (Bradley-Terry): many pairs are near-ties with
#    coin-toss labels, as in Pick-a-Pic. A random subset of K pairs is drawn beside them;
# 2. FiFA (filter_fifa.py, unchanged) with the user's own reward as the proxy (--reward_model toy.scorers:redness),
#    no LLM (--quality none) and no diversity term (--gamma 0: the toy pipeline has no CLIP text tower
#    with the image tower FiFA's default uses, and the toy's captions are only 108 distinct strings);
# 3. the same DPO run (train_dpo.py) on all pairs, on FiFA's K and on the random K, a checkpoint every
#    $EVERY steps, all three side by side;
# 4. evaluate.py on the base and every checkpoint (same prompts and seeds), one table (runs/toy_table.py).
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

if [ ! -f "$BASE/toy_base.json" ] || [ ! -d "$FEEDBACK/kto/disliked" ]; then
    echo "no toy world in $BASE, $FEEDBACK: run bash runs/toy.sh first"; exit 1
fi
start=$SECONDS
rm -rf "$OUT"; mkdir -p "$OUT"

python -m runs.toy_fifa_pairs --feedback "$FEEDBACK" --out "$OUT/pairs.parquet" --random_k "$K" \
    --random_out "$OUT/random.parquet"
python filter_fifa.py --data "$OUT/pairs.parquet" --out "$OUT/fifa.parquet" --k "$K" --reward_model toy.scorers:redness \
    --quality none --gamma 0 --max_per_prompt 0 --cache_dir "$OUT/fifa_cache"

common="--pretrained $BASE --resolution 32 --global_batch 16 --micro_batch 16 --max_steps $STEPS --lr 1e-6
        --warmup_steps 20 --beta 5000 --val_every -1 --save_every $EVERY --keep_checkpoints 1000 --log_every 50
        --cache_dir $OUT/cache"
pids=()
for d in full fifa random; do
    data="$OUT/$d.parquet"; [ "$d" = full ] && data="$OUT/pairs.parquet"
    python train_dpo.py --data "$data" --out_dir "$OUT/$d" $common > "$OUT/$d.log" 2>&1 &
    pids+=($!)
done
wait ${pids[0]} && wait ${pids[1]} && wait ${pids[2]} || { echo "a DPO run failed: see $OUT/{full,fifa,random}.log"; exit 1; }

models=()
for step in $(seq "$EVERY" "$EVERY" "$STEPS"); do
    for d in full fifa random; do
        models+=(--model "${d}_$step=$OUT/$d/checkpoints/step_$(printf %07d "$step")")
    done
done
python evaluate.py --pretrained "$BASE" "${models[@]}" --prompts "$FEEDBACK/prompts.txt" --n "$SEEDS" --steps 20 \
    --guidance 5 --batch_size 72 --scorers toy.scorers:redness,toy.scorers:color_acc --grid_prompts 8 --out "$OUT/eval" > "$OUT/eval.log" 2>&1
echo
python -m runs.toy_table "$OUT/eval"
echo "time: $(( (SECONDS - start) / 60 )) min (load $(cut -d' ' -f1-3 /proc/loadavg))"
