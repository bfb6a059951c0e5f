"""Diffusion-KTO (Li et al. 2024): fine-tune a text-to-image model from images a person liked or disliked.

    python train_kto.py --pretrained DIR_OR_HUB_ID --data PATH --out_dir DIR --max_steps N [--lora_rank R] [--resume]
    torchrun --standalone --nproc_per_node=4 train_kto.py ...

No pairs are needed: each image carries its own label. Defaults are the paper's SD1.5 run: 8 images per
step (4 GPUs x 2), Adam lr 1e-7 after 1000 warm-up steps, 10,000 steps, beta 5000, liked images drawn
with probability 0.8, 512 px. The objective is in losses.py. This file reads top to bottom like
train_dpo.py: config, processes, data, models and cache, policy and optimizer, resume, the loop, export.
Data layouts (liked/ and disliked/ folders, metadata files, captions in .txt files or in the PNG itself,
Pick-a-Pic or HPDv2 pairs) are described in the README and in public_data.load_singles.
"""
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import checkpoints
import common
import parallel
from cache import open_cache, stack_conditions
from sample import validate
from losses import UTILITIES, add_noise_and_target, draw_timestep, kto_loss, kto_reference_point, per_sample_error
from model import (denoise, export, flow_shift, gathered_unet, is_flow, load_models, load_trainable_state, memory_plan,
                   prepare_policy, shard_model, trainable_state)
from public_data import load_singles

# -----------------------------------------------------------------------------
# config: the flags both trainers share are in common.base_parser; these are KTO's own and its defaults

parser = common.base_parser(__doc__.split("\n\n")[0])
a = parser.add_argument
a("--utility", choices=sorted(UTILITIES), default="sigmoid", help="utility U(u) of the paper's ablation (losses.py)")
a("--ref_point", choices=["batch", "mismatched"], default="batch",
  help="batch: max(0, mean reward of the step's global batch) as the paper's run; mismatched: max(0, mean reward of "
       "the images conditioned on another image's prompt), as the paper's text describes (one more no-grad forward of each model)")
a("--desirable_share", type=float, default=0.8, help="gamma: probability that a drawn image is a liked one")
a("--lambda_d", type=float, default=1.0, help="loss weight of liked (desirable) images")
a("--lambda_u", type=float, default=1.0, help="loss weight of disliked (undesirable) images")
a("--pickapic_policy", choices=["at_least_once", "always"], default="at_least_once",
  help="Pick-a-Pic or HPDv2 pairs -> labels: liked if preferred in at least one pair (the paper), or in every pair")
a("--init_from", default="", help="a trainer checkpoint folder (out_dir/checkpoints/step_N) the policy starts from; the reference stays --pretrained")
a("--continue_from", default="", help="a trainer checkpoint this run continues (online_kto.py's rounds): the policy starts from its "
  "weights, the optimizer from its state (AdamW moments and step count), the learning-rate schedule at its step (no second "
  "warm-up); data, seed and --max_steps are this run's own, the reference stays --pretrained")
parser.set_defaults(max_steps=10000, global_batch=8, micro_batch=2, lr=1e-7, warmup_steps=1000, weight_decay=0.0,
                    prompt_dropout=0.0)


def draw_image(g, desirable, undesirable, gamma):
    """The weighted sampler: a liked image with probability gamma, else a disliked one, uniformly within
    the class (with replacement, like torch's WeightedRandomSampler). Each global-batch position has its
    own generator, so the share is gamma for any number of ranks. Returns (feedback row, label +1/-1)."""
    liked = torch.rand((), generator=g).item() < gamma
    pool = desirable if liked else undesirable
    return int(pool[torch.randint(0, len(pool), (), generator=g)]), 1.0 if liked else -1.0


def main(argv=None):
    args = parser.parse_args(argv)
    config = vars(args)
    if not 0.0 <= args.desirable_share <= 1.0:
        common.fail(f"--desirable_share must be in [0, 1], got {args.desirable_share}")
    if args.ref_point == "mismatched" and args.global_batch < 2:
        common.fail("--ref_point mismatched pairs each image with another image's prompt: it needs --global_batch >= 2")
    if args.init_from and args.continue_from:
        common.fail("--init_from and --continue_from both name a checkpoint to start from: give one")

    # -------------------------------------------------------------------------
    # processes, device, precision
    ctx = common.setup(args.seed, args.precision, args.dist_timeout)
    ctx.shard = parallel.use_sharding(args.shard, args.lora_rank, ctx)  # --shard: FSDP2 over the processes
    accum = common.accumulation(args.global_batch, args.micro_batch, ctx.world)
    ctx.say(common.describe_setup(ctx, args.global_batch, args.micro_batch, accum, "images"))

    # -------------------------------------------------------------------------
    # data, then models and the one-off cache of latents and text embeddings
    fb = load_singles(args.data, args.pickapic_policy)  # before the models: a wrong path should not wait for them
    common.check_batch_against_data(args.global_batch, len(fb), "images", ctx.say)
    models = load_models(args.pretrained, ctx, args.vae)
    os.makedirs(args.out_dir, exist_ok=True)  # only once data and models are there: a failed start leaves nothing
    cache = open_cache(fb, args, models, ctx)  # --latent_cache: built once and reused, or on the fly
    fb.keep(cache.valid.numpy()[fb.image], "unreadable image")
    ctx.say(f"data: {fb.summary('images')}; cache {cache.folder}")
    if len(fb) == 0:
        common.fail(f"no usable images left in {args.data} after skipping unreadable images")
    desirable, undesirable = np.flatnonzero(fb.label > 0), np.flatnonzero(fb.label < 0)
    for name, pool, needed in [("liked", desirable, args.desirable_share > 0), ("disliked", undesirable, args.desirable_share < 1)]:
        if needed and len(pool) == 0:
            common.fail(f"no {name} images in {args.data} ({fb.summary('images')}); KTO needs both kinds, or set --desirable_share")
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
    params, reference = prepare_policy(unet, args.lora_rank, args.grad_checkpointing, ctx,
                                       quantize=args.quantize_base == "int8")
    start, flag = (args.continue_from, "--continue_from") if args.continue_from else (args.init_from, "--init_from")
    if start:  # after prepare_policy: the reference (a copy of the base, or adapters off) stays the base
        load_trainable_state(unet, args.lora_rank > 0, checkpoints.init_weights(start, args.lora_rank, flag), start)
    ddp_unet = shard_model(unet, ctx) if ctx.shard else parallel.wrap_ddp(unet, ctx)
    params = [p for p in unet.parameters() if p.requires_grad]  # sharded: the DTensors fully_shard put in their place
    optimizer = parallel.make_optimizer(args.optimizer, params, args.lr, args.weight_decay)
    # the learning-rate schedule's step of this run's step 0: 0, or where the run it continues stopped (kept in
    # config, so in every checkpoint's state.json, for a run that continues this one)
    config["schedule_start"] = checkpoints.continue_optimizer(args.continue_from, optimizer, args.optimizer) if args.continue_from else 0
    if args.continue_from:
        ctx.say(f"continuing {args.continue_from}: its weights and optimizer state, the learning-rate schedule at step "
                f"{config['schedule_start']} (lr {common.lr_at(config['schedule_start'], args.lr, args.warmup_steps):.3g})")
    ctx.say(f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.2f}M "
            f"({'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full UNet'})")
    ctx.say(memory_plan(models, params, args.lora_rank > 0, args.optimizer, True, keep_frozen, ctx,
                        args.quantize_base == "int8"))
    if ctx.master:
        checkpoints.clear_partial_checkpoints(args.out_dir)
    start_step = 0
    if args.resume:
        common.barrier()
        # every flag must match but those checkpoints.MAY_CHANGE_ON_RESUME lists; one an older checkpoint lacks, its
        # default (before --continue_from, every run's schedule started at step 0)
        defaults = {**{k: parser.get_default(k) for k in config}, "schedule_start": 0}
        start_step, weights = checkpoints.resume(args.out_dir, optimizer, config, defaults, ctx.say)
        if weights is not None:
            load_trainable_state(unet, args.lora_rank > 0, weights, args.out_dir)
    if start_step >= args.max_steps:
        ctx.say(f"already at step {start_step} >= --max_steps {args.max_steps}: nothing to train")

    # -------------------------------------------------------------------------
    # a step's batch: each image's own draws (liked or disliked, flip, latents, prompt dropout, noise eps, timestep t)
    def sample(pos):
        """Every random choice of the image at global position `pos`, from its own generator: (feedback row,
        label +1/-1, flipped, the posterior draw, caption index (the empty one if dropped), eps, t)."""
        g = common.sample_generator(args.seed, pos)
        i, y = draw_image(g, desirable, undesirable, args.desirable_share)
        flip = torch.rand((), generator=g).item() < 0.5 and args.random_flip
        draw = torch.randn(latent_shape, generator=g)
        dropped = torch.rand((), generator=g).item() < args.prompt_dropout
        caption = cache.empty_caption if dropped else int(fb.caption_idx[i])
        eps, t = torch.randn(latent_shape, generator=g), draw_timestep(g, noise_scheduler, args.timestep_sampling, shift)
        return i, y, flip, draw, caption, eps, t

    def image_batch(step, micro):
        """This rank's micro-batch: latents, conditioning, (eps, t), labels of images drawn with share gamma, and
        for --ref_point mismatched each image's conditioning on another image's prompt: the previous image's in the
        global batch (the last one's for the first), so the pairing is the same for any split of the step."""
        lat, cond, other, eps, t, label = [], [], [], [], [], []
        first = step * args.global_batch
        for pos in common.global_positions(step, args.global_batch, micro, ctx.rank, args.micro_batch, ctx.world):
            i, y, flip, draw, caption, e, tt = sample(pos)
            image = int(fb.image[i])
            lat.append(cache.latent(image, flip, draw))
            cond.append(cache.condition(caption, image, flip))
            if args.ref_point == "mismatched":  # the other image's prompt; for SDXL this image's own time ids
                other.append(cache.condition(sample(first + (pos - first - 1) % args.global_batch)[4], image, flip))
            eps.append(e)
            t.append(tt)
            label.append(y)
        on_device = lambda c: {k: v.to(ctx.device) for k, v in stack_conditions(c).items()} if c else None
        return [torch.stack(lat).to(ctx.device), on_device(cond), on_device(other)] + \
            [torch.stack(x).to(ctx.device) for x in (eps, t)] + [torch.tensor(label, device=ctx.device)]

    # -------------------------------------------------------------------------
    # the loop: the step's reference point, then accumulate micro-batches, clip, step; log, save and validate
    prompts, seeds = common.val_prompts(args.val_prompts), list(range(args.val_seeds))
    bar = tqdm(range(start_step, args.max_steps), initial=start_step, total=args.max_steps,
               disable=not ctx.master, desc="training", dynamic_ncols=True)
    # with --ref_point batch and one micro-batch a step per process, the gradient pass gives the rewards too
    one_pass = args.ref_point == "batch" and accum == 1
    meter, grad_norms, t0 = common.Meter(), [], time.time()
    for step in bar:
        lr = common.lr_at(config["schedule_start"] + step, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [image_batch(step, micro) for micro in range(accum)]
        # z_ref = max(0, mean reward) over the WHOLE global batch (losses.kto_reference_point), as in the paper's
        # run (4 GPUs x 2 images, no accumulation), so the objective is the same for any split of the step. Every
        # micro-step's loss needs it, so with accumulation (or --ref_point mismatched) a no-grad pass over the
        # step's micro-batches comes first: it keeps the reference errors for the gradient pass (the reference
        # runs once) and runs the policy once more without gradients (README, Benchmarks: what that costs).
        ref_errs, rewards = [], []
        with torch.no_grad(), ctx.autocast():
            for x0, cond, other, eps, t, label in batches:
                x_t, target = add_noise_and_target(noise_scheduler, x0, eps, t)
                ref_errs.append(per_sample_error(reference(x_t, t, cond), target))  # (B,)
                if args.ref_point == "mismatched":  # each image with another image's prompt, same x_t
                    rewards.append(per_sample_error(reference(x_t, t, other), target) -
                                   per_sample_error(denoise(unet, x_t, t, other), target))
                elif not one_pass:  # the bare UNet: a no-grad forward needs no DDP hooks
                    rewards.append(ref_errs[-1] - per_sample_error(denoise(unet, x_t, t, cond), target))
        if not one_pass:
            z_ref = kto_reference_point(torch.cat(rewards), reduce_sum=common.all_reduce_sum)  # all ranks, all images
        for micro, (x0, cond, other, eps, t, label) in enumerate(batches):
            with parallel.sync_grads(ddp_unet, ctx, micro, accum):  # DDP all-reduces on the last micro-step only
                x_t, target = add_noise_and_target(noise_scheduler, x0, eps, t)
                with ctx.autocast():
                    policy_err = per_sample_error(denoise(ddp_unet, x_t, t, cond), target)  # (B,)
                if one_pass:  # this rank's micro-batch is its whole share of the step: its rewards are these
                    z_ref = kto_reference_point(ref_errs[micro] - policy_err.detach(), reduce_sum=common.all_reduce_sum)
                loss, metrics = kto_loss(policy_err, ref_errs[micro], label, z_ref, args.beta, args.utility,
                                         args.lambda_d, args.lambda_u)
                (loss / accum).backward()  # the mean over the micro-batch; DDP then averages the ranks
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
                                          time.time() - t0, "images")
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
