#!/usr/bin/env bash
# Online against offline Diffusion-KTO in the toy world: does judging the model's own new samples, round after
# round, beat judging the base's samples once?
#
#   bash runs/toy_online.sh          # needs the toy base (toy/data/base); builds it as runs/toy.sh does if missing
#
# The judge is the red user's reward (toy.scorers:redness): of each prompt's K samples the reddest quarter is
# liked, the least red quarter disliked. The fidelity check is the caption color check (toy.scorers:color_acc).
# online (online_kto.py): R rounds, each on K fresh samples per prompt from the model the last round ended with;
# offline (online_kto.py --offline): the same R x K x P labels, all on the base's samples (the seeds online's
# rounds use), judged up front, then the same R rounds of N steps each on all of them. Both: full fine-tunes
# with train_kto.py as in runs/toy.sh (lr 3e-5, 64 images a step, 80% liked draws, beta 5000, 32 px), each
# round continuing the last (train_kto --continue_from: its weights, its AdamW state, its place in the lr
# schedule) with the base as reference, N = 50 steps a round and 20 warm-up steps once, at the start of round 1
# (online_kto's --warmup_steps counts for the whole run, not per round): the 4 x 50 steps are toy.sh's KTO
# schedule, 200 steps with 20 of warm-up, and from the 20th step on every step trains at lr 3e-5. Sampling and training
# are both at 32 px, the toy base's native size. Every run is evaluated after every round on the same 36 check
# prompts x 8 seeds (apart from the training seeds); each arm runs 3 times (seeds 0, 1, 2): the table gives the
# mean and the lowest and highest run (the run-to-run noise), the plot the same.
#
# Measured: see README.md, "Online Diffusion-KTO" (hardware, time, the table, the plot).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per run, two runs side by side

BASE=${BASE:-toy/data/base}
OUT=${OUT:-runs/out/toy_online}
R=${R:-4}; K=${K:-8}; N=${N:-50}; LR=${LR:-3e-5}  # rounds, samples per prompt and round, steps per round
EVAL_SEEDS=${EVAL_SEEDS:-8}                       # evaluation images per prompt (36 prompts)
RUNS=${RUNS:-3}; JOBS=${JOBS:-2}                  # runs (seeds) of each arm; runs side by side

start=$SECONDS
if [ ! -f "$BASE/toy_base.json" ]; then
    OMP_NUM_THREADS=2 python -m toy.make_base --out "$BASE" --threads 2 --quiet
fi
mkdir -p "$OUT"
python -c "from toy.make_base import check_prompts; print('\n'.join(check_prompts()))" > "$OUT/prompts.txt"  # 36

run() {  # run NAME FLAGS...: in the background, at most JOBS at a time; a rerun resumes each run where it stopped
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
    local name=$1; shift
    { python online_kto.py --pretrained "$BASE" --prompts "$OUT/prompts.txt" --out "$OUT/$name" \
        --rounds $R --k $K --steps $N --judge toy.scorers:redness --fidelity toy.scorers:color_acc \
        --eval_seeds $EVAL_SEEDS --resolution 32 --lr $LR --global_batch 64 --micro_batch 64 --warmup_steps 20 \
        --beta 5000 --batch_size 72 --train_args "--log_every 50" "$@" > "$OUT/$name.log" 2>&1 \
        || touch "$OUT/$name.failed"; } &
}
rm -f "$OUT"/*.failed
for s in $(seq 0 $(( RUNS - 1 ))); do
    run online_s$s --seed $s
    run offline_s$s --seed $s --offline
done
wait
for f in "$OUT"/*.failed; do [ ! -e "$f" ] || { echo "run ${f%.failed} failed: see ${f%.failed}.log"; exit 1; }; done

python -m runs.toy_online_table "$OUT"
cp "$OUT/online_vs_offline.png" docs/toy_online.png
echo "time: $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s (load $(cut -d' ' -f1-3 /proc/loadavg))"
