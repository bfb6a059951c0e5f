"""The objectives in losses.py: values against hand computations, and the direction of one update.

    python -m pytest -q tests/test_losses.py
"""
import math

import pytest
import torch

from losses import (UTILITIES, dpo_loss, flow_draw_u, flow_noise_and_target, flow_sigma, kto_loss, kto_reference_point,
                    per_sample_error, sft_loss)


def test_dpo_is_log2_when_policy_equals_reference():
    err = torch.rand(6)
    loss, m = dpo_loss(err, err.clone(), beta=5000)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert m["implicit_acc"].tolist() == [0.0] * 3 and m["reward_margin"].tolist() == [0.0] * 3  # per pair


def test_dpo_matches_hand_computation():
    # two pairs, errors written out; u = -(beta/2) * ((pw - pl) - (rw - rl))
    policy = torch.tensor([0.10, 0.30, 0.20, 0.25])  # w1, w2, l1, l2
    ref = torch.tensor([0.12, 0.28, 0.19, 0.27])
    beta = 100.0
    u1 = -(beta / 2) * ((0.10 - 0.20) - (0.12 - 0.19))  # = 1.5
    u2 = -(beta / 2) * ((0.30 - 0.25) - (0.28 - 0.27))  # = -2.0
    expected = -(math.log(1 / (1 + math.exp(-u1))) + math.log(1 / (1 + math.exp(-u2)))) / 2
    loss, m = dpo_loss(policy, ref, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["implicit_acc"].tolist() == [1.0, 0.0]
    assert m["reward_margin"].tolist() == pytest.approx([u1, u2], rel=1e-5)
    # the diffusers port's parameterization (beta' = beta/2, no 1/2) is the same objective
    u = -(beta / 2) * ((policy[:2] - policy[2:]) - (ref[:2] - ref[2:]))
    assert torch.nn.functional.logsigmoid(u).mean().neg().item() == pytest.approx(loss.item(), rel=1e-6)


def test_dpo_gradient_at_step0_lowers_winner_and_raises_loser():
    policy = torch.tensor([0.5, 0.5], requires_grad=True)  # [w; l]
    loss, _ = dpo_loss(policy, policy.detach().clone(), beta=5000)
    loss.backward()
    # d loss / d e_w = +beta/4 > 0, so gradient descent lowers e_w; the opposite for e_l
    assert policy.grad[0].item() == pytest.approx(5000 / 4) and policy.grad[1].item() == pytest.approx(-5000 / 4)


def test_sft_and_per_sample_error():
    pred, target = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    target[1] *= 2
    err = per_sample_error(pred, target)
    assert err.tolist() == [1.0, 4.0]
    assert sft_loss(err)[0].item() == 2.5


def test_kto_reference_point_clamps_and_reduces():
    reward = torch.tensor([1.0, -3.0])
    assert kto_reference_point(reward).item() == 0.0  # mean -1 clamped at 0
    # a fake 2-rank reduce: the other rank holds [5, 5, 5]; global mean = (−2 + 15) / 5
    other = torch.tensor([15.0, 3.0])
    assert kto_reference_point(reward, reduce_sum=lambda s: s + other).item() == pytest.approx(13 / 5)


@pytest.mark.parametrize("utility", sorted(UTILITIES))
def test_kto_matches_hand_computation(utility):
    policy = torch.tensor([0.10, 0.30, 0.20])
    ref = torch.tensor([0.12, 0.28, 0.22])
    label = torch.tensor([1.0, -1.0, -1.0])
    beta, z = 10.0, torch.tensor(0.005)
    lam = {1.0: 2.0, -1.0: 0.5}
    total = 0.0
    for p, r, y in zip(policy.tolist(), ref.tolist(), label.tolist()):
        u = y * beta * ((r - p) - 0.005)
        sig = 1 / (1 + math.exp(-u))
        value = {"sigmoid": 1 - sig, "loss_averse": -math.log(sig), "risk_seeking": math.log(1 - sig)}[utility]
        total += lam[y] * value
    loss, m = kto_loss(policy, ref, label, z, beta=beta, utility=utility, lambda_d=2.0, lambda_u=0.5)
    assert loss.item() == pytest.approx(total / 3, rel=1e-5)
    # per image, NaN where the image is of the other class: a log averages them over all the images of a step
    assert m["reward_d"][0].item() == pytest.approx(0.02, rel=1e-4) and m["reward_d"][1:].isnan().all()
    assert m["reward_u"][0].isnan() and m["reward_u"][1:].tolist() == pytest.approx([-0.02, 0.02], abs=1e-6)
    assert m["desirable_share"].tolist() == [1.0, 0.0, 0.0] and m["ref_point"].item() == pytest.approx(0.005)


@pytest.mark.parametrize("classes", ["both", "only desirable", "only undesirable"])
def test_kto_class_metrics_without_boolean_indexing_equal_the_masked_means(classes):
    """kto_loss's per-class metrics are (B,) with NaN off the class, so that nothing in it waits for the GPU (no
    x[mask], no mask.any()); the means a log reports of them (common.Meter) are the straightforward formula's, NaN
    where it was NaN (a class absent from the batch)."""
    from common import Meter
    g = torch.Generator().manual_seed(len(classes))
    policy, ref = torch.rand(16, generator=g), torch.rand(16, generator=g)
    label = {"both": torch.where(torch.arange(16) % 3 == 0, -1.0, 1.0), "only desirable": torch.ones(16),
             "only undesirable": -torch.ones(16)}[classes]
    reward = ref - policy
    z_ref = kto_reference_point(reward)
    assert z_ref.item() == max(0.0, reward.mean().item())
    loss, m = kto_loss(policy, ref, label, z_ref, beta=20.0)
    meter = Meter()
    meter.add(m)
    logged = meter.reduce()

    def class_mean(x, mask):  # the formula before: a boolean index and a test of the mask on the host
        return x[mask].mean().item() if mask.any() else float("nan")
    d, u = label > 0, label < 0
    expected = {"reward_d": class_mean(reward, d), "reward_u": class_mean(reward, u),
                "policy_err_d": class_mean(policy, d), "policy_err_u": class_mean(policy, u),
                "ref_err_d": class_mean(ref, d), "ref_err_u": class_mean(ref, u),
                "reward_acc": (label * 20.0 * (reward - z_ref) > 0).float().mean().item(),
                "desirable_share": d.float().mean().item(), "ref_point": z_ref.item()}
    assert set(expected) == set(m)
    for k, want in expected.items():
        assert math.isnan(logged[k]) == math.isnan(want), k
        if not math.isnan(want):
            assert logged[k] == pytest.approx(want, rel=1e-6, abs=1e-7), k
    assert math.isnan(expected["reward_d"]) == (classes == "only undesirable")  # the case the NaN is for
    assert math.isnan(expected["reward_u"]) == (classes == "only desirable")


@pytest.mark.parametrize("utility", sorted(UTILITIES))
def test_kto_gradient_signs(utility):
    # desirable: descending the loss lowers the policy error; undesirable: raises it
    policy = torch.tensor([0.5, 0.5], requires_grad=True)
    label = torch.tensor([1.0, -1.0])
    loss, _ = kto_loss(policy, policy.detach().clone(), label, torch.tensor(0.0), beta=100, utility=utility)
    loss.backward()
    assert policy.grad[0].item() > 0 and policy.grad[1].item() < 0


def test_one_dpo_step_moves_a_real_unet(tiny_pipe_dir):
    """At the same x_t, one optimizer step lowers the winner's error and raises the loser's."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    import copy
    from losses import add_noise_and_target
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_pipe_dir, subfolder="unet")
    ref = copy.deepcopy(unet).requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(tiny_pipe_dir, subfolder="scheduler")
    x0 = torch.randn(2, 4, 8, 8)  # [winner; loser]
    eps = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
    t = torch.tensor([500, 500])
    emb = torch.randn(1, 77, unet.config.cross_attention_dim).repeat(2, 1, 1)
    x_t, target = add_noise_and_target(sched, x0, eps, t)
    errors = lambda m: per_sample_error(m(x_t, t, emb).sample, target)
    before = errors(unet).detach()
    opt = torch.optim.SGD(unet.parameters(), lr=1e-6)
    loss, _ = dpo_loss(errors(unet), errors(ref).detach(), beta=5000)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    opt.step()
    after = errors(unet).detach()
    assert after[0] < before[0] and after[1] > before[1]


# ------------------------------------------------------------------------------------------------
# flow matching: the noising, the velocity target and the sigma draw, against diffusers' SD3/FLUX training code

@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_flow_draw_is_what_diffusers_training_draws(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling
    for seed in range(20):
        ours = flow_draw_u(torch.Generator().manual_seed(seed), scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
        theirs = compute_density_for_timestep_sampling(scheme if scheme != "uniform" else "none", 1, logit_mean=0.3,
                                                       logit_std=1.2, mode_scale=1.29,
                                                       generator=torch.Generator().manual_seed(seed))[0]
        assert ours == theirs and 0 <= float(ours) <= 1
    with pytest.raises(ValueError, match="unknown timestep scheme"):
        flow_draw_u(torch.Generator(), "cosine")


def test_flow_sigma_shift_is_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's config
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000  # the scheduler's training sigmas before its shift
    assert torch.allclose(flow_sigma(unshifted, 3.0), scheduler.sigmas[:1000], atol=1e-6)
    u = torch.rand(100)
    assert torch.equal(flow_sigma(u, 1.0), u) and bool((flow_sigma(u, 3.0) >= u).all())  # shift > 1: more noise


def test_flow_noising_and_velocity_target():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    x, v = flow_noise_and_target(x0, noise, sigma)
    assert torch.equal(x[0], x0[0]) and torch.equal(x[2], noise[2])  # sigma 0: the image; 1: the noise
    assert torch.allclose(x[1], (x0[1] + noise[1]) / 2)
    h = 1e-3  # v is d x_sigma / d sigma
    x_h, _ = flow_noise_and_target(x0, noise, sigma + h)
    assert torch.allclose((x_h - x) / h, v, atol=1e-3)
    # the objectives take velocity errors as they are: policy = reference gives DPO log 2 and KTO rewards 0
    err = per_sample_error(v + 0.1 * torch.randn_like(v), v)
    loss, _ = dpo_loss(torch.cat([err, err.flip(0)]), torch.cat([err, err.flip(0)]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
