"""Time the real training step against the bare compute it cannot avoid, for a model size built from config.

    python tools/bench.py --size small                         # DPO, full fine-tune; target: efficiency >= 0.85 on 2 cores
    python tools/bench.py --size small --algo kto --ref_point mismatched
    python tools/bench.py --size sd15 --steps 3 --warmup 1     # the real SD1.5 UNet: LoRA + gradient checkpointing, 128 px
    python tools/bench.py --size sdxl --precision bf16 --steps 3 --warmup 1   # the real SDXL UNet, likewise, bf16 autocast
    python tools/bench.py --size flux1 --blocks 2 --precision bf16 --steps 2 --warmup 1 --threads 1
        # FLUX.1 [dev]'s real transformer cut to 2 double- and 2 single-stream blocks: LoRA 16 + checkpointing, 256 px
        # (sd35m, sd35l, klein4b likewise; without --blocks the real depth, for a GPU: add --resolution 1024)

For the named size (random weights, toy/models.py or build_model), on the current device (CUDA if available):
1. the real step: train_dpo.main (or train_kto.main) runs in this process on a synthetic Pick-a-Pic
   parquet, logging so that its last log window holds exactly the timed steps; its pairs/s (images/s)
   is read back from out_dir/log.jsonl. Nothing of the trainer is re-implemented here.
2. the floor: the same model, batch and dtype doing nothing but the policy forward+backward (on the
   2B stacked latents of B pairs for DPO, on B images for KTO), the reference forward and the
   optimizer step; for KTO's mismatched reference point also one more no-grad forward of each model.
3. efficiency = floor time per step / real time per step: the share of a step spent on the compute
   the method needs. The rest is data assembly, metrics, clipping, logging: the trainer's overhead.

The flow sizes (sd35m, sd35l, flux1, klein4b) run the real transformer configuration; the full depth at 1024 px does
not fit a 2-core CPU's time (nor FLUX.1 [dev] its 24 GB of RAM, even in bf16), so --blocks N keeps N blocks of each
kind and every width. The trainer's overhead per step hardly depends on the depth (it reads the same text states and
latents at any depth), so the efficiency at N blocks is a lower bound for the full depth's.

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
# the flow sizes: LoRA r16 as the README's flow commands, checkpointing as at 1024 px; 256 px keeps a CPU run short
FLOW_DEFAULTS = dict(resolution=256, pairs=1, lora_rank=16, grad_checkpointing=True)
# the flow families' real transformers (their transformer/config.json): family, class, config
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
a("--size", choices=list(SIZE_DEFAULTS) + list(FLOW_SIZES), default="small", help="tiny/small: SD-shaped toys (toy/models.py); sd15, sdxl: the real SD1.5 / SDXL UNet configuration, random weights; sd35m, sd35l, flux1, klein4b: the real SD3.5 Medium / Large, FLUX.1 [dev], FLUX.2 [klein] base 4B transformer, random weights, lean text encoders and VAE of the real output shapes (default: %(default)s)")
a("--blocks", type=int, default=0, help="flow sizes: build the transformer with only N blocks of each kind it has (SD3.5: N joint blocks, Medium's dual-attention ones first; FLUX.1, FLUX.2: N double- and N single-stream blocks), every other value of the real configuration kept (widths, heads, text length); 0: the real depth. Efficiency at N blocks is a lower bound for the full depth: the trainer's fixed overhead per step is spread over less compute (default: %(default)s)")
a("--precision", choices=PRECISIONS, default="auto", help="the trainers' --precision: auto is bf16 on CUDA, fp32 on the CPU; bf16 runs under CPU autocast too (default: %(default)s)")
a("--optimizer", choices=["adamw", "adafactor"], default="adamw", help="the trainers' --optimizer (default: %(default)s)")
a("--algo", choices=["dpo", "kto"], default="dpo", help="which trainer to time: train_dpo.py or train_kto.py (default: %(default)s)")
a("--ref_point", choices=["batch", "mismatched"], default="batch", help="KTO only: reference-point mode; mismatched costs one more no-grad forward of each model (default: %(default)s)")
a("--steps", type=int, default=20, help="optimizer steps timed, after warm-up (default: %(default)s)")
a("--warmup", type=int, default=5, help="untimed warm-up steps of the floor; the trainer warms up for max(--warmup, --steps) steps, the length of its log windows (default: %(default)s)")
a("--micro_batch", type=int, help="pairs (DPO) or images (KTO) per forward (default: tiny/small 4 pairs or 8 images, sd15, sdxl and the flow sizes 1 pair or 2 images)")
a("--accum", type=int, default=1, help="micro-batches per optimizer step; the trainer's --global_batch is micro_batch x accum (default: %(default)s)")
a("--lora_rank", type=int, help="0: full fine-tune; R>0: LoRA adapters of rank R (default: tiny/small 0, sd15, sdxl 8, the flow sizes 16)")
a("--resolution", type=int, help="training image side in px (default: tiny 32, small 64, sd15, sdxl 128, the flow sizes 256)")
a("--grad_checkpointing", action=argparse.BooleanOptionalAction, help="recompute activations in backward (default: on for sd15, sdxl and the flow sizes)")
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

def build_model(size, out_dir, seed=0, blocks=0):
    """Save a random-weight pipeline of the named size in the diffusers layout to out_dir.

    tiny/small: toy.models.build_pipeline. sd15: SD1.5's real UNet with a lean VAE and text encoder.
    Why lean: toy.models.build_pipeline(dir, "sd15") took 59 s on our 2-core CPU, nearly all of it in
    torch's CPU random number generator (about 20M values/s; numpy's is no faster there) initialising
    the UNet's weights. Here the UNet is made on the meta device and its weights are filled from one random
    pool (fill_random). The VAE and text encoder only feed the one-off cache, never a training step, so they
    are small: a 1-layer CLIP text encoder of width 768 (the UNet's cross-attention width) and a narrow VAE
    with SD1.5's 4 levels (8x down-sampling, 4 latent channels). The flow sizes: build_flow_model.
    """
    if size in FLOW_SIZES:
        return build_flow_model(size, out_dir, seed, blocks)
    if size not in ("sd15", "sdxl"):
        from toy.models import build_pipeline
        build_pipeline(out_dir, size, seed=seed)
        return
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection
    from toy.models import write_tokenizer
    torch.manual_seed(seed)
    unet = meta_unet(size)
    unet = unet.to_empty(device="cpu")  # uninitialised memory; every parameter is written below (no buffers)
    fill_random(unet)
    tok = write_tokenizer(os.path.join(out_dir, "tokenizer"))
    vae = lean_vae(4)
    # SD1.5's scheduler settings, as in toy/models.py
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if size == "sd15":
        StableDiffusionPipeline(vae=vae, text_encoder=lean_clip(tok, 768), tokenizer=tok, unet=unet, scheduler=scheduler,
                                safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(out_dir, safe_serialization=True)
    else:  # SDXL's two encoders: widths 768 and 1280 (2048 together), the second with a 1280-d projection
        tok_2 = write_tokenizer(os.path.join(out_dir, "tokenizer_2"))
        StableDiffusionXLPipeline(vae=vae, text_encoder=lean_clip(tok, 768),
                                  text_encoder_2=lean_clip(tok, 1280, CLIPTextModelWithProjection, projection_dim=1280),
                                  tokenizer=tok, tokenizer_2=tok_2, unet=unet,
                                  scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)


def fill_random(net):
    """Write random weights into `net`'s parameters (uninitialised CPU memory), fast: each weight is a slice, at a
    random offset, of one pool of normal values (33.5M, or the largest weight's size if more: FLUX.2's fused
    projection has 85M), scaled to torch's default std 1/sqrt(3 fan_in); norm scales start at 1, biases at 0.
    Weights overlap, which changes no FLOP."""
    pool = torch.randn(max(1 << 25, max(p.numel() for p in net.parameters())))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:  # conv and linear weights
                start = int(torch.randint(0, len(pool) - p.numel() + 1, ()))
                torch.mul(pool[start:start + p.numel()].view(p.shape), 1 / math.sqrt(3 * p[0].numel()), out=p)
            else:  # the 1-d weights are the norms' scales (GroupNorm, LayerNorm, RMSNorm); the rest are biases
                p.fill_(1.0 if name.endswith("weight") else 0.0)


def lean_clip(tok, hidden, cls=None, **kw):
    """A 1-layer CLIP text encoder of the real width `hidden`: it only feeds the one-off cache, never a step."""
    from transformers import CLIPTextConfig, CLIPTextModel
    return (cls or CLIPTextModel)(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=1,
        num_attention_heads=hidden // 64, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw))


def lean_vae(latent_channels, cls=None, **kw):
    """A narrow VAE (32 channels) with the real ones' 4 levels (8x down-sampling) and `latent_channels`."""
    from diffusers import AutoencoderKL
    return (cls or AutoencoderKL)(in_channels=3, out_channels=3, latent_channels=latent_channels,
                                  block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, layers_per_block=1,
                                  sample_size=512, **kw)


def flow_config(size, blocks=0):
    """(family, class name, config) of a flow size's real transformer; blocks > 0 keeps only that many blocks of each
    kind (SD3.5 Medium's dual-attention blocks, its first 13, stay first), every other value as it is."""
    family, cls, config = FLOW_SIZES[size]
    config = dict(config)
    if blocks:
        for key in ("num_layers", "num_single_layers"):
            if key in config:
                config[key] = min(blocks, config[key])
        if "dual_attention_layers" in config:
            config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < config["num_layers"])
    return family, cls, config


def build_flow_model(size, out_dir, seed=0, blocks=0):
    """A flow size's pipeline: the real transformer configuration (cut to `blocks`, flow_config) with random weights,
    and lean text encoders and VAE that give the conditioning and latents of the real shapes (model.encode_prompts,
    model.latents_of), saved as the family's pipeline class, so the trainers' --pretrained takes it as the real one.
    The layouts follow toy/models.py's tiny builders (the widths here are the real ones):
    - sd3: two 1-layer CLIP encoders with projections, widths 768 and 1280 (pooled 768 + 1280 = 2048), a 1-layer T5
      of width 4096 (77 + 256 tokens x 4096); a VAE of 16 channels with SD3's shift and scale.
    - flux: a 1-layer CLIP of width 768 (its pooled output) and the T5 of width 4096 (512 tokens); FLUX.1's VAE factors.
    - flux2: a Qwen3 of width 2560 and 36 thin layers (the pipeline reads the states after layers 9, 18, 27: 512 x 7680),
      the FLUX.2 VAE's 32 channels with made-up batch-norm statistics (patchified to 128).
    The transformer's parameters are made on the meta device and filled by fill_random; its buffers (SD3's sin-cos
    table of positions) are computed as usual: accelerate's init_empty_weights (accelerate comes with peft) puts
    only the parameters on the meta device."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection, Qwen3Config, Qwen3ForCausalLM, T5Config, T5EncoderModel
    from toy.models import write_qwen_tokenizer, write_t5_tokenizer, write_tokenizer
    family, cls, config = flow_config(size, blocks)
    torch.manual_seed(seed)
    with init_empty_weights(include_buffers=False):
        transformer = getattr(diffusers, cls)(**config)
    for module in transformer.modules():  # meta -> uninitialised CPU memory, written by fill_random
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(torch.empty(p.shape), requires_grad=p.requires_grad))
    fill_random(transformer)

    def t5(tok):  # one thin layer of T5-XXL's width
        return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=4096, d_kv=64, d_ff=64, num_layers=1, num_heads=1,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                       decoder_start_token_id=0))
    # FLUX's scheduler config (toy/models.py): the shift grows with the number of image tokens; FLUX.2 [klein] uses it too
    flux_scheduler = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                          max_image_seq_len=4096)
    if family == "sd3":
        tok, tok_2 = write_tokenizer(os.path.join(out_dir, "tokenizer")), write_tokenizer(os.path.join(out_dir, "tokenizer_2"))
        tok_3 = write_t5_tokenizer(os.path.join(out_dir, "tokenizer_3"))
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=lean_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=lean_clip(tok, 768, CLIPTextModelWithProjection, projection_dim=768), tokenizer=tok,
            text_encoder_2=lean_clip(tok, 1280, CLIPTextModelWithProjection, projection_dim=1280), tokenizer_2=tok_2,
            text_encoder_3=t5(tok_3), tokenizer_3=tok_3)
    elif family == "flux":
        tok, tok_2 = write_tokenizer(os.path.join(out_dir, "tokenizer")), write_t5_tokenizer(os.path.join(out_dir, "tokenizer_2"))
        pipe = diffusers.FluxPipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**flux_scheduler),
            vae=lean_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=lean_clip(tok, 768), tokenizer=tok, text_encoder_2=t5(tok_2), tokenizer_2=tok_2)
    else:  # flux2
        tok = write_qwen_tokenizer(os.path.join(out_dir, "tokenizer"))
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tok), hidden_size=config["joint_attention_dim"] // 3, intermediate_size=64, num_hidden_layers=36,
            num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
            tie_word_embeddings=True, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id))
        vae = lean_vae(32, AutoencoderKLFlux2)
        with torch.no_grad():  # the real statistics were measured on data; made-up ones, not 0 and 1, as the toy's
            vae.bn.running_mean.normal_(0, 0.5)
            vae.bn.running_var.uniform_(0.5, 2.0)
        pipe = diffusers.Flux2KleinPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**flux_scheduler),
                                            vae=vae, text_encoder=text_encoder, tokenizer=tok, is_distilled=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)


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
        family, cls, config = flow_config(args.size, args.blocks)
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

    The denoiser (UNet or transformer) is loaded as the trainers load it (model.load_models) and goes through their
    own model.prepare_policy, so it is the same model: the same LoRA adapters (the reference is the adapter-free
    forward) or, for a full fine-tune, the same frozen copy as reference; the same checkpointing; AdamW as in the
    trainers. It is called as the trainers call it, model.denoise (FLUX's packing and position ids, the guidance
    input, a flow model's timestep 1000 sigma). The inputs are made once on the device, of the family's real
    shapes: the conditioning from the pipeline's own text encoders (model.encode_prompts), the latents of
    model.latent_shape; then no data assembly, no metrics, no clipping, no logging.
    """
    from tqdm import tqdm
    import common
    import losses
    import model
    import parallel
    ctx = common.setup(args.seed, args.precision)
    models = model.load_models(pipe_dir, ctx)
    n = 2 * args.micro_batch if args.algo == "dpo" else args.micro_batch  # DPO: [winners; losers] in one forward
    with torch.no_grad():  # the conditioning, once: (n, L, d) and the pooled (n, d2) or None
        emb, pooled = model.encode_prompts(models, [f"a {c} circle" for c in ("red", "green", "blue", "white") * n][:n],
                                           ctx.device)
    cond = {"encoder_hidden_states": emb.float()}
    if pooled is not None:  # SDXL, SD3, FLUX.1
        cond["text_embeds"] = pooled.float()
    if models.family == "sdxl":  # and six time ids per image
        cond["time_ids"] = model.time_ids((args.resolution,) * 2, (0, 0), (args.resolution,) * 2).repeat(n, 1).to(ctx.device)
    shape = model.latent_shape(models.vae, args.resolution)  # (C, h, w)
    models.text_encoder = models.text_encoder_2 = models.text_encoder_3 = models.vae = None  # freed, as the trainers do
    unet = models.unet
    params, reference = model.prepare_policy(unet, args.lora_rank, args.grad_checkpointing, ctx)
    optimizer = parallel.make_optimizer(args.optimizer, params, 1e-5, 1e-2)
    x_t = torch.randn(n, *shape, device=ctx.device)
    target = torch.randn_like(x_t)
    g = torch.Generator().manual_seed(args.seed)  # a UNet's t in [0, 1000), a flow model's 1000 sigma
    shift = model.flow_shift(models, shape)
    t = torch.stack([losses.draw_timestep(g, models.noise_scheduler, "logit_normal", shift) for _ in range(n)]).to(ctx.device)
    mismatched = args.algo == "kto" and args.ref_point == "mismatched"
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
    if args.blocks and args.size not in FLOW_SIZES:
        fail(f"--blocks cuts a flow size's transformer ({', '.join(FLOW_SIZES)}); --size {args.size} is a UNet")
    if args.blocks and args.pretrained:
        fail("--blocks cuts the model bench.py builds; --pretrained is timed as it is")
    defaults = SIZE_DEFAULTS.get(args.size, FLOW_DEFAULTS)
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
    blocks = f" ({args.blocks} blocks of each kind)" if args.blocks else ""
    print(f"bench: {args.size}{blocks} {args.algo}{' ' + args.ref_point if args.algo == 'kto' else ''}, {batch} {args.unit}/step "
          f"({args.micro_batch} x {args.accum} accumulation), {args.resolution} px, "
          f"{'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full fine-tune'}"
          f"{', gradient checkpointing' if args.grad_checkpointing else ''}, "
          f"{'cuda' if cuda else f'cpu, {torch.get_num_threads()} threads'}, precision {args.precision}, {args.optimizer}")

    work = args.work_dir or tempfile.mkdtemp(prefix="bench-")
    os.makedirs(work, exist_ok=True)
    try:
        # the model, built in a child process so its memory does not count in this process's peak RSS
        pipe_dir = args.pretrained or os.path.join(work, f"pipe-{args.size}" + (f"-{args.blocks}blocks" if args.blocks else ""))
        if not os.path.exists(os.path.join(pipe_dir, "model_index.json")):
            t0 = time.time()
            subprocess.run([sys.executable, "-c", f"import bench; bench.build_model({args.size!r}, {pipe_dir!r}, {args.seed}, "
                            f"{args.blocks})"], cwd=os.path.join(ROOT, "tools"), check=True)  # (bench.py's folder)
            print(f"built the {args.size} model with random weights in {time.time() - t0:.1f}s: {pipe_dir}")
        depth = {}  # a flow transformer's blocks, as timed: joint blocks (SD3), or double + single-stream (FLUX)
        if os.path.exists(os.path.join(pipe_dir, "transformer", "config.json")):
            with open(os.path.join(pipe_dir, "transformer", "config.json")) as f:
                config = json.load(f)
            depth["blocks"] = "+".join(str(config[k]) for k in ("num_layers", "num_single_layers") if k in config)
        if not args.lora_rank:  # a full fine-tune holds weights, gradients and the fp32 reference: does it fit here?
            from safetensors import safe_open
            import model
            import parallel
            shapes, net = [], os.path.join(pipe_dir, model.DENOISER[model.family_of(pipe_dir)])  # unet/ or transformer/
            for f in sorted(os.listdir(net)):
                if f.endswith(".safetensors"):
                    with safe_open(os.path.join(net, f), "pt") as sf:  # the header only
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
        "size": args.size, **depth,
        "algo": args.algo + (f"-{args.ref_point}" if args.algo == "kto" else ""),
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
