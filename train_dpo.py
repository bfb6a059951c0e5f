"""Diffusion-DPO (Wallace et al. 2024) and the SFT baseline on pairwise feedback.

    python train_dpo.py --pretrained DIR_OR_HUB_ID --data PATH --out_dir DIR --max_steps N [--lora_rank R] [--resume]
    torchrun --standalone --nproc_per_node=8 train_dpo.py ...

Defaults are the paper's SD1.5 run: beta 5000, 2048 pairs per step, AdamW lr 2.048e-5 after 500
warm-up steps, 2000 steps, clip 1.0, 512 px, prompt dropout 0.2. The objective is in losses.py. This
file reads top to bottom: config, processes, data, models and cache, policy and optimizer, resume, the
loop (accumulate, step, log, save, validate), export. The mechanics it calls are in common.py
(processes, draws, logging), parallel.py (DDP or --shard, the optimizers), checkpoints.py, model.py (loading,
LoRA, reference, export), cache.py and public_data.py (every data format; the local ones in data.py).
"""
import math
import os
import time

import torch
from tqdm import tqdm

import checkpoints
import common
import parallel
from cache import open_cache, stack_conditions
from sample import validate
from losses import add_noise_and_target, draw_timestep, dpo_loss, per_sample_error, sft_loss
from model import (denoise, export, flow_shift, gathered_unet, is_flow, load_models, load_trainable_state, memory_plan,
                   prepare_policy, shard_model, trainable_state)
from public_data import load_pairs

# -----------------------------------------------------------------------------
# config: the flags both trainers share are in common.base_parser; these are DPO's own and its defaults

parser = common.base_parser(__doc__.split("\n\n")[0])
parser.add_argument("--loss", choices=["dpo", "sft"], default="dpo", help="dpo: Diffusion-DPO; sft: denoising loss on the preferred images only")
parser.add_argument("--init_from", default="", help="a trainer checkpoint folder (out_dir/checkpoints/step_N) the policy starts from; the reference stays --pretrained")
parser.set_defaults(max_steps=2000, global_batch=2048, lr=2.048e-5, warmup_steps=500, weight_decay=1e-2, prompt_dropout=0.2)


def main(argv=None):
    args = parser.parse_args(argv)
    config = vars(args)

    # -------------------------------------------------------------------------
    # processes, device, precision
    ctx = common.setup(args.seed, args.precision, args.dist_timeout)
    ctx.shard = parallel.use_sharding(args.shard, args.lora_rank, ctx)  # --shard: FSDP2 over the processes
    accum = common.accumulation(args.global_batch, args.micro_batch, ctx.world)
    ctx.say(common.describe_setup(ctx, args.global_batch, args.micro_batch, accum, "pairs"))

    # -------------------------------------------------------------------------
    # data, then models and the one-off cache of latents and text embeddings
    fb = load_pairs(args.data)  # before the models: a wrong data path should not wait for SD1.5 to load
    if len(fb) == 0:
        common.fail(f"no usable pairs in {args.data}: " + fb.summary("pairs"))
    common.check_batch_against_data(args.global_batch, len(fb), "pairs", ctx.say)
    models = load_models(args.pretrained, ctx, args.vae)
    os.makedirs(args.out_dir, exist_ok=True)  # only once data and models are there: a failed start leaves nothing
    cache = open_cache(fb, args, models, ctx)  # --latent_cache: built once and reused, or on the fly
    valid = cache.valid.numpy()
    fb.keep(valid[fb.winner] & valid[fb.loser], "unreadable image")  # a pair needs both images readable
    ctx.say(f"data: {fb.summary('pairs')}; cache {cache.folder}")
    if len(fb) == 0:
        common.fail(f"no usable pairs left in {args.data} after skipping unreadable images")
    keep_frozen = args.val_every >= 0 or args.latent_cache == "none" or args.text_cache == "none"
    if not keep_frozen:  # the VAE and text encoders are needed again only to draw validation images
        models.text_encoder = models.text_encoder_2 = models.vae = None
    unet, noise_scheduler = models.unet, models.noise_scheduler
    latent_shape = cache.latent_shape()  # (C, h, w)
    shift = args.flow_shift or flow_shift(models, latent_shape)  # a flow model's noise levels lean towards noise
    if is_flow(models.family):
        ctx.say(f"flow matching: sigma ~ {args.timestep_sampling}, shift {shift:.3g}")

    # -------------------------------------------------------------------------
    # policy, reference, optimizer, resume
    need_reference = args.loss == "dpo"
    params, reference = prepare_policy(unet, args.lora_rank, args.grad_checkpointing, ctx, need_reference,
                                       args.quantize_base == "int8")
    if args.init_from:  # after prepare_policy: the reference (a copy of the base, or adapters off) stays the base
        load_trainable_state(unet, args.lora_rank > 0, checkpoints.init_weights(args.init_from, args.lora_rank), args.init_from)
    ddp_unet = shard_model(unet, ctx) if ctx.shard else parallel.wrap_ddp(unet, ctx)
    params = [p for p in unet.parameters() if p.requires_grad]  # sharded: the DTensors fully_shard put in their place
    optimizer = parallel.make_optimizer(args.optimizer, params, args.lr, args.weight_decay)
    ctx.say(f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.2f}M "
            f"({'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full UNet'})")
    ctx.say(memory_plan(models, params, args.lora_rank > 0, args.optimizer, need_reference, keep_frozen, ctx,
                        args.quantize_base == "int8"))
    if ctx.master:
        checkpoints.clear_partial_checkpoints(args.out_dir)
    start_step = 0
    if args.resume:
        common.barrier()
        # every flag must match but those checkpoints.MAY_CHANGE_ON_RESUME lists; one an older checkpoint lacks, its default
        defaults = {k: parser.get_default(k) for k in config}
        start_step, weights = checkpoints.resume(args.out_dir, optimizer, config, defaults, ctx.say)
        if weights is not None:
            load_trainable_state(unet, args.lora_rank > 0, weights, args.out_dir)
    if start_step >= args.max_steps:
        ctx.say(f"already at step {start_step} >= --max_steps {args.max_steps}: nothing to train")

    # -------------------------------------------------------------------------
    # a step's batch: each pair's own draws (flip, latents, prompt dropout, noise eps and timestep t)
    def pair_batch(step, micro):
        """This rank's micro-batch: winners, losers, their conditioning (the prompt; for SDXL also each image's
        time ids), one shared (eps, t) per pair."""
        lat_w, lat_l, cond_w, cond_l, eps, t = [], [], [], [], [], []
        for pos in common.global_positions(step, args.global_batch, micro, ctx.rank, args.micro_batch, ctx.world):
            g = common.sample_generator(args.seed, pos)
            epoch, k = divmod(pos, len(fb))
            i = int(common.epoch_order(len(fb), args.seed, epoch)[k])
            w, l = int(fb.winner[i]), int(fb.loser[i])
            flip_w, flip_l = (torch.rand(2, generator=g) < 0.5).tolist()  # flipped independently, as in the paper
            flip_w, flip_l = flip_w and args.random_flip, flip_l and args.random_flip
            lat_w.append(cache.latent(w, flip_w, torch.randn(latent_shape, generator=g)))
            lat_l.append(cache.latent(l, flip_l, torch.randn(latent_shape, generator=g)))
            dropped = torch.rand((), generator=g).item() < args.prompt_dropout
            c = cache.empty_caption if dropped else int(fb.caption_idx[i])
            cond_w.append(cache.condition(c, w, flip_w))
            cond_l.append(cache.condition(c, l, flip_l))
            eps.append(torch.randn(latent_shape, generator=g))  # the same eps and t for w and l of a pair
            t.append(draw_timestep(g, noise_scheduler, args.timestep_sampling, shift))
        on_device = lambda cond: {k: v.to(ctx.device) for k, v in stack_conditions(cond).items()}
        return [torch.stack(x).to(ctx.device) for x in (lat_w, lat_l)] + [on_device(cond_w), on_device(cond_l)] + \
            [torch.stack(x).to(ctx.device) for x in (eps, t)]

    # -------------------------------------------------------------------------
    # the loop: accumulate micro-batches, clip, step; log, save and validate at their intervals
    prompts, seeds = common.val_prompts(args.val_prompts), list(range(args.val_seeds))
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
               disable=not ctx.master, desc="training", dynamic_ncols=True)
    meter, grad_norms, t0 = common.Meter(), [], time.time()
    for step in bar:
        lr = common.lr_at(step, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(accum):
            with parallel.sync_grads(ddp_unet, ctx, micro, accum):  # DDP all-reduces on the last micro-step only
                lat_w, lat_l, cond_w, cond_l, eps, t = pair_batch(step, micro)
                if args.loss == "sft":  # winners only, no reference
                    x_t, target = add_noise_and_target(noise_scheduler, lat_w, eps, t)
                    with ctx.autocast():
                        pred = denoise(ddp_unet, x_t, t, cond_w)
                    loss, metrics = sft_loss(per_sample_error(pred, target))
                else:
                    x0 = torch.cat([lat_w, lat_l])  # (2B,4,h,w): [winners; losers], one forward for both
                    noise, t2 = torch.cat([eps, eps]), torch.cat([t, t])
                    cond = {k: torch.cat([cond_w[k], cond_l[k]]) for k in cond_w}
                    x_t, target = add_noise_and_target(noise_scheduler, x0, noise, t2)
                    with ctx.autocast():
                        ref_err = per_sample_error(reference(x_t, t2, cond), target)  # (2B,) no grad
                        policy_err = per_sample_error(denoise(ddp_unet, x_t, t2, cond), target)  # (2B,)
                    loss, metrics = dpo_loss(policy_err, ref_err, args.beta)
                (loss / accum).backward()
            meter.add({"loss": loss.detach(), **metrics})
        stats = meter.reduce()  # host sync: one small all-reduce a step, so every rank sees a bad loss
        if not math.isfinite(stats["loss"]):
            common.fail(f"non-finite loss at step {step + 1}; stopping before the update. "
                        f"Last good checkpoint: {checkpoints.latest_checkpoint_name(args.out_dir)}")
        grad_norms.append(common.clip_gradients(params, args.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done, last = step + 1, step + 1 == args.max_steps
        if common.due(done, args.log_every, last):
            record = common.window_record(done, meter.window(), grad_norms, lr, len(grad_norms) * args.global_batch,
                                          time.time() - t0, "pairs")
            if ctx.master:
                common.log(args.out_dir, record, bar)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            grad_norms, t0 = [], time.time()
        if common.due(done, args.save_every, last):
            state = parallel.checkpoint_state(trainable_state(unet, args.lora_rank > 0), optimizer, ctx)  # sharded: gathered
            if ctx.master:
                checkpoints.save_checkpoint(args.out_dir, done, *state, config, args.keep_checkpoints)
            common.barrier()
        if args.val_every >= 0 and common.due(done, args.val_every, last):
            if ctx.master or ctx.shard:  # a sharded UNet needs every rank in its forwards; rank 0 writes the grid
                path, secs = validate(args.out_dir, done, models, args.pretrained, prompts, seeds, args.resolution,
                                      ctx, steps=args.val_steps)
                if ctx.master:
                    bar.write(f"validation grid: {path} ({secs:.1f}s)")
            common.barrier()

    # -------------------------------------------------------------------------
    # export: the weights in the layout users load
    unet = gathered_unet(unet, ctx)  # sharded: gathered whole onto rank 0 (every rank takes part)
    if ctx.master:
        export(args.out_dir, args.pretrained, unet, args.lora_rank > 0, args.resolution, args.lora_dtype)
        print(f"saved {'LoRA weights' if args.lora_rank else 'the pipeline'} to {args.out_dir}")
    common.barrier()
    common.cleanup()


if __name__ == "__main__":
    main()
