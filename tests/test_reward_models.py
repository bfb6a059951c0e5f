"""HPSv2 and ImageReward rebuilt from transformers' modules: key maps, preprocessing, bad weights.

    python -m pytest -q tests/test_reward_models.py

Each checkpoint is written by hand here with the official key names and shapes (open_clip and image-reward are
not installed), tiny but with two attention heads; the converted model's scores must equal a forward pass written
out below in plain torch, the way open_clip and ImageReward's BLIP compute it. The real-size check against the
original packages is tools/check_scorers_against_originals.sh (not run here: it builds its own environment).
"""
import argparse
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import reward_models
from scorers import load_scorers

PROMPTS = ["a red circle", "a big blue square on a table", "a dog"]
W = 128  # every tower's width: two heads of 64


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(32, 32), (40, 64), (50, 30)]]


def rand(*shape, scale=0.1):
    return scale * torch.randn(*shape)


def layer_norm_params(state, prefix, dim):
    state[prefix + ".weight"], state[prefix + ".bias"] = 1 + rand(dim), rand(dim)


# ------------------------------------------------------------------------------------------------
# HPSv2: a tiny open_clip ViT CLIP, and open_clip's forward written out

def open_clip_state(vocab, ctx=16, embed=16, layers=2, patch=8, image=32):
    torch.manual_seed(0)
    s = {"visual.conv1.weight": rand(W, 3, patch, patch), "visual.class_embedding": rand(W),
         "visual.positional_embedding": rand((image // patch) ** 2 + 1, W), "visual.proj": rand(W, embed),
         "token_embedding.weight": rand(vocab, W), "positional_embedding": rand(ctx, W),
         "text_projection": rand(W, embed), "logit_scale": torch.tensor(4.6052)}
    for p in ["visual.ln_pre", "visual.ln_post", "ln_final"]:
        layer_norm_params(s, p, W)
    for tower in ["visual.transformer", "transformer"]:
        for i in range(layers):
            b = f"{tower}.resblocks.{i}."
            s[b + "attn.in_proj_weight"], s[b + "attn.in_proj_bias"] = rand(3 * W, W), rand(3 * W)
            s[b + "attn.out_proj.weight"], s[b + "attn.out_proj.bias"] = rand(W, W), rand(W)
            s[b + "mlp.c_fc.weight"], s[b + "mlp.c_fc.bias"] = rand(2 * W, W), rand(2 * W)
            s[b + "mlp.c_proj.weight"], s[b + "mlp.c_proj.bias"] = rand(W, 2 * W), rand(W)
            layer_norm_params(s, b + "ln_1", W)
            layer_norm_params(s, b + "ln_2", W)
    return s


def open_clip_blocks(s, tower, x, mask=None):
    """open_clip's ResidualAttentionBlock: x + attn(ln_1(x)), x + mlp(ln_2(x)), with nn.MultiheadAttention."""
    i = 0
    while f"{tower}.resblocks.{i}.ln_1.weight" in s:
        b = f"{tower}.resblocks.{i}."
        ln = lambda name, y: F.layer_norm(y, (W,), s[b + name + ".weight"], s[b + name + ".bias"], 1e-5)
        attn = torch.nn.MultiheadAttention(W, W // 64, batch_first=True)
        attn.load_state_dict({"in_proj_weight": s[b + "attn.in_proj_weight"], "in_proj_bias": s[b + "attn.in_proj_bias"],
                              "out_proj.weight": s[b + "attn.out_proj.weight"], "out_proj.bias": s[b + "attn.out_proj.bias"]})
        h = ln("ln_1", x)
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.gelu(F.linear(ln("ln_2", x), s[b + "mlp.c_fc.weight"], s[b + "mlp.c_fc.bias"]))
        x = x + F.linear(h, s[b + "mlp.c_proj.weight"], s[b + "mlp.c_proj.bias"])
        i += 1
    return x


@torch.no_grad()
def open_clip_scores(s, pixels, input_ids, eos_id):
    ln = lambda name, y: F.layer_norm(y, (W,), s[name + ".weight"], s[name + ".bias"], 1e-5)
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=s["visual.conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(len(x), 1, W), x], 1) + s["visual.positional_embedding"]
    x = open_clip_blocks(s, "visual.transformer", ln("visual.ln_pre", x))
    img = ln("visual.ln_post", x[:, 0]) @ s["visual.proj"]
    t = s["token_embedding.weight"][input_ids] + s["positional_embedding"][: input_ids.shape[1]]
    causal = torch.full((t.shape[1], t.shape[1]), float("-inf")).triu(1)
    t = ln("ln_final", open_clip_blocks(s, "transformer", t, causal))
    # open_clip takes the end-of-text token (argmax of the ids with the real vocabulary, where it is the largest id)
    txt = t[torch.arange(len(t)), (input_ids == eos_id).int().argmax(-1)] @ s["text_projection"]
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


@pytest.fixture(scope="module")
def hps(tmp_path_factory):
    from toy.models import write_tokenizer
    path = tmp_path_factory.mktemp("hps")
    tok = write_tokenizer(str(path / "tokenizer"), words=" ".join(PROMPTS).split())
    state = open_clip_state(len(tok))
    torch.save({"state_dict": {k: v.half() for k, v in state.items()}, "epoch": 3}, path / "HPS_tiny.pt")  # fp16, as released
    return {k: v.half().float() for k, v in state.items()}, str(path / "HPS_tiny.pt"), str(path / "tokenizer"), tok


def args_for(hps_weights="unused", hps_tokenizer="unused", ir_weights="unused", ir_tokenizer="unused"):
    return argparse.Namespace(hpsv2_weights=hps_weights, hpsv2_tokenizer=hps_tokenizer,
                              imagereward_weights=ir_weights, imagereward_tokenizer=ir_tokenizer)


def test_hpsv2_from_open_clip_checkpoint_matches_open_clip_forward(hps, tmp_path):
    state, ckpt, tok_dir, tok = hps
    score = load_scorers(["hpsv2"], args_for(ckpt, tok_dir), "cpu")["hpsv2"]
    got = score(images(), PROMPTS)
    pixels = torch.stack([reward_models.hpsv2_pixels(im, 32) for im in images()])
    ids = tok(PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    want = open_clip_scores(state, pixels, ids, tok.eos_token_id).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.ptp(want) > 0.1  # the images and prompts give different scores: the comparison can fail
    # the converter's folder loads through from_pretrained and scores the same
    import tools.convert_hpsv2 as convert
    convert.main(["--checkpoint", ckpt, "--tokenizer", tok_dir, "--out", str(tmp_path / "hf")])
    from_folder = load_scorers(["hpsv2"], args_for(str(tmp_path / "hf")), "cpu")["hpsv2"]
    np.testing.assert_allclose(from_folder(images(), PROMPTS), got, atol=1e-6)


def test_hpsv2_config_of_a_vit_h_14_checkpoint_is_open_clips_vit_h_14():
    # the shapes of HPS_v2.1_compressed.pt (on the meta device: no memory), and open_clip's ViT-H-14.json
    shapes = {"visual.conv1.weight": (1280, 3, 14, 14), "visual.positional_embedding": (257, 1280),
              "token_embedding.weight": (49408, 1024), "positional_embedding": (77, 1024), "text_projection": (1024, 1024)}
    shapes.update({f"visual.transformer.resblocks.{i}.mlp.c_fc.weight": (5120, 1280) for i in range(32)})
    shapes.update({f"transformer.resblocks.{i}.mlp.c_fc.weight": (4096, 1024) for i in range(24)})
    c = reward_models.hpsv2_config({k: torch.empty(v, device="meta") for k, v in shapes.items()})
    v, t = c.vision_config, c.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (1280, 32, 16, 14, 224)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings) == (1024, 24, 16, 77)
    assert c.projection_dim == 1024 and v.hidden_act == t.hidden_act == "gelu" and t.eos_token_id == 49407


def test_hpsv2_pads_a_non_square_image_to_square():
    black = -torch.tensor(reward_models.CLIP_MEAN) / torch.tensor(reward_models.CLIP_STD)  # 0 after normalisation
    red = (torch.tensor([204, 26, 26]) / 255 - torch.tensor(reward_models.CLIP_MEAN)) / torch.tensor(reward_models.CLIP_STD)
    wide = reward_models.hpsv2_pixels(Image.new("RGB", (64, 30), (204, 26, 26)), 32)  # -> 32 x 15, 17 rows of pad
    assert wide.shape == (3, 32, 32)
    torch.testing.assert_close(wide[:, 8:23], red.view(3, 1, 1).expand(3, 15, 32), atol=1e-5, rtol=0)  # not cropped
    torch.testing.assert_close(wide[:, :8], black.view(3, 1, 1).expand(3, 8, 32))  # 8 rows above
    torch.testing.assert_close(wide[:, 23:], black.view(3, 1, 1).expand(3, 9, 32))  # the odd row below
    tall = reward_models.hpsv2_pixels(Image.new("RGB", (30, 64), (204, 26, 26)), 32)
    torch.testing.assert_close(tall[:, :, :8], black.view(3, 1, 1).expand(3, 32, 8))
    # an image of the model's size is only normalised
    im = images()[0]
    torch.testing.assert_close(reward_models.hpsv2_pixels(im, 32), reward_models.normalize(reward_models.to_tensor(im)))


# ------------------------------------------------------------------------------------------------
# ImageReward: a tiny ImageReward.pt, and BLIP's ViT + med.py's BERT + the MLP written out

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(" ".join(PROMPTS).split()))


def imagereward_state(vocab, layers=2, patch=8, image=32, positions=40):
    torch.manual_seed(1)
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    s = {v + "patch_embed.proj.weight": rand(W, 3, patch, patch), v + "patch_embed.proj.bias": rand(W),
         v + "cls_token": rand(1, 1, W), v + "pos_embed": rand(1, (image // patch) ** 2 + 1, W),
         t + "embeddings.word_embeddings.weight": rand(vocab, W),
         t + "embeddings.position_embeddings.weight": rand(positions, W),
         t + "embeddings.position_ids": torch.arange(positions).expand(1, -1),
         "blip.vision_proj.weight": rand(16, W), "blip.vision_proj.bias": rand(16),  # BLIP heads the reward ignores
         "blip.text_proj.weight": rand(16, W), "blip.text_proj.bias": rand(16)}
    layer_norm_params(s, v + "norm", W)
    layer_norm_params(s, t + "embeddings.LayerNorm", W)
    linear = lambda name, n_out, n_in: s.update({name + ".weight": rand(n_out, n_in), name + ".bias": rand(n_out)})
    for i in range(layers):
        b = f"{v}blocks.{i}."
        linear(b + "attn.qkv", 3 * W, W), linear(b + "attn.proj", W, W)
        linear(b + "mlp.fc1", 2 * W, W), linear(b + "mlp.fc2", W, 2 * W)
        layer_norm_params(s, b + "norm1", W), layer_norm_params(s, b + "norm2", W)
        b = f"{t}encoder.layer.{i}."
        for a in ["attention", "crossattention"]:
            for name in ["query", "key", "value"]:
                linear(f"{b}{a}.self.{name}", W, W)
            linear(f"{b}{a}.output.dense", W, W), layer_norm_params(s, f"{b}{a}.output.LayerNorm", W)
        linear(b + "intermediate.dense", 2 * W, W), linear(b + "output.dense", W, 2 * W)
        layer_norm_params(s, b + "output.LayerNorm", W)
    for i, (n_out, n_in) in zip([0, 2, 4, 6, 7], [(1024, W), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        s[f"mlp.layers.{i}.weight"], s[f"mlp.layers.{i}.bias"] = rand(n_out, n_in, scale=n_in ** -0.5), rand(n_out)
    return s


def attention(q, k, v, mask=None):  # (N, L, W) each -> (N, L, W), two heads
    split = lambda x: x.view(*x.shape[:2], -1, 64).transpose(1, 2)
    a = split(q) @ split(k).transpose(-1, -2) / 8.0
    if mask is not None:
        a = a + (1.0 - mask[:, None, None, :]) * -10000.0  # med.py's extended attention mask
    return (a.softmax(-1) @ split(v)).transpose(1, 2).reshape(q.shape)


@torch.no_grad()
def imagereward_reference(s, pixels, ids, mask):
    lin = lambda name, x: F.linear(x, s[name + ".weight"], s[name + ".bias"])
    ln = lambda name, x, eps: F.layer_norm(x, (W,), s[name + ".weight"], s[name + ".bias"], eps)
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
    x = torch.cat([s[v + "cls_token"].expand(len(x), 1, W), x], 1) + s[v + "pos_embed"]
    for i in range(2):  # timm-style pre-norm blocks, LayerNorm eps 1e-6
        b = f"{v}blocks.{i}."
        q, k, val = lin(b + "attn.qkv", ln(b + "norm1", x, 1e-6)).chunk(3, -1)
        x = x + lin(b + "attn.proj", attention(q, k, val))
        x = x + lin(b + "mlp.fc2", F.gelu(lin(b + "mlp.fc1", ln(b + "norm2", x, 1e-6))))
    image = ln(v + "norm", x, 1e-6)
    h = ln(t + "embeddings.LayerNorm", s[t + "embeddings.word_embeddings.weight"][ids]
           + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]], 1e-12)
    for i in range(2):  # BERT post-norm layers; the cross-attention's keys and values come from the image
        b = f"{t}encoder.layer.{i}."
        for a, kv, m in [("attention", h, mask.float()), ("crossattention", image, None)]:
            out = attention(lin(f"{b}{a}.self.query", h), lin(f"{b}{a}.self.key", kv), lin(f"{b}{a}.self.value", kv), m)
            h = ln(f"{b}{a}.output.LayerNorm", h + lin(f"{b}{a}.output.dense", out), 1e-12)
        h = ln(b + "output.LayerNorm", h + lin(b + "output.dense", F.gelu(lin(b + "intermediate.dense", h))), 1e-12)
    r = h[:, 0]
    for i in [0, 2, 4, 6, 7]:
        r = lin(f"mlp.layers.{i}", r)
    return ((r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072)


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    from transformers import BertTokenizer
    path = tmp_path_factory.mktemp("ir")
    (path / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(str(path / "tokenizer"))
    state = imagereward_state(len(BERT_WORDS) + 2)  # + [DEC] and [ENC], as BLIP's tokenizer adds
    torch.save(state, path / "ImageReward_tiny.pt")
    return state, str(path / "ImageReward_tiny.pt"), str(path / "tokenizer")


def test_imagereward_checkpoint_matches_blip_forward(ir):
    from transformers import BertTokenizer
    state, ckpt, tok_dir = ir
    got = load_scorers(["imagereward"], args_for(ir_weights=ckpt, ir_tokenizer=tok_dir), "cpu")["imagereward"](
        images(), PROMPTS)
    pixels = torch.stack([reward_models.imagereward_pixels(im, 32) for im in images()])
    tok = BertTokenizer.from_pretrained(tok_dir)(PROMPTS, padding="max_length", truncation=True, max_length=35,
                                                return_tensors="pt")
    assert tok["input_ids"].shape == (3, 35) and (tok["input_ids"][:, 0] == BERT_WORDS.index("[CLS]")).all()
    want = imagereward_reference(state, pixels, tok["input_ids"], tok["attention_mask"]).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.ptp(want) > 0.05  # scores differ between pairs: the comparison can fail


def test_imagereward_resizes_the_short_side_and_crops_the_centre():
    a = np.zeros((30, 120, 3), np.uint8)
    a[:, :30], a[:, 30:90], a[:, 90:] = (200, 0, 0), (0, 200, 0), (0, 0, 200)  # red | green | blue
    x = reward_models.imagereward_pixels(Image.fromarray(a), 32)  # -> 128 x 32, keep columns 48..80 (orig 45..75)
    green = (torch.tensor([0.0, 200 / 255, 0.0]) - torch.tensor(reward_models.CLIP_MEAN)) / torch.tensor(reward_models.CLIP_STD)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, green.view(3, 1, 1).expand(3, 32, 32), atol=0.02, rtol=0)  # all rows: no padding


# ------------------------------------------------------------------------------------------------
# bad weights: one line naming the problem, before any generation


def test_bad_weights_are_one_line(hps, ir, tmp_path):
    _, hps_ckpt, hps_tok, _ = hps
    _, ir_ckpt, ir_tok = ir
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    cases = [("hpsv2", args_for(str(tmp_path / "nope.pt"), hps_tok), "weights file not found"),
             ("hpsv2", args_for(ir_ckpt, hps_tok), "not an open_clip CLIP checkpoint"),
             ("hpsv2", args_for(str(tmp_path / "garbage.pt"), hps_tok), "not a plain tensor checkpoint"),
             ("hpsv2", args_for(str(tmp_path / "empty"), hps_tok), "has no config.json"),
             ("hpsv2", args_for(hps_ckpt, str(tmp_path / "no_tokenizer")), "tokenizer folder not found"),
             ("imagereward", args_for(ir_weights=hps_ckpt, ir_tokenizer=ir_tok), "not an ImageReward checkpoint"),
             ("imagereward", args_for(ir_weights=str(tmp_path / "nope.pt"), ir_tokenizer=ir_tok), "weights file not found"),
             ("imagereward", args_for(ir_weights=ir_ckpt, ir_tokenizer=hps_tok), "tokens, the checkpoint embeds")]
    for scorer, args, message in cases:
        with pytest.raises(SystemExit, match=message) as e:
            load_scorers([scorer], args, "cpu")
        assert "\n" not in str(e.value), str(e.value)


def test_evaluate_stops_on_bad_weights_before_generating(tiny_pipe_dir, ir, tmp_path):
    _, ir_ckpt, _ = ir
    (tmp_path / "p.txt").write_text("a red circle\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="not an open_clip CLIP checkpoint"):
        evaluate.main(["--pretrained", tiny_pipe_dir, "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                       "--scorers", "toy.scorers:redness,hpsv2", "--hpsv2_weights", ir_ckpt])
    assert not os.path.exists(out)  # nothing generated, nothing written
