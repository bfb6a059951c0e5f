"""The 2-D experiment of Diffusion-KTO (Li et al., NeurIPS 2024, arXiv 2404.04465): which utility does what.

A small MLP diffusion model (DDPM, eps-prediction) is pretrained on N((0.5, 0.8), 0.04 I), then
fine-tuned from that base, with a frozen copy of the base as the reference, by
  - KTO with each utility of the paper's ablation (sigmoid, loss_averse, risk_seeking) on desirable
    points from N((0.3, 0.8), 0.01 I) and undesirable points from N((0.3, 0.6), 0.01 I);
  - SFT (the plain denoising loss) on the desirable points only.
Each model draws 3500 points; per method we print the share near the desirable mode, the share near
the undesirable mode and the mean position, and save a scatter plot.

The objectives are losses.py's, unchanged: a point's K noise draws are laid out as a (2, K, 1)
"image", so per_sample_error averages the squared error over them as it averages over C, H, W of a
latent (see errors()). The reference point is the `batch` mode (there are no prompts to mismatch).

What the paper reports: loss-averse flees the undesirable mode so hard that it overshoots the
desirable one; risk-seeking behaves like SFT and tolerates undesirable samples; sigmoid balances.
What this script measures with its defaults (seed 0; beta 20, gamma 0.8, 1000 steps; the share
within 0.1 of a mode is at most 39% for points drawn from that mode itself):

    method             near desirable  near undesirable  mean
    base                    6.8%            4.3%         (0.494, 0.800)
    sft                    31.9%           10.2%         (0.297, 0.790)
    kto_sigmoid            32.4%            3.9%         (0.317, 0.833)
    kto_loss_averse        24.0%            4.4%         (0.335, 0.843)
    kto_risk_seeking        0.0%            0.0%         diverged, every sample escaped

  - SFT reaches the desirable mode and spreads onto the undesirable one next to it;
  - sigmoid reaches the desirable mode as well as SFT does, with 2.6x less mass on the undesirable
    one, and its mean sits above the desirable mode, away from the undesirable one: it balances;
  - loss-averse ends with its mean farthest from the undesirable mode (the paper's overshoot, but
    only slightly beyond sigmoid's) and with less mass at the desirable mode: it moves more slowly;
  - risk-seeking diverges within a few hundred steps, unlike the paper's "behaves like SFT": for an
    undesirable point a gain is a larger error, which its convex utility rewards without bound, so
    the network learns to blow up its output. The paper's reading assumes a bounded log-likelihood
    ratio; the denoising error is not bounded above.

    python -m toy.gaussian2d                        # 31 s on an idle 2-core CPU, writes the PNG
    python -m toy.gaussian2d --finetune_steps 300   # quicker look
"""
import argparse
import copy
import math
import os
import time

import torch
import torch.nn as nn

import losses
from files import fail

BASE_MEAN, BASE_STD = (0.5, 0.8), 0.2  # pretraining data N((0.5, 0.8), 0.04 I)
GOOD_MEAN, BAD_MEAN, MODE_STD = (0.3, 0.8), (0.3, 0.6), 0.1  # desirable / undesirable N(., 0.01 I)
METHODS = ("base", "sft", "kto_sigmoid", "kto_loss_averse", "kto_risk_seeking")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=100, help="diffusion steps (linear beta schedule 1e-4..0.1)")
    p.add_argument("--hidden", type=int, default=128, help="MLP width")
    p.add_argument("--pretrain_steps", type=int, default=4000, help="base model training steps")
    p.add_argument("--finetune_steps", type=int, default=1000, help="fine-tuning steps per method")
    p.add_argument("--batch", type=int, default=256, help="points per pretraining step")
    p.add_argument("--finetune_batch", type=int, default=64, help="points per fine-tuning step")
    p.add_argument("--draws", type=int, default=16, help="(t, eps) draws per point in fine-tuning (see errors())")
    p.add_argument("--pretrain_lr", type=float, default=2e-3, help="Adam learning rate of the base model")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of fine-tuning")
    p.add_argument("--beta", type=float, default=20.0,
                   help="KTO beta; scaled for 2-D errors (see below), not SD's 5000")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm in fine-tuning")
    p.add_argument("--gamma", type=float, default=0.8,
                   help="probability that a fine-tuning point is desirable (0.8 as in the paper)")
    p.add_argument("--n_feedback", type=int, default=2000, help="points in each of the desirable/undesirable sets")
    p.add_argument("--n_samples", type=int, default=3500, help="points sampled per method")
    p.add_argument("--radius", type=float, default=0.1,
                   help="a sample is 'near' a mode within this distance (1 std; the modes are 0.2 apart)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--seed", type=int, default=0, help="seed of data, init, noise and sampling")
    p.add_argument("--out", default="toy/data/gaussian2d.png", help="scatter plot PNG ('' to skip)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# Why beta = 20 and not SD's 5000. The utilities differ only where they saturate (sigmoid both
# ways, loss_averse for gains, risk_seeking for losses), so u = beta * (r - z_ref) has to reach a few
# units during fine-tuning, not from the first step. In SD an error is a mean over 4*64*64 latent
# values and fine-tuning moves it by ~1e-4, hence beta in the thousands. Here the base's error of a
# point (mean over 2 coordinates x 16 draws) is ~0.1, and fine-tuning moves it by ~0.02 for desirable
# points and ~-0.15 for undesirable ones (measured), so beta = 20 gives |u| ~ 0.4 and ~3: the
# undesirable side saturates, the desirable side still learns. beta 5000 would put every point in
# saturation at once (pure sign-of-r updates); beta 2 keeps every utility in its linear range,
# where they all give the same gradient direction.


# ------------------------------------------------------------------------------------------------
# model and diffusion

class MLPDenoiser(nn.Module):
    """eps_theta(x_t, t): a 3-hidden-layer MLP on the point and a sinusoidal embedding of t."""

    def __init__(self, hidden=128, t_dim=32):
        super().__init__()
        self.t_dim = t_dim
        self.net = nn.Sequential(nn.Linear(2 + t_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t):  # x (B, 2), t (B,) integer steps
        half = self.t_dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)  # (half,)
        angles = t.float()[:, None] * freqs[None]  # (B, half)
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))  # (B, 2)


class Diffusion:
    """DDPM with a linear beta schedule; enough of it to train and to sample."""

    def __init__(self, T):
        self.T = T
        self.betas = torch.linspace(1e-4, 0.1, T)  # alpha_bar at the last step ~ 0.006: nearly pure noise
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, 0)

    def add_noise(self, x0, eps, t):  # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        ab = self.alpha_bar[t][:, None]
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    @torch.no_grad()
    def sample(self, model, n, generator):
        """Ancestral DDPM sampling (sigma_t^2 = beta_t) from x_T ~ N(0, I)."""
        x = torch.randn(n, 2, generator=generator)
        for t in reversed(range(self.T)):
            eps = model(x, torch.full((n,), t))
            a, ab, b = self.alphas[t], self.alpha_bar[t], self.betas[t]
            x = (x - b / (1 - ab).sqrt() * eps) / a.sqrt()
            if t > 0:
                x = x + b.sqrt() * torch.randn(n, 2, generator=generator)
        return x


def errors(model, diffusion, x0, t, eps):
    """Per-point denoising error, averaged over the coordinates and over K noise draws per point, (B,).

    x0 (B, 2); t (B, K) integer steps; eps (B, K, 2). The K draws are laid out as a (2, K, 1) "image",
    so losses.per_sample_error, unchanged, averages over them as it averages over C, H, W of a latent.
    Why K > 1: an SD latent's error is a mean over 4*64*64 values, a 2-D point's over only 2, so with
    one draw the implicit reward r = e_ref - e_theta of a point is mostly noise from its (t, eps)."""
    B, K = t.shape
    x_t = diffusion.add_noise(x0[:, None, :].expand(B, K, 2).reshape(-1, 2), eps.reshape(-1, 2), t.reshape(-1))
    pred = model(x_t, t.reshape(-1)).view(B, K, 2)
    as_image = lambda a: a.permute(0, 2, 1).unsqueeze(-1)  # (B, K, 2) -> (B, 2, K, 1)
    return losses.per_sample_error(as_image(pred), as_image(eps))  # (B,)


def draw_noise(batch, k, T, generator):
    """K (t, eps) draws for each of `batch` points: t (B, K), eps (B, K, 2)."""
    return torch.randint(0, T, (batch, k), generator=generator), torch.randn(batch, k, 2, generator=generator)


def gaussian(n, mean, std, generator):
    return torch.tensor(mean) + std * torch.randn(n, 2, generator=generator)


# ------------------------------------------------------------------------------------------------
# training

def pretrain(args, diffusion, generator):
    model = MLPDenoiser(args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=args.pretrain_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.pretrain_steps)
    for step in _progress(range(args.pretrain_steps), "pretrain", args.quiet):
        x0 = gaussian(args.batch, BASE_MEAN, BASE_STD, generator)  # fresh draws: the base sees the whole density
        t, eps = draw_noise(args.batch, 1, diffusion.T, generator)
        loss = errors(model, diffusion, x0, t, eps).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


def finetune(args, method, base, diffusion, good, bad, generator):
    """Fine-tune a copy of the base with SFT (on `good`) or KTO (on `good` vs `bad`); the base stays frozen."""
    policy = copy.deepcopy(base).train().requires_grad_(True)
    ref = base.eval().requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    utility = method.removeprefix("kto_")
    for step in _progress(range(args.finetune_steps), method, args.quiet):
        t, eps = draw_noise(args.finetune_batch, args.draws, diffusion.T, generator)  # shared by policy and reference
        if method == "sft":
            x0 = good[torch.randint(0, len(good), (args.finetune_batch,), generator=generator)]
            loss, _ = losses.sft_loss(errors(policy, diffusion, x0, t, eps))
        else:
            # each point is desirable with probability gamma (the paper's weighted sampler)
            label = torch.where(torch.rand(args.finetune_batch, generator=generator) < args.gamma, 1.0, -1.0)  # (B,)
            i = torch.randint(0, len(good), (args.finetune_batch,), generator=generator)
            x0 = torch.where(label[:, None] > 0, good[i], bad[i])  # (B, 2)
            policy_err = errors(policy, diffusion, x0, t, eps)
            with torch.no_grad():
                ref_err = errors(ref, diffusion, x0, t, eps)
            # no prompts in this world, so the reference point is the `batch` mode of the public code
            z_ref = losses.kto_reference_point(ref_err - policy_err)
            loss, _ = losses.kto_loss(policy_err, ref_err, label, z_ref, beta=args.beta, utility=utility)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        opt.step()
        if not torch.isfinite(loss):
            print(f"{method}: loss is {loss.item()} at step {step}; stopping this method early")
            break
    return policy.eval()


def _progress(it, desc, quiet):
    if quiet:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=f"{desc:>16}", leave=False, mininterval=1.0)


# ------------------------------------------------------------------------------------------------
# measurement and plot

def summarize(points, radius):
    """Share of points within `radius` of each mode, the mean position (of the finite points) and the
    share of points that escaped: farther than 1 from the base's mean, or not finite (a diverged model)."""
    finite = torch.isfinite(points).all(dim=1)
    escaped = ~finite | ((points - torch.tensor(BASE_MEAN)).norm(dim=1) > 1.0)
    good = (points - torch.tensor(GOOD_MEAN)).norm(dim=1) < radius
    bad = (points - torch.tensor(BAD_MEAN)).norm(dim=1) < radius
    mean = points[finite].mean(0) if finite.any() else torch.full((2,), float("nan"))
    return {"desirable": good.float().mean().item(), "undesirable": bad.float().mean().item(),
            "mean_x": mean[0].item(), "mean_y": mean[1].item(), "escaped": escaped.float().mean().item()}


PLOT_COLORS = {"base": (120, 120, 120), "sft": (40, 120, 220), "kto_sigmoid": (40, 160, 60),
               "kto_loss_averse": (200, 40, 40), "kto_risk_seeking": (230, 140, 20)}


def scatter_png(path, samples, stats, panel=300, lo=(-0.1, 0.2), hi=(1.1, 1.4)):
    """One panel per method: its samples, the two modes (green = desirable, red = undesirable) and the mean."""
    from PIL import Image, ImageDraw
    names = list(samples)
    img = Image.new("RGB", (panel * len(names), panel + 40), "white")
    d = ImageDraw.Draw(img)

    def xy(p, k):  # data coordinates -> pixel coordinates in panel k (y upward)
        return (k * panel + (p[0] - lo[0]) / (hi[0] - lo[0]) * panel,
                panel - (p[1] - lo[1]) / (hi[1] - lo[1]) * panel)

    for k, name in enumerate(names):
        d.rectangle([k * panel, 0, (k + 1) * panel - 1, panel - 1], outline=(200, 200, 200))
        for p in samples[name].tolist():
            x, y = xy(p, k)
            if math.isfinite(x) and math.isfinite(y):
                d.point((x, y), fill=PLOT_COLORS.get(name, (0, 0, 0)))
        for mean, color in ((GOOD_MEAN, (0, 150, 0)), (BAD_MEAN, (220, 0, 0))):  # 1-std circles
            x, y = xy(mean, k)
            r = MODE_STD / (hi[0] - lo[0]) * panel
            d.ellipse([x - r, y - r, x + r, y + r], outline=color, width=2)
        x, y = xy((stats[name]["mean_x"], stats[name]["mean_y"]), k)
        if math.isfinite(x) and math.isfinite(y):
            d.line([x - 6, y - 6, x + 6, y + 6], fill="black", width=2)
            d.line([x - 6, y + 6, x + 6, y - 6], fill="black", width=2)
        s = stats[name]
        d.text((k * panel + 5, panel + 4), name, fill="black")
        d.text((k * panel + 5, panel + 20), f"near D {s['desirable']:.0%}  near U {s['undesirable']:.0%}", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        fail(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    diffusion = Diffusion(args.T)
    t0 = time.time()
    base = pretrain(args, diffusion, gen)
    print(f"pretrained the base: {args.pretrain_steps} steps of {args.batch} points in {time.time() - t0:.1f}s")
    good = gaussian(args.n_feedback, GOOD_MEAN, MODE_STD, gen)  # the feedback: a fixed finite set of each
    bad = gaussian(args.n_feedback, BAD_MEAN, MODE_STD, gen)

    samples, stats = {}, {}
    for method in methods:
        t0 = time.time()
        model = base if method == "base" else finetune(args, method, base, diffusion, good, bad, gen)
        # every method samples from the same noise, so the differences are the models'
        samples[method] = diffusion.sample(model, args.n_samples, torch.Generator().manual_seed(args.seed + 1))
        stats[method] = summarize(samples[method], args.radius)
        s = stats[method]
        print(f"{method:>17}: near desirable {s['desirable']:6.1%}  near undesirable {s['undesirable']:6.1%}  "
              f"mean ({s['mean_x']:.3g}, {s['mean_y']:.3g})  escaped {s['escaped']:6.1%}  [{time.time() - t0:.0f}s]")
    print(f"modes: desirable {GOOD_MEAN}, undesirable {BAD_MEAN}; 'near' = within {args.radius}; "
          f"beta {args.beta}, gamma {args.gamma}, {args.finetune_steps} fine-tuning steps")
    if args.out:
        scatter_png(args.out, samples, stats)
        print(f"wrote {args.out}")
    return stats


if __name__ == "__main__":
    main()
