"""Online Diffusion-KTO: sample, judge, train, repeat.

    python online_kto.py --pretrained BASE --prompts FILE --out DIR --rounds R --k K --steps N \\
        --judge module:function|SCORER|person [--fidelity module:function|SCORER] [--offline]

Each round r = 1..R, in DIR/round_r:
  1. generate: K images for each of the P prompts with the current model (round 1: the base; then the weights
     round r-1 ended with), seeds fixed per round, into images/ (a PNG and its caption in a .txt beside it);
  2. label: a judge scores them, f(images, prompts) -> one number per image (module:function of yours, or a
     scorer of scorers.py): the top --like_share of each prompt's K images are liked, the bottom share disliked,
     the middle left out. Or --judge person: you label them on label.py's page (the command is printed) and the
     round waits until every image has a label. Either way the labels are images/metadata.jsonl, which
     `train_kto.py --data DIR/round_r/images` reads as it is;
  3. train: N Diffusion-KTO steps of train_kto.py against the fixed base as reference, into train/, continuing
     the last round's training (train_kto --continue_from): its weights, its optimizer state and its place in the
     learning-rate schedule. So the R rounds are one schedule of R x N steps with one warm-up, at the start of
     round 1 (--warmup_steps, default a tenth of a round), and every later step trains at --lr;
  4. evaluate: the judge and the fidelity check on a fixed evaluation set (--eval_prompts x --eval_seeds, seeds
     apart from the training samples'), the same every round so that rounds compare (round 0 is the base); one
     record per round, printed and in DIR/rounds.jsonl: the judge's mean on the round's own samples, and on the
     evaluation set its mean, the like-rate (share of images scoring above the base's median image of the same
     prompt, as runs/toy_table.py defines it) and the fidelity mean. Fidelity falling while the judge rises is
     reward hacking.
--offline is the control: the same number of labels and steps, every label on the base's samples. The R x K x P
base samples (round r's seeds, as online) are generated and judged first; then R rounds of N steps each train on
all of those labels, each round continuing the last as online does. The two differ in where the labels come from
and in nothing else.

Sampling and training share one resolution: --resolution, or the base model's native one (its UNet's sample size
times the VAE's downscaling: 512 px for SD1.5, 1024 px for SDXL), printed at the start and passed to train_kto.py.

Killed in any phase, a rerun with the same flags continues the round it was in: images on disk are kept (they
are made in fixed batches, so a regenerated one equals the image an uninterrupted run makes), a round's labels
are final once round_r/labels.json exists, a round's training is done once its step-N checkpoint exists and
resumes from its checkpoints otherwise (train_kto --resume), evaluations are kept in round_r/eval.json.
"""
import argparse
import json
import os
import shlex
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import checkpoints
import common
import train_kto
from files import atomic_path, fail, one_line, read_jsonl, write_json
from label import decisions_in
from model import DENOISER, family_of
from sample import generate, generate_missing, load_pipeline, load_prompts, load_scheduler
from scorers import add_scorer_args, load_scorers, scorer_name

EVAL_SEED = 10 ** 8  # evaluation seeds EVAL_SEED + 0..E-1: the same for every run, apart from the training samples'
SEEDS_PER_RUN = 10 ** 5  # training samples of run seed S, round r: S * SEEDS_PER_RUN + (r - 1) * K + 0..K-1
TRAINER_FLAGS = ("lr", "beta", "global_batch", "micro_batch", "warmup_steps", "lora_rank", "resolution", "desirable_share")
TRAINER_HELP = {"warmup_steps": "steps of linear learning-rate warm-up, once for the whole run, in round 1 (the schedule and "
                                "the optimizer continue across rounds); default: a tenth of a round's --steps",
                "resolution": "the image side of sampling and of training; default: the base model's native size"}


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--pretrained", required=True, help="the base model (diffusers folder or hub id): round 1's sampler and every round's reference")
    a("--prompts", required=True, help="training prompts: a prompts file (evaluate.py's formats) or prompts separated by |")
    a("--max_prompts", type=int, default=None, help="use only the first P prompts")
    a("--out", required=True, help="run folder: round_r/ per round, rounds.jsonl; rerunning with the same folder resumes")
    a("--rounds", type=int, default=4, help="R: rounds of generate, label, train")
    a("--k", type=int, default=8, help="K: images per prompt and round")
    a("--steps", type=int, default=50, help="N: train_kto.py steps per round")
    a("--judge", required=True, help="module:function (f(images, prompts) -> one number per image), a scorer of scorers.py, or person")
    a("--like_share", type=float, default=0.25, help="liked: the top share of each prompt's K images by the judge; disliked: the bottom share")
    a("--fidelity", default="", help="the fidelity check, module:function or a scorer (e.g. clip); '' for none")
    a("--eval_prompts", default="", help="evaluation prompts (same forms as --prompts); '' = the training prompts")
    a("--eval_seeds", type=int, default=4, help="evaluation images per prompt and round")
    a("--offline", action="store_true", help="the control: every label on the base's samples, judged up front")
    a("--seed", type=int, default=0, help="seed of the training samples and of train_kto.py (the evaluation seeds stay fixed)")
    a("--sample_steps", type=int, default=20, help="denoising steps of every sample")
    a("--guidance", type=float, default=5.0, help="classifier-free guidance scale of every sample (FLUX.1 [dev]: its distilled guidance input, 3.5 is its default)")
    a("--batch_size", type=int, default=32, help="images per pipeline call (kept on a rerun: rounding may depend on it)")
    for flag in TRAINER_FLAGS:  # passed to train_kto.py when given (warm-up and resolution always); else its defaults
        a(f"--{flag}", type=float if flag in ("lr", "beta", "desirable_share") else int, default=None,
          help=f"train_kto.py --{flag}: " + TRAINER_HELP.get(flag, "default: train_kto.py's"))
    a("--save_every", type=int, default=100, help="train_kto.py checkpoint interval within a round (one is always written at its end)")
    a("--train_args", default="", help="more train_kto.py flags, one string, e.g. '--utility loss_averse'")
    a("--cache_dir", default="", help="train_kto.py's latent cache; '' = OUT/cache")
    a("--poll", type=float, default=5.0, help="--judge person: seconds between looks at the labels file")
    a("--precision", choices=common.PRECISIONS, default="auto",
      help="sampling: fp32 weights under bf16 autocast with bf16 (auto: bf16 on CUDA, fp32 on the CPU); passed to train_kto.py")
    add_scorer_args(p)  # where a named --judge or --fidelity scorer loads from (evaluate.py's flags)
    return p


def get_args(argv=None):
    return make_parser().parse_args(argv)


# -----------------------------------------------------------------------------
# the phases of a round, each of which leaves a file that says it is done

def image_name(i, seed):
    return f"{i:04d}_s{seed}.png"


def generate_images(pipe_for, prompts, seeds, folder, args, autocast, what):
    """Every (prompt, seed) image not yet in `folder`, with its caption beside it. Always in the same batches
    (prompt-major, --batch_size), and only whole batches are made again, so a rerun makes the same images."""
    jobs = [(i, s) for i in range(len(prompts)) for s in seeds]

    def caption_first(k):  # an image on disk always has its caption beside it
        caption = os.path.join(folder, image_name(*jobs[k])[:-4] + ".txt")
        if not os.path.exists(caption):
            with atomic_path(caption) as tmp, open(tmp, "w") as f:
                f.write(prompts[jobs[k][0]] + "\n")
    generate_missing(pipe_for, [(prompts[i], s) for i, s in jobs], lambda k: os.path.join(folder, image_name(*jobs[k])),
                     args.batch_size, args.sample_steps, args.guidance, args.resolution, autocast, f"generate {what}",
                     before_save=caption_first)


def score_files(scorer, paths, texts, batch=64):
    """The scorer's numbers for images on disk (what was saved is what is judged, after a rerun too). (N,)"""
    out = []
    for k in range(0, len(paths), batch):
        images = [Image.open(p).convert("RGB") for p in paths[k:k + batch]]
        out += [float(v) for v in scorer(images, texts[k:k + batch])]
    return np.array(out)


def judge_labels(scorer, folder, prompts, seeds, share):
    """The judge's labels: per prompt, the top `share` of its K images liked, the bottom share disliked (ties in
    seed order). Written as folder/metadata.jsonl, train_kto.py's format, whole or absent."""
    names = [image_name(i, s) for i in range(len(prompts)) for s in seeds]
    texts = [prompts[i] for i in range(len(prompts)) for _ in seeds]
    scores = score_files(scorer, [os.path.join(folder, n) for n in names], texts).reshape(len(prompts), len(seeds))
    n = max(1, round(share * len(seeds)))
    rows = []
    for i in range(len(prompts)):
        order = np.argsort(-scores[i], kind="stable")  # best first
        for rank, j in enumerate(order):
            label = "liked" if rank < n else "disliked" if rank >= len(seeds) - n else None
            if label:
                rows.append({"file_name": image_name(i, seeds[j]), "text": prompts[i], "label": label,
                             "score": float(scores[i, j])})
    with atomic_path(os.path.join(folder, "metadata.jsonl")) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows, float(scores.mean())


def person_labels(folder, names, poll):
    """Wait until label.py has a decision on every image of the round (liked, disliked or skipped: its journal,
    replayed by label.py itself) and its metadata.jsonl holds them, looking every `poll` seconds; returns the
    liked and disliked rows of that metadata.jsonl (what the round trains on)."""
    print(f"label this round's {len(names)} images in the browser, then this run goes on by itself:\n"
          f"    python label.py {folder}", flush=True)
    bar = tqdm(total=len(names), desc="labelled by you")
    while True:
        decided = decisions_in(folder)
        bar.update(sum(n in decided for n in names) - bar.n)
        if bar.n == len(names):
            rows = {r.get("file_name"): r for r in read_jsonl(os.path.join(folder, "metadata.jsonl"))}
            liked = {n: c for n, c in decided.items() if c in ("liked", "disliked")}
            if all(rows.get(n, {}).get("label") == c for n, c in liked.items()):  # the file has caught up
                bar.close()
                return [rows[n] for n in liked]
        time.sleep(poll)


def label_round(rdir, judge, prompts, seeds, args, r):
    """Phase 2; round_r/labels.json (counts and the judge's mean score of the round's samples) marks it done."""
    path = os.path.join(rdir, "labels.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    folder = os.path.join(rdir, "images")
    if judge is None:
        names = [image_name(i, s) for i in range(len(prompts)) for s in seeds]
        rows, mean = person_labels(folder, names, args.poll), None
    else:
        rows, mean = judge_labels(next(iter(judge.values())), folder, prompts, seeds, args.like_share)
    counts = {y: sum(row["label"] == y for row in rows) for y in ("liked", "disliked")}
    if min(counts.values()) == 0:
        fail(f"round {r}: {counts['liked']} liked and {counts['disliked']} disliked images; KTO needs both "
             f"(label some of each in {folder}, then rerun)")
    summary = dict(counts, samples=len(prompts) * len(seeds), judge_samples_mean=mean)
    write_json(summary, path, indent=1)
    print(f"round {r}: {counts['liked']} liked, {counts['disliked']} disliked of {summary['samples']} samples"
          + (f"; judge mean on them {mean:.4g}" if mean is not None else ""))
    return summary


def final_checkpoint(rdir, steps):
    return os.path.join(rdir, "train", "checkpoints", f"step_{steps:07d}")


def native_resolution(pretrained):
    """The image side a pipeline samples at by default: its denoiser's sample size (UNet or transformer, in latent
    pixels) times the VAE's downscaling."""
    from diffusers import AutoencoderKL
    try:
        net = AutoencoderKL.load_config(pretrained, subfolder=DENOISER[family_of(pretrained)])  # any model class reads a config.json
        vae = AutoencoderKL.load_config(pretrained, subfolder="vae")
    except Exception as e:
        fail(f"cannot read the denoiser and VAE configs of {pretrained!r} for its native resolution (or pass "
             f"--resolution): {one_line(e)}")
    size = net.get("sample_size", 128)  # FLUX's transformer has none: its pipelines default to 128 latent pixels
    return (size if isinstance(size, int) else size[0]) * 2 ** (len(vae["block_out_channels"]) - 1)


def train_round(rdir, data, last, args, r):
    """Phase 3: N steps of train_kto.py continuing round r-1's (`last`, its final checkpoint; None in round 1);
    done once its step-N checkpoint is there and whole."""
    final = final_checkpoint(rdir, args.steps)
    if os.path.isdir(final) and checkpoints.checkpoint_problem(final) is None:
        return final
    argv = ["--pretrained", args.pretrained, "--data", data, "--out_dir", os.path.join(rdir, "train"),
            "--max_steps", str(args.steps), "--seed", str(1000 * args.seed + r), "--val_every", "-1",
            "--save_every", str(args.save_every), "--cache_dir", args.cache_dir or os.path.join(args.out, "cache"),
            "--precision", args.precision,
            "--resume"]  # a killed round continues from its checkpoints; a new one starts at step 0
    argv += ["--continue_from", last] if last else []  # its weights, optimizer state and place in the lr schedule
    argv += [x for f in TRAINER_FLAGS if getattr(args, f) is not None for x in (f"--{f}", str(getattr(args, f)))]
    train_kto.main(argv + shlex.split(args.train_args))
    return final


def evaluate_round(pipe, eval_prompts, scorers, args, autocast):
    """Phase 4: every scorer on the evaluation set's images ({name: (P, E) list})."""
    seeds = [EVAL_SEED + s for s in range(args.eval_seeds)]
    with autocast():
        rows = generate(pipe, eval_prompts, seeds, args.sample_steps, args.guidance, args.resolution, args.batch_size)
    images = [im for row in rows for im in row]
    texts = [p for p in eval_prompts for _ in seeds]
    return {name: np.array([float(v) for k in range(0, len(images), 64) for v in fn(images[k:k + 64], texts[k:k + 64])])
            .reshape(len(eval_prompts), len(seeds)).tolist() for name, fn in scorers.items()}


def round_record(r, labels, scores, base_scores, judge_name, fidelity_name):
    """One line of rounds.jsonl: the round's samples (labels) and the evaluation of the weights it ended with."""
    rec = {"round": r, "model": "base" if r == 0 else f"after round {r}"}
    if labels:
        rec.update(liked=labels["liked"], disliked=labels["disliked"], judge_samples_mean=labels["judge_samples_mean"])
    if judge_name:
        s, base = np.array(scores[judge_name]), np.array(base_scores[judge_name])  # (P, E)
        rec["judge_eval_mean"] = float(s.mean())
        rec["like_rate"] = float((s > np.median(base, axis=1, keepdims=True)).mean())
    if fidelity_name:
        s = np.array(scores[fidelity_name], dtype=np.float64)
        rec["fidelity_eval_mean"] = float(np.nanmean(s)) if not np.isnan(s).all() else None
    return rec


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    args.out = os.path.abspath(args.out)  # train_kto --resume compares its --data and --init_from paths as strings
    t0 = time.time()
    if not 0 < args.like_share <= 0.5 or 2 * max(1, round(args.like_share * args.k)) > args.k:
        fail(f"--like_share {args.like_share} of --k {args.k} images: liked and disliked must not overlap (0 < share <= 0.5)")
    if args.rounds < 1 or args.steps < 1 or args.k * args.rounds > SEEDS_PER_RUN:
        fail(f"--rounds {args.rounds}, --steps {args.steps}, --k {args.k}: want R >= 1, N >= 1, R x K <= {SEEDS_PER_RUN}")
    read = lambda spec: load_prompts(spec) if os.path.isfile(spec) else [x.strip() for x in spec.split("|") if x.strip()]
    prompts = read(args.prompts)[:args.max_prompts]
    eval_prompts = read(args.eval_prompts) if args.eval_prompts else prompts
    if not prompts or not eval_prompts:
        fail(f"no prompts in --prompts {args.prompts!r}" + (f" or --eval_prompts {args.eval_prompts!r}" if args.eval_prompts else ""))

    # -------------------------------------------------------------------------
    # device, judge and fidelity scorers (before any sampling: one that cannot load stops the run now)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = common.autocast_for(device, common.resolve_precision(args.precision, device.type == "cuda"))
    person = args.judge == "person"
    judge = None if person else load_scorers([args.judge], args, device)
    fidelity = load_scorers([args.fidelity], args, device) if args.fidelity else {}
    judge_name, fidelity_name = (None if person else scorer_name(args.judge)), (scorer_name(args.fidelity) if args.fidelity else None)
    if judge_name and judge_name == fidelity_name:
        fail(f"--judge and --fidelity are both {judge_name}: the fidelity check must be another score")
    scorers = {**(judge or {}), **fidelity}
    scheduler = load_scheduler(args.pretrained)
    native = args.resolution is None
    if native:  # one size for sampling and training, the one the base model was made for
        args.resolution = native_resolution(args.pretrained)
    if args.warmup_steps is None:  # in round 1 whatever --rounds is (more rounds may be added on a rerun)
        args.warmup_steps = max(1, args.steps // 10)

    # the run's settings: a rerun must keep them (more rounds are fine online: rounds done stay valid)
    os.makedirs(args.out, exist_ok=True)
    run = {k: v for k, v in vars(args).items() if k not in ("poll", "out") and (k != "rounds" or args.offline)}
    run.update(prompts=prompts, eval_prompts=eval_prompts, schedule="one warm-up, optimizer continued across rounds")
    run_path = os.path.join(args.out, "run.json")
    if os.path.exists(run_path):
        with open(run_path) as f:
            old = json.load(f)
        if old.get("schedule") != run["schedule"]:
            fail(f"{args.out} was made by an older online_kto.py, which restarted the optimizer and the warm-up in every "
                 f"round: use another --out")
        # the trainers' resume rule: every setting must match; one a run predates (a flag added since) at its default
        parser = make_parser()
        changed = checkpoints.resume_conflicts(old, run, {k: parser.get_default(k) for k in run}, may_change=())
        if changed:
            fail(f"{args.out} was made with other settings: {'; '.join(changed)}: use another --out, or the same flags")
    write_json(run, run_path, indent=1)
    print(f"{'offline' if args.offline else 'online'} Diffusion-KTO: {args.rounds} rounds x {len(prompts)} prompts x "
          f"{args.k} images, {args.steps} steps a round; judge {args.judge}, fidelity {args.fidelity or 'none'}; "
          f"evaluation {len(eval_prompts)} prompts x {args.eval_seeds} seeds; {device}")
    lr = args.lr if args.lr is not None else train_kto.parser.get_default("lr")
    size_from = "the base model's native size" if native else "--resolution"
    print(f"sampling and training at {args.resolution} px ({size_from}); "
          f"learning rate {lr:g} after {args.warmup_steps} warm-up steps, once: the schedule and the optimizer continue "
          f"from round to round ({args.rounds} x {args.steps} = {args.rounds * args.steps} steps)")

    round_dir = lambda r: os.path.join(args.out, f"round_{r:03d}")
    round_seeds = lambda r: [args.seed * SEEDS_PER_RUN + (r - 1) * args.k + j for j in range(args.k)]
    weights = lambda r: final_checkpoint(round_dir(r), args.steps) if r > 0 else None  # the model round r ended with
    loaded = {}  # one pipeline in memory at a time: {weights: pipeline}

    def pipe_for(source):
        if source not in loaded:
            loaded.clear()
            loaded[source] = load_pipeline(args.pretrained, source, scheduler, device, torch.float32)
        return loaded[source]

    def sample_and_label(r, source):
        rdir = round_dir(r)
        os.makedirs(os.path.join(rdir, "images"), exist_ok=True)
        if not os.path.exists(os.path.join(rdir, "labels.json")):
            generate_images(lambda: pipe_for(source), prompts, round_seeds(r), os.path.join(rdir, "images"), args,
                            autocast, f"round {r} ({'base' if source is None else 'round ' + str(r - 1) + ' weights'})")
        return label_round(rdir, judge, prompts, round_seeds(r), args, r)

    # -------------------------------------------------------------------------
    # offline: every label up front, on the base's samples; they are trained on together in every round
    labels, data = {}, None
    if args.offline:
        for r in range(1, args.rounds + 1):
            labels[r] = sample_and_label(r, None)
        data = os.path.join(args.out, "offline_labels.jsonl")
        if not os.path.exists(data):  # written once: its rows are relative to OUT, round_r/images/NAME
            rows = [dict(row, file_name=f"round_{r:03d}/images/{row['file_name']}") for r in labels
                    for row in read_jsonl(os.path.join(round_dir(r), "images", "metadata.jsonl"))
                    if row.get("label") in ("liked", "disliked")]
            with atomic_path(data) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

    # -------------------------------------------------------------------------
    # the rounds: evaluate the weights of round r (0: the base), then round r+1 samples, labels, trains
    records = []
    for r in range(0, args.rounds + 1):
        eval_path = os.path.join(round_dir(r), "eval.json")
        if not os.path.exists(eval_path):
            os.makedirs(round_dir(r), exist_ok=True)
            scores = evaluate_round(pipe_for(weights(r)), eval_prompts, scorers, args, autocast) if scorers else {}
            write_json(scores, eval_path)
        with open(eval_path) as f:
            scores = json.load(f)
        if r == 0:
            base_scores = scores
        records.append(round_record(r, labels.get(r), scores, base_scores, judge_name, fidelity_name))
        print(f"round {r} ({records[-1]['model']}): " + " | ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in records[-1].items() if k not in ("round", "model")))
        with atomic_path(os.path.join(args.out, "rounds.jsonl")) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)
        if r == args.rounds:
            break
        if not args.offline:
            labels[r + 1] = sample_and_label(r + 1, weights(r))
        loaded.clear()  # the sampler leaves memory before the trainer loads its models
        train_round(round_dir(r + 1), data or os.path.join(round_dir(r + 1), "images"), weights(r), args, r + 1)
    print(f"done: {args.rounds} rounds in {args.out} (rounds.jsonl; this invocation took {time.time() - t0:.0f} s)")
    return records


if __name__ == "__main__":
    main()
