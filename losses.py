"""The objectives of Diffusion-DPO, Diffusion-KTO and SFT, as pure functions.

Read this file first: it is the whole method. Every function takes per-sample tensors and returns
a scalar loss plus a dict of detached metrics, one value per sample (NaN where a metric does not apply to
that sample), so that a log can average them over all the images of a step, however the step is split
across processes and micro-batches; nothing here knows about models, data or processes.

Notation (the papers'): x0 an image latent, c a prompt embedding, t ~ U{0..T-1}, eps ~ N(0, I),
x_t = add_noise(x0, eps, t) (for flow models, SD3 and FLUX: x_sigma and a velocity target, below). The per-sample
denoising error of a model m is

    e_m(x0, c) = mean over C,H,W of (m(x_t, t, c) - target)^2            (B,)

and the implicit reward of a sample is r = e_ref - e_theta: positive when the policy (theta, being
trained) denoises the sample better than the frozen reference (ref). It stands for
log pi_theta / pi_ref up to constants that are folded into beta. Policy and reference must see the
SAME x_t, t, eps and c for a sample; the trainers guarantee that.

Deliberate choices, each discussed where it is made:
- DPO uses the official code's parameterization: u = -(beta/2)(Delta_theta - Delta_ref), beta 5000.
  The diffusers example writes u = -beta'(Delta_theta - Delta_ref) with beta' = 2500: the same objective.
- The log-sigmoid is taken per pair and only then averaged (one public version averaged inside it).
- KTO's reference point is clamped at 0 in both modes: it estimates a KL divergence, which is >= 0
  (KTO, Ethayarajh et al. 2024, does the same).
"""
import torch
import torch.nn.functional as F


def diffusion_target(scheduler, x0, noise, t):
    """What the UNet is trained to predict: eps, or v for v-prediction models (SD2-v, not SD1.5)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r} (expected 'epsilon' or 'v_prediction')")


def is_flow_scheduler(scheduler):
    """A flow-matching model's scheduler (SD3's FlowMatchEulerDiscreteScheduler) rather than a diffusion one (DDPM)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def draw_timestep(generator, scheduler, scheme="logit_normal", shift=1.0):
    """One sample's timestep t from its own generator, on the scale the trainers pass around, [0, T) with T = 1000:
    a diffusion model's t ~ U{0..T-1} (the papers'); a flow model's t = T sigma, sigma drawn by `scheme` and
    shifted by `shift` (the model's: SD3 3.0, FLUX by image size; model.flow_shift), as below."""
    num_timesteps = scheduler.config.num_train_timesteps
    if not is_flow_scheduler(scheduler):
        return torch.randint(0, num_timesteps, (), generator=generator)
    return num_timesteps * flow_sigma(flow_draw_u(generator, scheme), shift)


def add_noise_and_target(scheduler, x0, noise, t):
    """x_t = add_noise(x0, eps, t) and what the model must predict from it (for a flow model x_sigma at
    sigma = t / T and the velocity, flow_noise_and_target). (B,C,h,w) each."""
    if is_flow_scheduler(scheduler):
        return flow_noise_and_target(x0, noise, t / scheduler.config.num_train_timesteps)
    return scheduler.add_noise(x0, noise, t), diffusion_target(scheduler, x0, noise, t)


# ------------------------------------------------------------------------------------------------
# Flow matching (SD3 / SD3.5, FLUX): another noising, another target; the objectives below are unchanged
#
# A flow model does not predict the noise of x_t; it predicts the velocity along a straight path from the image
# to the noise (rectified flow; SD3, Esser et al. 2024, arXiv 2403.03206, section 2):
#
#     x_sigma = (1 - sigma) * x0 + sigma * eps,   sigma in [0, 1]     (sigma = 0: the image, 1: pure noise)
#     v       = d x_sigma / d sigma = eps - x0                         (the target: the same for every sigma)
#
# and its per-sample error e = mean (v_theta(x_sigma, sigma, c) - v)^2 takes the place of the noise error. Flow-DPO
# (Liu et al. 2025, arXiv 2501.13918) is Diffusion-DPO on exactly this error, and KTO and SFT carry over the same way:
# dpo_loss, kto_loss and sft_loss take per-sample errors and never ask which kind they are.
# sigma is drawn per sample instead of t ~ U{0..T-1}: u from a density on (0, 1) (SD3's logit-normal by default,
# as diffusers' SD3 and FLUX trainers do), then shifted towards noise (flow_sigma). The transformers take
# 1000 * sigma as their timestep input.

FLOW_SCHEMES = ("logit_normal", "mode", "uniform")


def flow_draw_u(generator, scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
    """One draw u in (0, 1) from a per-sample CPU generator (SD3, section 3.1; diffusers'
    compute_density_for_timestep_sampling, drawing exactly what it draws for batch size 1 and this generator):
    logit_normal: u = sigmoid(n), n ~ N(mean, std), most mass in the middle, where the velocity is hardest to guess;
    mode: u = 1 - w - s (cos^2(pi w / 2) - 1 + w), w ~ U(0, 1), a heavier middle (s = mode_scale);
    uniform: u ~ U(0, 1)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, size=(1,), generator=generator))[0]
    w = torch.rand(1, generator=generator)[0]
    if scheme == "mode":
        return 1 - w - mode_scale * (torch.cos(torch.pi * w / 2) ** 2 - 1 + w)
    if scheme == "uniform":
        return w
    raise ValueError(f"unknown timestep scheme {scheme!r} (expected one of {', '.join(FLOW_SCHEMES)})")


def flow_sigma(u, shift=1.0):
    """The noise level of a draw u, shifted towards noise: sigma = shift u / (1 + (shift - 1) u) (SD3, eq. 23).
    A larger image keeps more of its signal at a given sigma, so it needs more of its training at high noise:
    SD3 uses shift 3.0 (its scheduler config's `shift`); FLUX computes its shift from the image size. shift 1: none."""
    return shift * u / (1 + (shift - 1) * u)


def flow_noise_and_target(x0, noise, sigma):
    """x_sigma and the velocity target. x0, noise: (B,C,h,w); sigma: (B,) in [0, 1]."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # (B,1,1,1)
    return (1 - s) * x0 + s * noise, noise - x0


def per_sample_error(pred, target):
    """e = mean over C,H,W of (pred - target)^2, in fp32 whatever the autocast dtype. (B,C,H,W) -> (B,)"""
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------------
# Diffusion-DPO (Wallace et al. 2024)

def dpo_loss(policy_err, ref_err, beta=5000.0):
    """Diffusion-DPO on B pairs stacked as [winners; losers].

    policy_err, ref_err: (2B,) per-sample errors, the first B rows the preferred images x_w, the
    last B the rejected images x_l of the same pairs (same eps and t for w and l of a pair).

        Delta_theta = e_theta(w) - e_theta(l)
        Delta_ref   = e_ref(w)   - e_ref(l)
        u    = -(beta/2) * (Delta_theta - Delta_ref)        # = (beta/2) * (r_w - r_l)
        loss = -mean_i log sigmoid(u_i)

    With the policy equal to the reference, u = 0 and the loss is log 2 = 0.693 exactly, yet the
    gradient is not zero: d loss / d e_theta(w) = +beta/4 > 0 pushes the winner's error down and the
    loser's up. That is why implicit accuracy and the margin are logged beside the flat-looking loss.
    """
    policy_w, policy_l = policy_err.float().chunk(2)  # (B,), (B,)
    ref_w, ref_l = ref_err.float().detach().chunk(2)  # (B,), (B,)
    delta_theta = policy_w - policy_l  # (B,)
    delta_ref = ref_w - ref_l  # (B,)
    u = -0.5 * beta * (delta_theta - delta_ref)  # (B,) the implicit reward margin, scaled
    loss = -F.logsigmoid(u).mean()  # log-sigmoid per pair, then the mean
    metrics = {  # per pair, (B,)
        "implicit_acc": (u > 0).float(),  # averaged: the share of pairs the policy already ranks right
        "reward_margin": u,  # (beta/2) * (r_w - r_l); 0 at step 0
        "policy_err_w": policy_w, "policy_err_l": policy_l,
        "ref_err_w": ref_w, "ref_err_l": ref_l,
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def sft_loss(policy_err):
    """Supervised fine-tuning baseline: the plain denoising loss on the preferred (or liked) images.

    policy_err: (B,) errors of the preferred images only. No reference model is needed.
    """
    loss = policy_err.float().mean()
    return loss, {"policy_err_w": policy_err.detach().float()}


# ------------------------------------------------------------------------------------------------
# Diffusion-KTO (Li et al. 2024)

# the utility functions U(u) of the paper's ablation, with u = y * beta * (r - z_ref)
UTILITIES = {
    # the Kahneman-Tversky shape: concave for gains, convex for losses, saturating both ways
    "sigmoid": lambda u: torch.sigmoid(u),
    # log sigmoid(u): concave everywhere, DPO-like, never saturates for losses (flees them hard)
    "loss_averse": lambda u: F.logsigmoid(u),
    # -log sigmoid(-u) = softplus(u): convex everywhere, never saturates for gains (SFT-like)
    "risk_seeking": lambda u: -F.logsigmoid(-u),
}


def kto_reference_point(reward, reduce_sum=None):
    """KTO's reference point z_ref = max(0, mean_j r_j) over the GLOBAL batch, detached.

    reward: (B,) implicit rewards r = e_ref - e_theta of this process's samples: the batch's own
      (mode `batch`) or those of images paired with another image's prompt (mode `mismatched`).
      All of this process's samples of the optimizer step, not one micro-batch: z_ref is one number per
      step, the mean over the whole global batch, so the objective (and its gradient) does not depend on
      how the step is split into processes and accumulation steps (train_kto.py explains the cost).
    reduce_sum: a callable that sums a tensor over all processes (e.g. an all_reduce), or None in
      a single process. The mean is formed from the global sum and count, so ranks with unequal
      batch sizes still get the true global mean. Keeping the collective outside this file keeps
      it free of process-group code.
    """
    # the count is filled on the device: torch.tensor(n, device=...) would copy it from the host, and that copy
    # waits for everything queued on the GPU before it (a host sync in the hot loop)
    stats = torch.stack([reward.detach().float().sum(),
                         torch.full((), float(reward.numel()), device=reward.device)])  # (2,) sum, count
    if reduce_sum is not None:
        stats = reduce_sum(stats)
    return (stats[0] / stats[1]).clamp(min=0.0)  # KL >= 0, so the estimate is clamped at 0


def kto_loss(policy_err, ref_err, label, z_ref, beta=5000.0, utility="sigmoid", lambda_d=1.0, lambda_u=1.0):
    """Diffusion-KTO on B single images with binary feedback.

    policy_err, ref_err: (B,) per-sample errors of the policy and the reference on the same x_t.
    label: (B,) +1 for a desirable (liked) image, -1 for an undesirable (disliked) one.
    z_ref: scalar reference point from kto_reference_point (no gradient flows through it).

        r    = e_ref - e_theta                      # implicit reward, (B,)
        u    = y * beta * (r - z_ref)               # (B,)
        loss = mean_i lambda_{y_i} * (1 - U(u_i))   # for sigmoid; generally -lambda * U(u)

    The constant 1 only shifts the loss (for sigmoid it keeps it in [0, 1] per sample) and does not
    change the gradient. A desirable image gains utility when its error falls below the reference's
    by more than z_ref; an undesirable one when its error rises above it.
    lambda_d, lambda_u weigh the two classes (1, 1 in the paper, where the class balance comes from
    sampling desirable images with probability 0.8 instead).
    """
    if utility not in UTILITIES:
        raise ValueError(f"unknown utility {utility!r}; choose one of {sorted(UTILITIES)}")
    label = label.float()
    desirable = label > 0  # (B,) bool
    reward = ref_err.float().detach() - policy_err.float()  # (B,) r = e_ref - e_theta
    u = label * beta * (reward - z_ref.detach())  # (B,)
    weight = torch.where(desirable, torch.full_like(u, lambda_d), torch.full_like(u, lambda_u))  # (B,)
    utility_value = UTILITIES[utility](u)  # (B,)
    if utility == "sigmoid":
        loss = (weight * (1.0 - utility_value)).mean()
    else:
        loss = (-weight * utility_value).mean()

    # per-class values as (B,) tensors, NaN for the samples of the other class; the log's mean over a step's images
    # skips the NaN (common.Meter: masked sums and counts on the device). Not x[mask].mean(): a boolean index has a
    # size only the GPU knows, so the host would wait for it (and `if mask.any()` too), a sync every micro-step.
    def of_class(x, mask):
        return torch.where(mask, x, torch.full_like(x, float("nan")))

    metrics = {  # per image, (B,), except the reference point
        "reward_acc": (u > 0).float(),  # averaged: the share of images already on the right side of z_ref
        "ref_point": z_ref.detach().float(),
        "reward_d": of_class(reward, desirable), "reward_u": of_class(reward, ~desirable),
        "policy_err_d": of_class(policy_err.float(), desirable),
        "policy_err_u": of_class(policy_err.float(), ~desirable),
        "ref_err_d": of_class(ref_err.float(), desirable), "ref_err_u": of_class(ref_err.float(), ~desirable),
        "desirable_share": desirable.float(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}
