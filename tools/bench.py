"""Time the real training step against the bare compute it cannot avoid, for a model size built from config.

    python tools/bench.py --size small                         # DPO, full fine-tune; target: efficiency >= 0.85 on 2 cores
    python tools/bench.py --size small --algo kto --ref_point mismatched
    python tools/bench.py --size sd15 --steps 3 --warmup 1     # the real SD1.5 UNet: LoRA + gradient checkpointing, 128 px
    python tools/bench.py --size sdxl --precision bf16 --steps 3 --warmup 1   # the real SDXL UNet, likewise, bf16 autocast

For the named size (random weights, toy/models.py), on the current device (CUDA if available):
1. the real step: train_dpo.main (or train_kto.main) runs in this process on a synthetic Pick-a-Pic
   parquet, logging so that its last log window holds exactly the timed steps; its pairs/s (images/s)
   is read back from out_dir/log.jsonl. Nothing of the trainer is re-implemented here.
2. the floor: the same model, batch and dtype doing nothing but the policy forward+backward (on the
   2B stacked latents of B pairs for DPO, on B images for KTO), the reference forward and the
   optimizer step; for KTO's mismatched reference point also one more no-grad forward of each model.
3. efficiency = floor time per step / real time per step: the share of a step spent on the compute
   the method needs. The rest is data assembly, metrics, clipping, logging: the trainer's overhead.

The last line printed carries every figure as key=value pairs. On a machine shared with other jobs
wall times are noisy: compare the ratios of one run, not times across runs. --repeats times both parts
several times, alternating their order, and reports the repeat with the median efficiency. This
process's CPU time is measured beside the wall time (cpu_efficiency): other jobs disturb it less, and
with --threads 1 hardly at all. (Under contention, 2 OpenMP threads can be several times slower than
1: each parallel region waits until both threads get a core.)
"""
import argparse
import gc
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: tools/..
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never wait on the network

import torch

from files import PRECISIONS, atomic_path, fail

# -----------------------------------------------------------------------------
# config

# per size: image side (px), pairs per forward (KTO: twice as many images, the same images per forward),
# LoRA rank (0: full fine-tune), gradient checkpointing
SIZE_DEFAULTS = {
    "tiny": dict(resolution=32, pairs=4, lora_rank=0, grad_checkpointing=False),
    "small": dict(resolution=64, pairs=4, lora_rank=0, grad_checkpointing=False),
    # the real UNet at a small resolution, as one would fit it on a modest GPU: LoRA and checkpointing
    "sd15": dict(resolution=128, pairs=1, lora_rank=8, grad_checkpointing=True),
    # SDXL's real UNet (2.6B parameters), likewise
    "sdxl": dict(resolution=128, pairs=1, lora_rank=8, grad_checkpointing=True),
}
# the flow families' real transformers (their transformer/config.json), for --plan_only: family, class, config
FLOW_SIZES = {
    "sd35m": ("sd3", "SD3Transformer2DModel", dict(  # SD3.5 Medium (MMDiT-X: dual attention in its first 13 blocks)
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    "sd35l": ("sd3", "SD3Transformer2DModel", dict(  # SD3.5 Large
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm")),
    "flux1": ("flux", "FluxTransformer2DModel", dict(  # FLUX.1 [dev] ([schnell]: guidance_embeds False, 0.3% smaller)
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    "klein4b": ("flux2", "Flux2Transformer2DModel", dict(  # FLUX.2 [klein] base 4B
        patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=7680, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
        guidance_embeds=False, timestep_guidance_channels=256)),
}

# flags whose default depends on --size say so; the others show theirs
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
a = parser.add_argument
a("--size", choices=list(SIZE_DEFAULTS) + list(FLOW_SIZES), default="small", help="tiny/small: SD-shaped toys (toy/models.py); sd15, sdxl: the real SD1.5 / SDXL UNet configuration, random weights; sd35m, sd35l, flux1, klein4b: the real SD3.5 Medium / Large, FLUX.1 [dev], FLUX.2 [klein] base 4B transformer, --plan_only (default: %(default)s)")
a("--precision", choices=PRECISIONS, default="auto", help="the trainers' --precision: auto is bf16 on CUDA, fp32 on the CPU; bf16 runs under CPU autocast too (default: %(default)s)")
a("--optimizer", choices=["adamw", "adafactor"], default="adamw", help="the trainers' --optimizer (default: %(default)s)")
a("--algo", choices=["dpo", "kto"], default="dpo", help="which trainer to time: train_dpo.py or train_kto.py (default: %(default)s)")
a("--ref_point", choices=["batch", "mismatched"], default="batch", help="KTO only: reference-point mode; mismatched costs one more no-grad forward of each model (default: %(default)s)")
a("--steps", type=int, default=20, help="optimizer steps timed, after warm-up (default: %(default)s)")
a("--warmup", type=int, default=5, help="untimed warm-up steps of the floor; the trainer warms up for max(--warmup, --steps) steps, the length of its log windows (default: %(default)s)")
a("--micro_batch", type=int, help="pairs (DPO) or images (KTO) per forward (default: tiny/small 4 pairs or 8 images, sd15 1 pair or 2 images)")
a("--accum", type=int, default=1, help="micro-batches per optimizer step; the trainer's --global_batch is micro_batch x accum (default: %(default)s)")
a("--lora_rank", type=int, help="0: full fine-tune; R>0: LoRA adapters of rank R (default: tiny/small 0, sd15 8)")
a("--resolution", type=int, help="training image side in px (default: tiny 32, small 64, sd15 128)")
a("--grad_checkpointing", action=argparse.BooleanOptionalAction, help="recompute activations in backward (default: on for sd15 only)")
a("--repeats", type=int, default=1, help="time the real run and the floor this many times, alternating their order; the repeat with the median efficiency is reported (default: %(default)s)")
a("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default, one per core (default: %(default)s)")
a("--pretrained", default="", help="time this diffusers pipeline folder (of the named --size) instead of building one with random weights")
a("--work_dir", default="", help="folder for the model, data, cache and run outputs, kept, and a model already there is reused (default: a temporary folder, deleted at the end)")
a("--seed", type=int, default=0, help="seed for the weights, the data and the runs (default: %(default)s)")
a("--plan_only", action="store_true", help="print the trainers' memory plan per process for the real --size sd15/sdxl UNet or flow transformer (from its configuration, no weights) and stop")
a("--quantize_base", choices=["none", "int8"], default="none", help="with --plan_only and LoRA: the trainers' --quantize_base (default: %(default)s)")
a("--shard", type=int, default=0, help="with --plan_only: the plan of a run sharded over this many processes (--shard under torchrun); 0: unsharded (default: %(default)s)")


# -----------------------------------------------------------------------------
# the model and the data, in the formats the trainers read

def build_model(size, out_dir, seed=0):
    """Save a random-weight pipeline of the named size in the diffusers layout to out_dir.

    tiny/small: toy.models.build_pipeline. sd15: SD1.5's real UNet with a lean VAE and text encoder.
    Why lean: toy.models.build_pipeline(dir, "sd15") took 59 s on our 2-core CPU, nearly all of it in
    torch's CPU random number generator (about 20M values/s; numpy's is no faster there) initialising
    the UNet's weights. Here the UNet is made on the meta device and each weight is a slice, at a random
    offset, of one pool of 33.5M normal values (the largest weight has 29.5M), scaled to torch's default
    std 1/sqrt(3 fan_in); norms start at 1, biases at 0. Weights overlap, which changes no FLOP. The VAE
    and text encoder only feed the one-off cache, never a training step, so they are small: a 1-layer
    CLIP text encoder of width 768 (the UNet's cross-attention width) and a narrow VAE with SD1.5's 4
    levels (8x down-sampling, 4 latent channels).
    """
    if size not in ("sd15", "sdxl"):
        from toy.models import build_pipeline
        build_pipeline(out_dir, size, seed=seed)
        return
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from toy.models import write_tokenizer
    torch.manual_seed(seed)
    unet = meta_unet(size)
    unet = unet.to_empty(device="cpu")  # uninitialised memory; every parameter is written below (no buffers)
    pool = torch.randn(1 << 25)
    with torch.no_grad():
        for p in unet.parameters():
            if p.ndim >= 2:  # conv and linear weights
                start = int(torch.randint(0, len(pool) - p.numel() + 1, ()))
                torch.mul(pool[start:start + p.numel()].view(p.shape), 1 / math.sqrt(3 * p[0].numel()), out=p)
            else:  # biases (and norm scales, set to 1 next)
                p.zero_()
        for m in unet.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.fill_(1.0)

    def encoder(hidden, cls=CLIPTextModel, **kw):  # one layer: it only feeds the one-off cache
        return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1,
                                  num_attention_heads=hidden // 64, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw))
    tok = write_tokenizer(os.path.join(out_dir, "tokenizer"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, layers_per_block=1, sample_size=512)
    # SD1.5's scheduler settings, as in toy/models.py
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if size == "sd15":
        StableDiffusionPipeline(vae=vae, text_encoder=encoder(768), tokenizer=tok, unet=unet, scheduler=scheduler,
                                safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(out_dir, safe_serialization=True)
    else:  # SDXL's two encoders: widths 768 and 1280 (2048 together), the second with a 1280-d projection
        tok_2 = write_tokenizer(os.path.join(out_dir, "tokenizer_2"))
        StableDiffusionXLPipeline(vae=vae, text_encoder=encoder(768), text_encoder_2=encoder(1280, CLIPTextModelWithProjection,
                                                                                             projection_dim=1280),
                                  tokenizer=tok, tokenizer_2=tok_2, unet=unet,
                                  scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)


def meta_unet(size):
    """The real SD1.5 or SDXL UNet's configuration on the meta device: every shape, no memory, no initialisation."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        if size == "sd15":  # SD1.5's unet/config.json: the library defaults but for these two (defaults 1280, None)
            return UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
        return UNet2DConditionModel(  # SDXL base 1.0's unet/config.json
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def print_plan(args):
    """--plan_only: the memory plan a trainer prints at its start (model.memory_plan) for the real SD1.5 or SDXL
    UNet, built on the meta device from its configuration (no weights, no GPU), for --lora_rank and --optimizer,
    in one process (as every DDP process holds) or sharded over --shard N processes."""
    from types import SimpleNamespace
    import common
    import model
    if args.size not in ("sd15", "sdxl", *FLOW_SIZES):
        fail(f"--plan_only: --size one of sd15, sdxl, {', '.join(FLOW_SIZES)} (the real configurations)")
    if args.shard > 1 and args.lora_rank:
        fail("--shard is for full fine-tunes: add --lora_rank 0")
    if args.size in FLOW_SIZES:
        import diffusers
        family, cls, config = FLOW_SIZES[args.size]
        with torch.device("meta"):
            unet = getattr(diffusers, cls)(**config)
    else:
        family, unet = "sd" if args.size == "sd15" else "sdxl", meta_unet(args.size)
    if args.lora_rank:
        unet.requires_grad_(False)
        model.add_lora(unet, args.lora_rank)
    ctx = SimpleNamespace(cuda=False, precision=common.resolve_precision(args.precision, cuda=True),
                          world=max(1, args.shard), shard=args.shard > 1)
    models = SimpleNamespace(family=family, unet=unet, vae=None, text_encoder=None, text_encoder_2=None)
    plan = model.memory_plan(models, [p for p in unet.parameters() if p.requires_grad], args.lora_rank > 0,
                             args.optimizer, True, False, ctx, args.quantize_base == "int8")
    print(plan)
    return plan


def write_pickapic(path, n, resolution, seed=0):
    """A Pick-a-Pic v2-schema parquet of n decided pairs of random JPEGs at the training resolution.
    Every image has its own uid, so KTO's per-image labels give n liked and n disliked images."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    rng = np.random.default_rng(seed)
    colors, things = "red green blue yellow purple orange white black".split(), "circle square triangle star dog cat tree".split()

    def jpeg():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(buf, format="JPEG")
        return buf.getvalue()
    first_wins = rng.random(n) < 0.5
    with atomic_path(path) as tmp:  # complete or absent: a kept work_dir never holds half a file
        pq.write_table(pa.table({
            "caption": [f"a {colors[i % len(colors)]} {things[i // len(colors) % len(things)]}" for i in range(n)],
            "jpg_0": [jpeg() for _ in range(n)], "jpg_1": [jpeg() for _ in range(n)],
            "label_0": [1.0 if w else 0.0 for w in first_wins], "label_1": [0.0 if w else 1.0 for w in first_wins],
            "image_0_uid": [f"{i}a" for i in range(n)], "image_1_uid": [f"{i}b" for i in range(n)]}), tmp)
    return path


# -----------------------------------------------------------------------------
# 1. the real step: the trainer itself, timed by its own log

@contextmanager
def cpu_time_at_each_log(marks):
    """Note this process's CPU time whenever the trainer writes a log record (common.log), so that the
    CPU seconds of its last log window can be set beside the floor's. Only observes; changes nothing."""
    import common
    log = common.log

    def log_and_mark(*args, **kwargs):
        marks.append(time.process_time())
        return log(*args, **kwargs)
    common.log = log_and_mark
    try:
        yield
    finally:
        common.log = log


def run_trainer(args, pipe_dir, data, out_dir, cache_dir):
    """Run the real trainer in this process; return (wall s, CPU s) per optimizer step over its last log window.

    The trainer logs every `window` steps and at its last step: with max_steps = window + steps, the
    last window holds exactly the timed steps, and model loading, the cache pass and the first slow
    steps fall before it. The final checkpoint and the export come after it.
    """
    window = max(args.warmup, args.steps)
    argv = ["--pretrained", pipe_dir, "--data", data, "--out_dir", out_dir, "--cache_dir", cache_dir,
            "--max_steps", str(window + args.steps), "--log_every", str(window), "--val_every", "-1",
            "--save_every", "0", "--global_batch", str(args.micro_batch * args.accum),
            "--micro_batch", str(args.micro_batch), "--lora_rank", str(args.lora_rank),
            "--resolution", str(args.resolution), "--seed", str(args.seed), "--precision", args.precision,
            "--optimizer", args.optimizer]
    argv += ["--grad_checkpointing"] if args.grad_checkpointing else []
    marks = []
    with cpu_time_at_each_log(marks):
        if args.algo == "dpo":
            import train_dpo
            train_dpo.main(argv)
        else:
            import train_kto
            train_kto.main(argv + ["--ref_point", args.ref_point])
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])
    assert last["step"] == window + args.steps and len(marks) == 2, f"unexpected log: {last}, {len(marks)} records"
    return args.micro_batch * args.accum / last[f"{args.unit}/s"], (marks[1] - marks[0]) / args.steps


# -----------------------------------------------------------------------------
# 2. the floor: only the compute the objective needs, on the same model, batch and dtype

def run_floor(args, pipe_dir):
    """Time `steps` optimizer steps of bare compute after `warmup` steps; return (wall s, CPU s) per step.

    The UNet goes through the trainers' own model.prepare_policy, so it is the same model: the same
    LoRA adapters (the reference is the adapter-free forward) or, for a full fine-tune, the same frozen
    copy as reference (bf16 on CUDA); the same checkpointing; AdamW as in the trainers. The inputs are
    made once on the device: no data assembly, no metrics, no clipping, no logging.
    """
    from diffusers import UNet2DConditionModel
    from tqdm import tqdm
    import common
    import model
    import parallel
    ctx = common.setup(args.seed, args.precision)
    unet = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet", dtype=torch.float32).to(ctx.device)
    params, reference = model.prepare_policy(unet, args.lora_rank, args.grad_checkpointing, ctx)
    optimizer = parallel.make_optimizer(args.optimizer, params, 1e-5, 1e-2)
    with open(os.path.join(pipe_dir, "vae", "config.json")) as f:  # the VAE halves the side at every level but the last
        side = args.resolution // 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    n = 2 * args.micro_batch if args.algo == "dpo" else args.micro_batch  # DPO: [winners; losers] in one forward
    x_t = torch.randn(n, unet.config.in_channels, side, side, device=ctx.device)
    target = torch.randn_like(x_t)
    t = torch.randint(0, 1000, (n,), device=ctx.device)
    emb = torch.randn(n, 77, unet.config.cross_attention_dim, device=ctx.device)
    mismatched = args.algo == "kto" and args.ref_point == "mismatched"

    cond = {"encoder_hidden_states": emb}
    if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled prompt and six time ids per image
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        cond.update(text_embeds=torch.randn(n, pooled, device=ctx.device),
                    time_ids=torch.tensor([[args.resolution] * 2 + [0, 0] + [args.resolution] * 2] * n, device=ctx.device,
                                          dtype=torch.float32))
    rolled = {k: v if k == "time_ids" else v.roll(1, dims=0) for k, v in cond.items()}  # other images' prompts

    def step():
        for _ in range(args.accum):
            with ctx.autocast():
                reference(x_t, t, cond)  # no grad
                if mismatched:  # the reference point: each image with another image's prompt, both models, no grad
                    reference(x_t, t, rolled)
                    with torch.no_grad():
                        model.denoise(unet, x_t, t, rolled)
                pred = model.denoise(unet, x_t, t, cond)
            (pred.float() - target).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if ctx.cuda else (lambda: None)
    for _ in tqdm(range(args.warmup), desc="floor warm-up", leave=False):
        step()
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in tqdm(range(args.steps), desc="floor", leave=False):
        step()
    sync()
    return (time.perf_counter() - wall) / args.steps, (time.process_time() - cpu) / args.steps


# -----------------------------------------------------------------------------
# main

def main(argv=None):
    args = parser.parse_args(argv)
    if args.size in FLOW_SIZES and not args.plan_only:
        fail(f"--size {args.size}: the memory plan only (--plan_only); a flow transformer's step is timed by no size "
             "here yet (its real configuration does not fit a 2-core CPU's time; tests/test_flow.py runs the tiny ones)")
    defaults = SIZE_DEFAULTS.get(args.size, SIZE_DEFAULTS["sdxl"])
    for k in ("resolution", "lora_rank", "grad_checkpointing"):
        if getattr(args, k) is None:
            setattr(args, k, defaults[k])
    if args.micro_batch is None:
        args.micro_batch = defaults["pairs"] * (2 if args.algo == "kto" else 1)
    args.unit = "pairs" if args.algo == "dpo" else "images"
    if args.plan_only:
        return print_plan(args)
    if args.shard:
        fail("--shard needs --plan_only: bench.py times one process")
    if args.pretrained and not os.path.exists(os.path.join(args.pretrained, "model_index.json")):
        fail(f"--pretrained {args.pretrained} is not a diffusers pipeline folder (no model_index.json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    batch = args.micro_batch * args.accum
    print(f"bench: {args.size} {args.algo}{' ' + args.ref_point if args.algo == 'kto' else ''}, {batch} {args.unit}/step "
          f"({args.micro_batch} x {args.accum} accumulation), {args.resolution} px, "
          f"{'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full fine-tune'}"
          f"{', gradient checkpointing' if args.grad_checkpointing else ''}, "
          f"{'cuda' if cuda else f'cpu, {torch.get_num_threads()} threads'}, precision {args.precision}, {args.optimizer}")

    work = args.work_dir or tempfile.mkdtemp(prefix="bench-")
    os.makedirs(work, exist_ok=True)
    try:
        # the model, built in a child process so its memory does not count in this process's peak RSS
        pipe_dir = args.pretrained or os.path.join(work, f"pipe-{args.size}")
        if not os.path.exists(os.path.join(pipe_dir, "model_index.json")):
            t0 = time.time()
            subprocess.run([sys.executable, "-c", f"import bench; bench.build_model({args.size!r}, {pipe_dir!r}, {args.seed})"],
                           cwd=ROOT, check=True)
            print(f"built the {args.size} model with random weights in {time.time() - t0:.1f}s: {pipe_dir}")
        if not args.lora_rank:  # a full fine-tune holds weights, gradients and the fp32 reference: does it fit here?
            from safetensors import safe_open
            import parallel
            shapes = []
            for f in sorted(os.listdir(os.path.join(pipe_dir, "unet"))):
                if f.endswith(".safetensors"):
                    with safe_open(os.path.join(pipe_dir, "unet", f), "pt") as sf:  # the header only
                        shapes += [sf.get_slice(k).get_shape() for k in sf.keys()]
            params = [torch.empty(shape, device="meta") for shape in shapes]
            weights = 4 * sum(p.numel() for p in params)
            need = 3 * weights + parallel.optimizer_state_bytes(args.optimizer, params)
            have = torch.cuda.get_device_properties(0).total_memory if cuda else \
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            print(f"full fine-tune: weights, gradients and reference {3 * weights / 2**30:.1f} GB + {args.optimizer} state "
                  f"{(need - 3 * weights) / 2**30:.1f} GB = {need / 2**30:.1f} GB before activations; this machine has "
                  f"{have / 2**30:.1f} GB")
            if need > have:
                print(f"size={args.size} algo={args.algo} lora_rank=0 optimizer={args.optimizer} fits=no "
                      f"need_gb={need / 2**30:.1f} have_gb={have / 2**30:.1f}")
                return {"size": args.size, "fits": "no"}
        # a pair per sample of the run (capped): the timed steps read the data as a first epoch does.
        # Written once per work_dir: a rewritten file has a new mtime, which would invalidate the cache
        n_pairs = min(2048, max(8, (max(args.warmup, args.steps) + args.steps) * batch))
        data = os.path.join(work, f"pickapic-{n_pairs}-{args.resolution}px.parquet")
        if not os.path.exists(data):
            write_pickapic(data, n_pairs, args.resolution, args.seed)

        real, floor, peak_gb = [], [], None
        for r in range(args.repeats):
            # real first on even repeats, floor first on odd ones: a drift of the machine's load, or of this
            # process's state after a run, then favours neither side
            for part in ("real", "floor") if r % 2 == 0 else ("floor", "real"):
                if part == "floor":
                    floor.append(run_floor(args, pipe_dir))
                else:
                    out_dir = os.path.join(work, f"run-{args.algo}-{r}")
                    shutil.rmtree(out_dir, ignore_errors=True)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    real.append(run_trainer(args, pipe_dir, data, out_dir, os.path.join(work, "cache")))
                    if peak_gb is None:  # the trainer's peak, read before the floor has run
                        # ru_maxrss: KiB on Linux, bytes on macOS; this process's life so far (the build ran in a child)
                        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else \
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
                gc.collect()
            print(f"repeat {r + 1}/{args.repeats}: real {real[-1][0]:.4g} s/step ({real[-1][1]:.4g} CPU s), "
                  f"floor {floor[-1][0]:.4g} s/step ({floor[-1][1]:.4g} CPU s), efficiency {floor[-1][0] / real[-1][0]:.3f}")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    # -------------------------------------------------------------------------
    # the figures of the repeat with the median efficiency (the lower one for an even count). Other jobs
    # switch a shared machine between quiet and busy spells minutes long; a repeat whose two parts fell in
    # different spells gives a wild ratio either way, and the median ignores a minority of such repeats
    ratios = [f[0] / r[0] for r, f in zip(real, floor)]
    best = sorted(range(args.repeats), key=lambda r: ratios[r])[(args.repeats - 1) // 2]
    (step_s, step_cpu), (floor_s, floor_cpu) = real[best], floor[best]
    figures = {
        "size": args.size, "algo": args.algo + (f"-{args.ref_point}" if args.algo == "kto" else ""),
        "device": "cuda" if cuda else "cpu", "threads": torch.get_num_threads(), "res": args.resolution,
        "lora_rank": args.lora_rank, "grad_ckpt": int(bool(args.grad_checkpointing)), f"{args.unit}_per_step": batch,
        "precision": args.precision, "optimizer": args.optimizer,
        "steps": args.steps, "repeats": args.repeats,
        f"{args.unit}/s": f"{batch / step_s:.4g}", "s/step": f"{step_s:.4g}",
        f"floor_{args.unit}/s": f"{batch / floor_s:.4g}", "floor_s/step": f"{floor_s:.4g}",
        "efficiency": f"{floor_s / step_s:.3f}",
        "efficiency_per_repeat": ",".join(f"{x:.3f}" for x in ratios),
        "cpu_s/step": f"{step_cpu:.4g}", "floor_cpu_s/step": f"{floor_cpu:.4g}", "cpu_efficiency": f"{floor_cpu / step_cpu:.3f}",
        ("peak_cuda_gb" if cuda else "peak_rss_gb"): f"{peak_gb:.3f}",
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return figures


if __name__ == "__main__":
    main()
