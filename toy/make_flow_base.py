"""The toy flow base: a tiny SD3-shaped text-to-image model trained from scratch by flow matching on a CPU.

The toy world of make_base.py (colored shapes on gray, captions like "a big blue triangle"), with the
parts and conventions of Stable Diffusion 3 instead of SD1.5, saved in the diffusers layout, so that
`StableDiffusion3Pipeline.from_pretrained(out)` and the trainers' `--pretrained out` take it as they take SD3:
  - AutoencoderKL (16, 32, 32), no quant convs (as SD3's): 32x32 RGB <-> 8x8x4 latents, trained first with
    make_base's own reconstruction loop; SD3's latent convention (z - shift_factor) * scaling_factor, both
    measured on the data (the latents' mean and 1 / std) and stored in the VAE config, where the pipeline
    and the trainers (model.latents_of) read them;
  - two CLIP text encoders with projections and a T5 encoder, random and frozen (SD3 freezes its three),
    conditioning as SD3's pipeline builds it (model.encode_prompts): both CLIPs' penultimate states side by
    side, zero-padded to T5's width, then T5's 256 token states; both pooled projections side by side.
    The CLIP tokenizers stop at --clip_length tokens (SD3's at 77; a toy caption is at most 6): the
    transformer's cost is mostly the text tokens it carries through its joint attention;
  - SD3Transformer2DModel (joint attention over text and 1x1 patches of the 8x8 latents), predicting the
    velocity noise - x0 at x_sigma = (1 - sigma) x0 + sigma noise, sigma logit-normal and shifted by the
    scheduler's shift (losses.flow_draw_u, flow_sigma, flow_noise_and_target: what the trainers draw),
    10% of captions dropped so that classifier-free guidance works;
  - FlowMatchEulerDiscreteScheduler with --shift, what the pipeline samples with.
At the end it prints the color check: the share of samples whose dominant color is the caption's color.

    python -m toy.make_flow_base --out toy/data/flow_base --threads 1    # color check 87.5%, 7.4 min on a 2-core
                                                    # CPU busy with other jobs (vae 196 s, transformer 225 s)

The transformer's settings came from a sweep (one run each, 1500 steps of 32, the same VAE; color check of 72):
width 32, lr 1e-3, shift 1.0: 68.1%; lr 2e-3: 86.1%; lr 2e-3 for 1000 steps: 66.7%; width 48 (3 heads), lr 1e-3:
91.7% but 1.2-1.5x slower a step; lr 2e-3 with SD3's own shift 3.0: 90.3% (the defaults). Its cost is mostly the
272 text tokens every block carries (16 CLIP positions, both encoders' states side by side, then T5's 256), not the
64 image tokens: 0.12-0.19 s a step of 32 images on one thread. Two threads per process on a busy 2-core machine ran
several times slower.
"""
import json
import os
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from losses import flow_draw_u, flow_noise_and_target, flow_sigma
from model import denoise, encode_prompts, latents_of
from toy.make_base import encode_all, finish, start, train_vae, warmup_cosine, world_parser
from toy.models import VOCAB, write_t5_tokenizer, write_tokenizer


def get_args(argv=None):
    p = world_parser(__doc__, "toy/data/flow_base")
    p.add_argument("--vae_from", default="", help="take the trained VAE of another flow base instead (to sweep the rest)")
    p.add_argument("--steps", type=int, default=1500, help="transformer training steps")
    p.add_argument("--batch", type=int, default=32, help="images per transformer step")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of the transformer")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (the last one's text stream ends early)")
    p.add_argument("--heads", type=int, default=2, help="attention heads")
    p.add_argument("--head_dim", type=int, default=16, help="dims per head; the width is heads x head_dim")
    p.add_argument("--patch", type=int, default=1, help="latent patch side of one image token (8x8 latents)")
    p.add_argument("--shift", type=float, default=3.0,
                   help="the scheduler's shift of the noise levels, for training and sampling (SD3: 3.0 at 1024 px)")
    p.add_argument("--clip_length", type=int, default=16, help="tokens of each CLIP tokenizer (SD3: 77)")
    return p.parse_args(argv)


def build_flow_pipeline(out_dir, args):
    """A random-weight SD3-shaped toy pipeline (StableDiffusion3Pipeline), tokenizers written to out_dir."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.manual_seed(args.seed)
    toks = []
    for name in ("tokenizer", "tokenizer_2"):
        tok = write_tokenizer(os.path.join(out_dir, name), VOCAB)
        tok.model_max_length = args.clip_length  # what the pipeline and the trainers pad and cut to
        tok.save_pretrained(os.path.join(out_dir, name))
        toks.append(tok)
    tok_3 = write_t5_tokenizer(os.path.join(out_dir, "tokenizer_3"), VOCAB)
    clip = lambda tok: CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, projection_dim=16))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok_3), d_model=48, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 pad_token_id=tok_3.pad_token_id, eos_token_id=tok_3.eos_token_id,
                                 decoder_start_token_id=0))
    width = args.heads * args.head_dim
    # joint_attention_dim: T5's width (the two CLIPs' 16 + 16 are zero-padded to it, as SD3's 768 + 1280 to 4096);
    # pooled_projection_dim: the two pooled projections side by side; caption_projection_dim: the width
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=args.patch, in_channels=4, out_channels=4, num_layers=args.layers,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=48,
        caption_projection_dim=width, pooled_projection_dim=32, pos_embed_max_size=8 // args.patch)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, layers_per_block=1, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=args.shift),
                                    vae=vae, text_encoder=clip(toks[0]), tokenizer=toks[0], text_encoder_2=clip(toks[1]),
                                    tokenizer_2=toks[1], text_encoder_3=t5, tokenizer_3=tok_3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def embed_captions(pipe, captions):
    """The captions' conditioning as the trainers build it (model.encode_prompts, equal to the pipeline's
    encode_prompt): hidden states (N, clip_length + 256, 48) and pooled embeddings (N, 32)."""
    parts = SimpleNamespace(family="sd3", **{k: getattr(pipe, k) for k in (
        "tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder", "text_encoder_2", "text_encoder_3")})
    return encode_prompts(parts, captions, "cpu")


def train_transformer(pipe, lat_mean, lat_std, caption_idx, states, pooled, args, gen):
    """Flow matching: predict the velocity noise - x0 at x_sigma = (1 - sigma) x0 + sigma noise, conditioned on the
    caption; sigma drawn as the trainers draw it (logit-normal u, shifted by the scheduler's shift)."""
    net, empty = pipe.transformer, len(states) - 1  # the last caption is ""
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps))
    net.train()
    bar = tqdm(range(args.steps), desc="transformer", disable=args.quiet, mininterval=2.0)
    for step in bar:
        i = torch.randint(0, len(lat_mean), (args.batch,), generator=gen)
        x0 = lat_mean[i] + lat_std[i] * torch.randn(lat_mean[i].shape, generator=gen)  # (B, 4, 8, 8) a posterior draw
        noise = torch.randn(x0.shape, generator=gen)
        sigma = flow_sigma(torch.stack([flow_draw_u(gen) for _ in range(args.batch)]), args.shift)  # (B,)
        x_sigma, target = flow_noise_and_target(x0, noise, sigma)
        c = caption_idx[i]
        c = torch.where(torch.rand(args.batch, generator=gen) < args.caption_dropout, empty, c)
        pred = denoise(net, x_sigma, 1000 * sigma, {"encoder_hidden_states": states[c], "text_embeds": pooled[c]})
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")  # host-device sync, every 50 steps only
    net.eval().requires_grad_(False)
    return loss.item()


def main(argv=None):
    args = get_args(argv)
    t_start = time.time()
    images, captions, unique, gen, timings = start(args)

    os.makedirs(args.out, exist_ok=True)
    pipe = build_flow_pipeline(args.out, args)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"vae {count(pipe.vae):.2f}M params, transformer {count(pipe.transformer):.3f}M params ({args.layers} blocks, "
          f"width {args.heads * args.head_dim}, patch {args.patch}), text encoders frozen at random init, "
          f"threads {torch.get_num_threads()}")

    t0 = time.time()
    if args.vae_from:
        from diffusers import AutoencoderKL
        pipe.vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").requires_grad_(False)
        with open(os.path.join(args.vae_from, "toy_base.json")) as f:
            vae_mse = json.load(f)["vae_mse"]
        print(f"vae: from {args.vae_from} (reconstruction mse {vae_mse:.4f})")
    else:
        vae_mse = train_vae(pipe.vae, images, args, gen)  # make_base's loop
        print(f"vae: {args.vae_steps} steps of {args.vae_batch} in {time.time() - t0:.0f}s, "
              f"reconstruction mse {vae_mse:.4f}")
    timings["vae"] = time.time() - t0

    t0 = time.time()
    mean, std = encode_all(pipe.vae, images)
    # SD3's convention: latents (z - shift_factor) * scaling_factor, about zero mean and unit variance; SD3's VAE
    # has 0.0609 and 1.5305, ours are measured here and stored in its config, where pipeline and trainers read them
    shift_factor, scaling_factor = float(mean.mean()), float(1.0 / mean.std())
    pipe.vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    lat_mean, lat_std = latents_of(pipe.vae, mean, std)  # what the trainers' cache holds
    caption_idx = torch.tensor([unique.index(c) for c in captions])
    states, pooled = embed_captions(pipe, unique + [""])  # the text encoders are frozen: once per caption
    timings["encode"] = time.time() - t0
    print(f"encoded latents {tuple(lat_mean.shape[1:])}, shift_factor {shift_factor:.3f}, scaling_factor "
          f"{scaling_factor:.3f}; captions {tuple(states.shape[1:])} + pooled {tuple(pooled.shape[1:])}, "
          f"in {timings['encode']:.1f}s")

    t0 = time.time()
    loss = train_transformer(pipe, lat_mean, lat_std, caption_idx, states, pooled, args, gen)
    timings["transformer"] = time.time() - t0
    print(f"transformer: {args.steps} steps of {args.batch} in {timings['transformer']:.0f}s, last loss {loss:.4f} "
          f"(shift {args.shift})")

    return finish(pipe, args, timings, t_start, f"Euler (shift {args.shift})",
                  {"vae_mse": vae_mse, "transformer_loss": loss})


if __name__ == "__main__":
    main()
