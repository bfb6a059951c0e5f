"""Flow-matching models (SD3 here), the first step of their support: a tiny SD3 pipeline built from config loads and
samples in diffusers, and losses.py's objectives run on its transformer's velocity errors exactly as on a UNet's
noise errors (step 0 exact, one step moves the policy the right way). The trainers do not take flow models yet.

    python -m pytest -q tests/test_flow.py
"""
import copy
import math

import pytest
import torch

from losses import dpo_loss, flow_draw_u, flow_noise_and_target, flow_sigma, kto_loss, per_sample_error


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline
    from toy.models import build_sd3_pipeline
    path = str(tmp_path_factory.mktemp("tiny_sd3"))
    build_sd3_pipeline(path, seed=0)
    return StableDiffusion3Pipeline.from_pretrained(path)


def test_the_tiny_sd3_pipeline_loads_and_samples(tiny_sd3):
    assert type(tiny_sd3.transformer).__name__ == "SD3Transformer2DModel"
    assert type(tiny_sd3.text_encoder_3).__name__ == "T5EncoderModel"
    assert tiny_sd3.tokenizer_3.convert_ids_to_tokens(tiny_sd3.tokenizer_3("a red circle").input_ids) == \
        ["\u2581a", "\u2581red", "\u2581circle", "</s>"]
    image = tiny_sd3("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and 0 <= image.min() and image.max() <= 1


def velocity_errors(pipe, transformer, prompts, images, seed, autocast=False):
    """Per-sample velocity errors of `transformer` on the images (B,3,H,W) in [-1, 1], each with its own sigma and
    noise from its own generator (as the trainers draw), conditioned as the pipeline's encode_prompt builds it."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                  max_sequence_length=16)
        z = pipe.vae.encode(images).latent_dist.mean
        x0 = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor  # SD3's latents
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    sigma = torch.stack([flow_sigma(flow_draw_u(g), pipe.scheduler.config.shift) for g in gens])  # (B,)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
    x, target = flow_noise_and_target(x0, noise, sigma)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        pred = transformer(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=embeds,
                           pooled_projections=pooled).sample
    return per_sample_error(pred, target)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_dpo_and_kto_on_velocity_errors_are_exact_at_step_0_and_one_step_moves_the_policy(tiny_sd3, autocast):
    prompts = ["a red circle", "a blue square", "a red circle", "a blue square"]  # winners, then losers
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    reference = tiny_sd3.transformer.eval().requires_grad_(False)
    policy = copy.deepcopy(reference).train().requires_grad_(True)
    ref_err = velocity_errors(tiny_sd3, reference, prompts, images, seed=7, autocast=autocast)
    policy_err = velocity_errors(tiny_sd3, policy, prompts, images, seed=7, autocast=autocast)
    assert torch.equal(policy_err, ref_err)  # the same x_sigma, sigma, noise and conditioning for both
    loss, _ = dpo_loss(torch.cat([policy_err[:2], policy_err[2:]]), ref_err, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    _, kto = kto_loss(policy_err, ref_err, torch.tensor([1.0, 1.0, -1.0, -1.0]), torch.tensor(0.0))
    assert torch.equal(kto["reward_d"][:2], torch.zeros(2)) and torch.equal(kto["reward_u"][2:], torch.zeros(2))
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p -= 1e-4 * p.grad / (p.grad.norm() + 1e-12)
    # measured in fp32 (bf16's rounding, times beta, would hide a step this small): the winners' velocity errors
    # went down against the losers'
    after, _ = dpo_loss(velocity_errors(tiny_sd3, policy, prompts, images, seed=7),
                        velocity_errors(tiny_sd3, reference, prompts, images, seed=7))
    assert after.item() < math.log(2)
