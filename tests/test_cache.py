"""cache.py on its own: what the trainers draw from the cache is what the VAE would give on the fly.

    python -m pytest -q tests/test_cache.py
"""
import numpy as np
import torch
from PIL import Image

import common
from public_data import load_singles
from cache import LatentCache, build_cache, to_tensor
from model import load_models


def test_draws_have_the_vae_posterior_and_the_flip_picks_the_mirror_image(tiny_pipe_dir, tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "likes"
    for label in ("liked", "disliked"):
        (root / label).mkdir(parents=True)
        a = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)  # not square, not symmetric: a flip changes it
        Image.fromarray(a).save(root / label / "x.png")
        (root / label / "x.txt").write_text(f"a {label} thing")
    fb = load_singles(str(root))
    ctx = common.setup(0)
    models = load_models(tiny_pipe_dir, ctx)
    cache = LatentCache(build_cache(fb, str(tmp_path / "cache"), models, 32, True, ctx))
    assert set(cache.condition(0, 0, False)) == {"encoder_hidden_states"}  # SD: the prompt alone
    assert cache.valid.all() and cache.latent_shape() == (4, 16, 16)  # the tiny VAE halves 32 px once
    shape = cache.latent_shape()
    scale = models.vae.config.scaling_factor
    for i, path in enumerate(fb.paths):
        x = to_tensor(Image.open(path).convert("RGB"), 32)[0][None]
        for flipped, image in ((False, x), (True, x.flip(-1))):
            with torch.no_grad():
                post = models.vae.encode(image).latent_dist
            mean, std = (post.mean * scale)[0], (post.std * scale)[0]  # (4,16,16)
            # noise 0 gives the mean; noise 1 gives mean + std (stored in fp16)
            torch.testing.assert_close(cache.latent(i, flipped, torch.zeros(shape)), mean, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(cache.latent(i, flipped, torch.ones(shape)) - mean, std, atol=2e-3, rtol=2e-3)
            # many draws with fresh noise: the sample mean and std of latent_dist.sample()
            g = torch.Generator().manual_seed(i)
            draws = torch.stack([cache.latent(i, flipped, torch.randn(shape, generator=g)) for _ in range(4000)])
            torch.testing.assert_close(draws.mean(0), mean, atol=4 * std.max().item() / 60 + 2e-3, rtol=0)
            torch.testing.assert_close(draws.std(0), std, atol=2e-3, rtol=0.06)
        # the mirror image's posterior differs from the image's own: the flip is not a no-op
        assert not torch.allclose(cache.latent(i, True, torch.zeros(shape)), cache.latent(i, False, torch.zeros(shape)))
    emb = cache.condition(int(fb.caption_idx[0]), 0, False)["encoder_hidden_states"]
    ids = models.tokenizer([fb.captions[fb.caption_idx[0]]], padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(emb, models.text_encoder(ids).last_hidden_state[0], atol=2e-3, rtol=2e-3)
