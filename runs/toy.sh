#!/usr/bin/env bash
# The toy world end to end on a CPU: the project's quick start, what nanoGPT's Shakespeare run is to nanoGPT.
#
#   bash runs/toy.sh
#
# 1. builds the toy world if it is missing: a tiny Stable-Diffusion-shaped model trained from scratch on
#    captioned colored shapes (toy/make_base.py), and the feedback of a synthetic user who likes red
#    (toy/red_user.py: a liked/disliked image folder and Pick-a-Pic-schema pairs);
# 2. fine-tunes the toy base on that feedback with the real trainers, unchanged: Diffusion-KTO on the
#    liked/disliked folder, Diffusion-DPO and SFT on the pairs;
# 3. evaluates the base and each result with evaluate.py (same prompts, seeds and sampler for all), and the
#    base a second time with other seeds (the evaluation noise), and prints one table (runs/toy_table.py).
#    Images, scores and grid.png (one row per prompt, one column per model) are in $OUT/eval.
#
# Settings: full fine-tunes of the 0.8M-parameter UNet, 200 steps, AdamW with 20 warm-up steps, beta 5000
# (the papers'), the papers' other defaults (KTO: 80% liked draws, sigmoid utility; DPO/SFT: 20% prompt
# dropout). Learning rates: KTO and SFT 3e-5, DPO 5e-7. Every method trades caption fidelity for redness as
# it moves (samples get noisier and drift off their caption's color); these rates stop where the color check
# is within a few points of the base. Batch: 16 pairs for DPO and SFT, 64 images for KTO. A KTO image gets
# its own noise, so its reward is a noisier signal than DPO's, where winner and loser share noise and
# timestep: measured (36 prompts x 8 seeds), four KTO runs (seeds) with 16 images a step ended between
# 0.0030 and 0.0102 of redness, three with 64 between 0.0069 and 0.0122, while DPO's three seeds ended within
# 0.0002 of each other (at 16 pairs and at 64 alike). Also measured on the way: DPO at 1e-6 for 200 steps
# doubles its redness at 77% color accuracy (base 86%); KTO at 1e-4 swings between checkpoints.
# Each method is trained RUNS times (seeds 0, 1, 2): the table gives the mean and the lowest and highest run.
#
# Measured: see README.md, "Quick start" (hardware, load, time of each stage, the table).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
# one thread per process, trainers side by side: faster on 2 cores than one process with 2 threads
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

BASE=${BASE:-toy/data/base}          # the toy base model (diffusers layout)
FEEDBACK=${FEEDBACK:-toy/data/feedback}  # the red user's feedback on it
OUT=${OUT:-runs/out/toy}             # results of this run (git-ignored)
STEPS=${STEPS:-200}                  # optimizer steps of each fine-tune
SEEDS=${SEEDS:-8}                    # evaluation images per prompt and model (36 prompts)
KTO_LR=${KTO_LR:-3e-5}; DPO_LR=${DPO_LR:-5e-7}; SFT_LR=${SFT_LR:-3e-5}  # see Settings above
RUNS=${RUNS:-3}                      # training runs (seeds) of each method: their spread is the training noise
JOBS=${JOBS:-2}                      # trainings side by side (one thread each)

declare -A took
stage() { took[$1]=$(( SECONDS - t0 )); t0=$SECONDS; echo "== $1 done in ${took[$1]}s"; }
t0=$SECONDS; start=$SECONDS

# --- 1. the toy world, if missing (toy_base.json is written last: its presence means the base is complete)
if [ ! -f "$BASE/toy_base.json" ]; then
    OMP_NUM_THREADS=2 python -m toy.make_base --out "$BASE" --threads 2 --quiet
fi
stage base
if [ ! -f "$FEEDBACK/dpo/train.parquet" ] || [ "$BASE/toy_base.json" -nt "$FEEDBACK/dpo/train.parquet" ]; then
    rm -rf "$FEEDBACK"
    python -m toy.red_user --base "$BASE" --out "$FEEDBACK" --quiet
fi
stage feedback

# --- 2. fine-tune: KTO on liked/disliked images, DPO and SFT on pairs, each method RUNS times (seeds 0, 1, ...)
#     with up to JOBS trainings side by side; each run's log and exit status lands in $OUT
rm -rf "$OUT"/{kto,dpo,sft}_s* "$OUT"/eval "$OUT"/eval_noise
mkdir -p "$OUT"
common="--pretrained $BASE --resolution 32 --max_steps $STEPS --warmup_steps 20 --beta 5000
        --val_every -1 --save_every 0 --log_every 50 --cache_dir $OUT/cache"
train() {  # train NAME SCRIPT ARGS...: in the background, at most JOBS at a time
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    local name=$1; shift
    { python "$@" --out_dir "$OUT/$name" $common > "$OUT/$name.log" 2>&1 || touch "$OUT/$name.failed"; } &
}
models=()
for s in $(seq 0 $(( RUNS - 1 ))); do
    train kto_s$s train_kto.py --data "$FEEDBACK/kto" --lr $KTO_LR --global_batch 64 --micro_batch 64 --seed $s
    train dpo_s$s train_dpo.py --data "$FEEDBACK/dpo/train.parquet" --lr $DPO_LR --global_batch 16 --micro_batch 16 --seed $s
    train sft_s$s train_dpo.py --loss sft --data "$FEEDBACK/dpo/train.parquet" --lr $SFT_LR --global_batch 16 \
        --micro_batch 16 --seed $s
    models+=(kto_s$s dpo_s$s sft_s$s)
done
wait
for m in "${models[@]}"; do
    [ ! -e "$OUT/$m.failed" ] || { echo "the fine-tune $m failed: see $OUT/$m.log"; exit 1; }
    python -c "import json, sys; r = json.loads(open(sys.argv[1]).readlines()[-1])  # the run's last log window
print(sys.argv[2] + ': ' + ' | '.join(f'{k} {v:.4g}' for k, v in r.items()))" "$OUT/$m/log.jsonl" "$m"
done
stage train

# --- 3. evaluate: DDIM 20 steps, guidance 5 (the settings the red user's samples were drawn with)
eval="--prompts $FEEDBACK/prompts.txt --n $SEEDS --steps 20 --guidance 5 --batch_size 72 --scorers toy.scorers:redness,toy.scorers:color_acc"
python evaluate.py --pretrained "$BASE" $(for m in "${models[@]}"; do printf -- '--model %s=%s ' $m "$OUT/$m"; done) \
    $eval --out "$OUT/eval" > "$OUT/eval.log" 2>&1 &
e1=$!
python evaluate.py --pretrained "$BASE" $eval --seed 1000 --out "$OUT/eval_noise" > "$OUT/eval_noise.log" 2>&1 &
e2=$!
wait $e1 && wait $e2 || { echo "evaluation failed: see $OUT/eval.log, $OUT/eval_noise.log"; exit 1; }
stage evaluate

echo
python -m runs.toy_table "$OUT/eval" "$OUT/eval_noise"
echo
echo "every run: $OUT/eval/toy_runs.md; grid: $OUT/eval/grid.png (columns: base, then each run; each cell the prompt's median-redness image)"
echo "time: $(( (SECONDS - start) / 60 )) min ($(for s in base feedback train evaluate; do printf '%s %ss, ' $s ${took[$s]}; done)load $(cut -d' ' -f1-3 /proc/loadavg))"
