"""The CUDA path in one command: both trainers under torchrun with NCCL and bf16, on models built from config
(nothing is downloaded), each run's step-1 exactness, speed and peak memory in one table.

    python tools/gpu_check.py                 # on a machine with a CUDA GPU (two or more: the 2-process runs too)
    python tools/gpu_check.py --dry_run       # the same runs on the CPU under gloo, tiny models (the slow test suite)

The models have random weights in the real SD1.5 and SDXL UNet configurations (bench.build_model: lean VAE and
text encoders, which only feed the one-off cache); the data is a synthetic Pick-a-Pic file (bench.write_pickapic),
which KTO reads as liked and disliked images. Every run is `torchrun --standalone --nproc_per_node=P train_X.py
... --precision bf16 --log_every 1`, so what runs is what users run. Columns:
- step 1: the first step's loss and whether it is exact: the policy is the reference at step 1, so DPO's loss is
  log 2 with a margin of 0, and KTO's rewards and reference point are 0 (loss 0.5). bf16 autocast, SDPA's kernel
  choice and TF32 could break this on CUDA, and nothing on a CPU could tell;
- s/step and samples/s: the median over the steps after the first two (warm-up, cache reads);
- peak GB: rank 0's torch.cuda.max_memory_allocated, which the trainers log on CUDA.
The table is printed as Markdown and written to OUT/gpu_check.md. On one H200 it takes a few minutes; the SDXL
model is written to OUT once (10 GB in fp32) and reused by a second run with the same --out.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def runs(gpus, dry):
    """(name, model, trainer, processes, flags) of every run; the 2-process runs, --shard among them (one process has
    nothing to shard and runs unsharded), need 2 devices (or the CPU)."""
    px = {"sd15": "32" if dry else "512", "sdxl": "32" if dry else "1024"}
    out = [
        ("DPO LoRA r8", "sd15", "train_dpo.py", 1, ["--lora_rank", "8", "--global_batch", "4", "--micro_batch", "4"]),
        ("DPO full, AdamW, checkpointing", "sd15", "train_dpo.py", 1,
         ["--global_batch", "2", "--micro_batch", "2", "--grad_checkpointing"]),
        ("KTO full, 8 = 2 x 4 accumulation", "sd15", "train_kto.py", 1, ["--global_batch", "8", "--micro_batch", "2"]),
        ("KTO full, 8 = 8 x 1 (whole share)", "sd15", "train_kto.py", 1, ["--global_batch", "8", "--micro_batch", "8"]),
        ("SDXL DPO LoRA r8, checkpointing", "sdxl", "train_dpo.py", 1,
         ["--lora_rank", "8", "--global_batch", "1", "--micro_batch", "1", "--grad_checkpointing"]),
        ("SDXL KTO LoRA r8, checkpointing", "sdxl", "train_kto.py", 1,
         ["--lora_rank", "8", "--global_batch", "2", "--micro_batch", "2", "--grad_checkpointing"]),
    ]
    if gpus >= 2:
        out += [
            ("DPO LoRA r8, 2 processes", "sd15", "train_dpo.py", 2, ["--lora_rank", "8", "--global_batch", "8", "--micro_batch", "4"]),
            ("KTO full, 2 x 2 x 2", "sd15", "train_kto.py", 2, ["--global_batch", "8", "--micro_batch", "2"]),
            ("DPO full --shard, 2 processes", "sd15", "train_dpo.py", 2,
             ["--global_batch", "4", "--micro_batch", "2", "--shard", "--grad_checkpointing"]),
            ("KTO full --shard, Adafactor, 2 x 2 x 2", "sd15", "train_kto.py", 2,
             ["--global_batch", "8", "--micro_batch", "2", "--shard", "--optimizer", "adafactor"]),
        ]
    return [(name, model, trainer, procs, flags + ["--resolution", px[model]]) for name, model, trainer, procs, flags in out]


def step_one(trainer, first):
    """The step-1 figure and whether it is exact (policy == reference)."""
    if trainer == "train_dpo.py":
        return f"loss {first['loss']:.7f}", abs(first["loss"] - math.log(2)) < 1e-7 and first["reward_margin"] == 0.0
    # a class absent from the first step's images logs NaN
    exact = all(first[k] == 0.0 or math.isnan(first[k]) for k in ("reward_d", "reward_u")) and first["ref_point"] == 0.0
    return f"loss {first['loss']:.7f}, rewards {first['reward_d']}/{first['reward_u']}", exact and first["loss"] == 0.5


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/gpu_check", help="models, data, runs and the table")
    p.add_argument("--dry_run", action="store_true", help="tiny models on the CPU (gloo): checks the script, not CUDA")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps a run")
    p.add_argument("--only", default="", help="run only the runs whose name contains this text")
    args = p.parse_args(argv)
    import torch
    import bench
    from toy.models import build_pipeline, build_sdxl_pipeline
    gpus = torch.cuda.device_count()
    if not gpus and not args.dry_run:
        sys.exit("error: no CUDA GPU here; --dry_run runs the same script on the CPU with tiny models")
    os.makedirs(args.out, exist_ok=True)
    device = "cpu (dry run: gloo, tiny models)" if args.dry_run else \
        f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    print(f"gpu_check: {device}")
    todo = [r for r in runs(2 if args.dry_run else gpus, args.dry_run) if args.only in r[0]]
    models = {}
    for name in sorted({r[1] for r in todo}):
        path = os.path.join(args.out, f"{'tiny-' if args.dry_run else ''}{name}")
        if not os.path.exists(os.path.join(path, "model_index.json")):
            t0 = time.time()
            if args.dry_run:
                (build_sdxl_pipeline(path, seed=0) if name == "sdxl" else build_pipeline(path, size="tiny", seed=0))
            else:
                bench.build_model(name, path)
            print(f"built {'a tiny ' + name + '-shaped model' if args.dry_run else name + ' (random weights, real UNet configuration)'} "
                  f"in {time.time() - t0:.0f}s")
        models[name] = path
    data = {}
    for px in sorted({r[4][r[4].index("--resolution") + 1] for r in todo}):
        data[px] = os.path.join(args.out, f"pairs-{px}px.parquet")
        if not os.path.exists(data[px]):
            bench.write_pickapic(data[px], 64, int(px))

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1" if args.dry_run else "4")
    rows = ["| run | processes | step 1 | exact | s/step | samples/s | peak GB |", "|---|---|---|---|---|---|---|"]
    failed = 0
    for name, model, trainer, procs, flags in todo:
        out = os.path.join(args.out, "runs", name.replace(" ", "_").replace(",", "").replace("/", ""))
        px = flags[flags.index("--resolution") + 1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               os.path.join(ROOT, trainer), "--pretrained", models[model], "--data", data[px], "--out_dir", out,
               "--cache_dir", os.path.join(args.out, "cache"), "--max_steps", str(args.steps), "--log_every", "1",
               "--save_every", str(args.steps), "--val_every", "-1", "--precision", "bf16", "--lr", "1e-6",
               "--warmup_steps", "1", *flags]
        if os.path.exists(os.path.join(out, "log.jsonl")):
            os.remove(os.path.join(out, "log.jsonl"))
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            failed += 1
            print(f"FAILED {name} ({time.time() - t0:.0f}s): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-2500:]}")
            rows.append(f"| {name} | {procs} | failed (exit {proc.returncode}) | no | | | |")
            continue
        with open(os.path.join(out, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        figure, exact = step_one(trainer, log[0])
        unit = "pairs/s" if trainer == "train_dpo.py" else "images/s"
        batch = int(flags[flags.index("--global_batch") + 1])
        rate = statistics.median(r[unit] for r in (log[2:] or log))
        peak = max((r.get("peak_gb", float("nan")) for r in log), default=float("nan"))
        failed += not exact
        rows.append(f"| {name} ({model}, {px} px) | {procs} | {figure} | {'yes' if exact else 'NO'} | {batch / rate:.3f} | "
                    f"{rate:.2f} {unit[:-2]} | {'n/a (CPU)' if math.isnan(peak) else f'{peak:.2f}'} |")
        print(f"{name}: done in {time.time() - t0:.0f}s")
    table = "\n".join([f"GPU check, {time.strftime('%Y-%m-%d')}, {device}, bf16, {args.steps} steps a run:", ""] + rows)
    print("\n" + table)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table + "\n")
    if failed:
        sys.exit(f"error: {failed} run(s) failed or were not exact at step 1 (see above)")


if __name__ == "__main__":
    main()
