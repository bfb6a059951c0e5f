"""HPSv2, ImageReward and HPSv3 rebuilt from transformers' modules: key maps, preprocessing, bad weights.

    python -m pytest -q tests/test_reward_models.py            # HPSv3 alone: -k hpsv3

Each checkpoint is written by hand here with the official key names and shapes (open_clip, image-reward and hpsv3 are
not installed), tiny but with two attention heads; the converted model's scores must equal a forward pass written
out below in plain torch, the way open_clip and ImageReward's BLIP compute it. HPSv3's 7B Qwen2-VL is not written out:
its tests check the key map, the prompt template and the preprocessing against hand-computed values, and what the
score is read from. The check against the original packages is tools/check_scorers_against_originals.sh (not run
here: it builds its own environments).
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
import scorers
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
    (tmp_path / "cut.safetensors").write_bytes(b"\x08\x00\x00")  # a download cut short
    (tmp_path / "empty").mkdir()
    cases = [("hpsv2", args_for(str(tmp_path / "cut.safetensors"), hps_tok), "cut.safetensors is not a readable safetensors file"),
             ("hpsv2", args_for(str(tmp_path / "nope.pt"), hps_tok), "weights file not found"),
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



# ------------------------------------------------------------------------------------------------
# HPSv3: a tiny Qwen2-VL in the layout of Qwen/Qwen2-VL-7B-Instruct, and a checkpoint in HPSv3.safetensors' format

QWEN2_VL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # Qwen2-VL's, in its order


def qwen2_vl_config(vocab_size=152064, first_special=151643, **sizes):
    """Qwen2-VL-7B-Instruct's config.json (the flat layout of transformers 4.41 it ships in), sizes overridable."""
    ids = {t: first_special + i for i, t in enumerate(QWEN2_VL_SPECIAL)}
    c = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "attention_dropout": 0.0,
         "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
         "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
         "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
         "video_token_id": ids["<|video_pad|>"], "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
         "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
         "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
         "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False, "vocab_size": vocab_size,
         "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                           "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
         "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
    vision = sizes.pop("vision", {})
    c.update(sizes)
    c["vision_config"].update(vision)
    return c


def write_qwen2_vl_base(path):
    """A stand-in for the Qwen/Qwen2-VL-7B-Instruct folder: a byte-level BPE tokenizer (256 bytes, 3 merges) with
    Qwen2-VL's special tokens in its order, and a tiny config (2 layers, 64 wide, 4 heads of 16, 2 key/value heads)."""
    import json
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import AddedToken, Qwen2Tokenizer
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True) for t in QWEN2_VL_SPECIAL], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.save_pretrained(path)
    config = qwen2_vl_config(vocab_size=len(tok) + 2, first_special=len(vocab), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                             vision=dict(depth=2, embed_dim=64, mlp_ratio=2, num_heads=4, hidden_size=64))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return len(tok)  # <|Reward|> will be this token


@pytest.fixture(scope="module")
def hpsv3(tmp_path_factory):
    """(base folder, checkpoint, the checkpoint's tensors): random weights at unit gain (at Qwen2-VL's 0.02 init the image
    hardly reaches the <|Reward|> token), saved as HPSv3's training saves them: the state dict of its model class under
    transformers 4.45 (visual.*, model.*, lm_head.weight, rm_head.*), bf16 with the head in float32."""
    from safetensors.torch import save_file
    from transformers import AutoConfig
    path = tmp_path_factory.mktemp("hpsv3")
    reward_id = write_qwen2_vl_base(str(path / "base"))
    config = AutoConfig.from_pretrained(str(path / "base"))
    config.text_config.vocab_size = reward_id + 1  # the original resizes the embeddings to the tokenizer with <|Reward|>
    torch.manual_seed(2)
    model = reward_models.HPSv3Model(config, reward_id)
    state = {}
    for k, v in model.state_dict().items():
        v = rand(*v.shape, scale=v.shape[-1] ** -0.5) if v.dim() >= 2 else (1 + rand(*v.shape) if "norm" in k else rand(*v.shape))
        state[k.replace("language_model.", "model.", 1)] = v if k.startswith("rm_head.") else v.bfloat16()
    state["lm_head.weight"] = rand(reward_id + 1, 64).bfloat16()
    save_file(state, str(path / "HPSv3_tiny.safetensors"))
    return str(path / "base"), str(path / "HPSv3_tiny.safetensors"), state


def hpsv3_args(base, weights):
    return argparse.Namespace(hpsv3_weights=weights, hpsv3_base=base)


def test_hpsv3_prompt_is_the_originals():
    import hashlib
    import jinja2
    from check_scorers_against_originals import QWEN2_VL_CHAT_TEMPLATE
    # hpsv3 1.0.0's hpsv3/dataset/data_collator_qwen.py INSTRUCTION, hashed from the package's file
    assert hashlib.sha256(reward_models.HPSV3_INSTRUCTION.encode()).hexdigest() == \
        "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a"
    text = reward_models.hpsv3_text("a {red} circle", 2)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>\nYou are tasked with evaluating")
    assert "Textual prompt - a {red} circle\n\n\n\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n" \
           "<|im_end|>\n<|im_start|>assistant\n" == text[text.index("Textual prompt"):]  # braces in a prompt stay
    # the same text as Qwen2-VL-7B-Instruct's chat template renders the original's message (inference.py), with the
    # image's placeholder expanded as Qwen2VLProcessor does
    message = [{"role": "user", "content": [
        {"type": "image", "image": "x.png", "min_pixels": 200704, "max_pixels": 200704},
        {"type": "text", "text": reward_models.HPSV3_INSTRUCTION.format(text_prompt="a {red} circle")
         + reward_models.HPSV3_RATING}]}]
    rendered = jinja2.Environment().from_string(QWEN2_VL_CHAT_TEMPLATE).render(messages=message, add_generation_prompt=True)
    assert rendered.replace("<|image_pad|>", "<|image_pad|>" * 2) == text


def test_hpsv3_resize_and_patches_by_hand():
    # qwen-vl-utils' smart_resize at 256 * 28 * 28 pixels, worked by hand: (height, width) of a (w, h) image
    assert reward_models.hpsv3_size(512, 512) == (448, 448)  # 32 x 32 patches, 16 x 16 = 256 visual tokens
    assert reward_models.hpsv3_size(384, 640) == (336, 560)  # rounds to 392 x 644 > 200704: scaled by 1.1066, floored
    assert reward_models.hpsv3_size(250, 1000) == (224, 896)  # 252 x 1008 too big; floor(250 / 1.116 / 28) = 7
    assert reward_models.hpsv3_size(32, 32) == (448, 448)  # small: scaled up, ceil
    assert reward_models.hpsv3_size(500, 300) == (588, 364)  # 504 x 308 < 200704: scaled up by 1.157, ceil
    # a flat colour: every value of every patch is its normalised colour; (448/14)^2 patches of 3 x 2 x 14 x 14
    red = (torch.tensor([204, 26, 26]) / 255 - torch.tensor(reward_models.CLIP_MEAN)) / torch.tensor(reward_models.CLIP_STD)
    patches, grid = reward_models.hpsv3_pixels(Image.new("RGB", (300, 300), (204, 26, 26)))
    assert patches.shape == (1024, 1176) and grid.tolist() == [1, 32, 32]
    torch.testing.assert_close(patches.view(1024, 3, 392), red.view(1, 3, 1).expand(1024, 3, 392), atol=1e-6, rtol=0)
    # the order, by slicing: patch 4 * (16 * i + j) + 2 * a + b is the block at rows (2i + a) * 14, columns (2j + b) * 14,
    # channels outer, then the two (equal) frames, then 14 x 14 pixels
    im = images()[0].resize((448, 448))
    patches, _ = reward_models.hpsv3_pixels(im)
    x = reward_models.normalize(reward_models.to_tensor(im))  # (3, 448, 448), no resize at this size
    for i, j, a, b in [(0, 0, 0, 1), (3, 5, 1, 0), (15, 15, 1, 1)]:
        block = x[:, (2 * i + a) * 14:(2 * i + a + 1) * 14, (2 * j + b) * 14:(2 * j + b + 1) * 14]  # (3, 14, 14)
        want = block[:, None].expand(3, 2, 14, 14).reshape(-1)
        torch.testing.assert_close(patches[4 * (16 * i + j) + 2 * a + b], want, atol=1e-6, rtol=0)


def test_hpsv3_checkpoint_loads_by_key_map(hpsv3):
    base, ckpt, state = hpsv3
    model, tok = scorers.load_hpsv3(ckpt, base, "cpu")
    got = model.state_dict()
    assert not any(k.startswith("lm_head") for k in got)  # dropped: the score does not use it
    for k, v in state.items():
        if not k.startswith("lm_head"):
            assert torch.equal(got[k.replace("model.", "language_model.", 1)], v.float()), k
    assert tok.convert_tokens_to_ids(reward_models.REWARD_TOKEN) == model.reward_token_id == len(tok) - 1
    # bf16 as on a GPU: the towers in bf16, the head exactly the checkpoint's float32, the rotary frequencies bf16
    # numbers in either precision (the original casts its whole model to bf16, buffers included)
    from transformers import AutoConfig
    bf16 = reward_models.hpsv3_from_checkpoint(dict(state), AutoConfig.from_pretrained(base), model.reward_token_id,
                                               torch.bfloat16)
    assert bf16.language_model.embed_tokens.weight.dtype == bf16.visual.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.rm_head[0].weight, state["rm_head.0.weight"]) and bf16.rm_head[0].weight.dtype == torch.float32
    for rotary in (model.language_model.rotary_emb, model.visual.rotary_pos_emb):
        assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, rotary.inv_freq.bfloat16().float())


def test_hpsv3_vision_rotary_is_transformers_in_float32(hpsv3):
    from transformers import AutoConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids
    config = AutoConfig.from_pretrained(hpsv3[0]).vision_config
    ours, theirs = reward_models.HPSv3VisionRotary(config), Qwen2VLVisionRotaryEmbedding(config)
    torch.testing.assert_close(ours.inv_freq, theirs.inv_freq)
    positions = get_vision_position_ids(torch.tensor([[1, 6, 4]]), 2)  # (24, 2) rows and columns, merge-block order
    for a, b in zip(ours(None, positions), theirs(torch.zeros(1), positions)):
        torch.testing.assert_close(a, b)


def test_hpsv3_scores_read_the_reward_token(hpsv3):
    base, ckpt, _ = hpsv3
    model, tok = scorers.load_hpsv3(ckpt, base, "cpu")
    ims = images()
    rewards = reward_models.hpsv3_rewards(model, tok, ims, PROMPTS)  # one padded batch
    assert rewards.shape == (3, 2) and torch.isfinite(rewards).all()
    one_by_one = torch.cat([reward_models.hpsv3_rewards(model, tok, [im], [p]) for im, p in zip(ims, PROMPTS)])
    torch.testing.assert_close(rewards, one_by_one, atol=1e-5, rtol=0)  # right padding: positions as alone
    same_prompt = reward_models.hpsv3_scores(model, tok, ims, [PROMPTS[0]] * 3)
    same_image = reward_models.hpsv3_scores(model, tok, [ims[0]] * 3, PROMPTS)
    assert np.ptp(same_prompt.numpy()) > 1e-3 and np.ptp(same_image.numpy()) > 1e-3  # both the image and the prompt count

    def forward(text, image):
        pixels, grid = reward_models.hpsv3_pixels(image)
        t = tok([text], return_tensors="pt")
        with torch.no_grad():
            return model(t["input_ids"], t["attention_mask"], pixels, grid[None])[0, 0]
    n = int(reward_models.hpsv3_pixels(ims[0])[1].prod()) // 4
    text = reward_models.hpsv3_text(PROMPTS[0], n)
    torch.testing.assert_close(forward(text, ims[0]), same_image[0])  # the scorer's input is this text
    torch.testing.assert_close(forward(text + "more text after the reward token", ims[0]), same_image[0])  # causal
    assert abs(forward(text.replace("Textual prompt", "Textual  prompt"), ims[0]) - same_image[0]) > 1e-4
    with pytest.raises(ValueError, match="exactly one <\\|Reward\\|>"):
        forward(text + reward_models.REWARD_TOKEN, ims[0])


def test_hpsv3_through_evaluate_and_as_a_function(hpsv3, tiny_pipe_dir, ir, tmp_path):
    base, ckpt, _ = hpsv3
    (tmp_path / "p.txt").write_text("a red circle\n")
    result = evaluate.main(["--pretrained", tiny_pipe_dir, "--prompts", str(tmp_path / "p.txt"), "--n", "2",
                            "--steps", "2", "--out", str(tmp_path / "out"), "--scorers", "hpsv3",
                            "--hpsv3_weights", ckpt, "--hpsv3_base", base])
    assert np.isfinite(result["scores"]["base"]["hpsv3"]).all()
    # bad files: one line, before any generation
    cases = [(hpsv3_args(base, ir[1]), "not an HPSv3 checkpoint"),
             (hpsv3_args(base, str(tmp_path / "nope.safetensors")), "weights file not found"),
             (hpsv3_args(str(tmp_path / "nope"), ckpt), "base model folder not found")]
    for args, message in cases:
        with pytest.raises(SystemExit, match=message) as e:
            load_scorers(["hpsv3"], args, "cpu")
        assert "\n" not in str(e.value)
    # filter_fifa.py --reward_model scorers:hpsv3 (its default weights; offline here, so one line saying so)
    assert scorers.is_function("scorers:hpsv3") and scorers.load_function("scorers:hpsv3") is scorers.hpsv3
    with pytest.raises(SystemExit, match="hpsv3"):
        scorers.hpsv3(images()[:1], PROMPTS[:1])


def test_hpsv3_7b_size():
    """The parameter count behind the README's memory figure, on the meta device (no memory): Qwen2-VL-7B-Instruct's
    config with the vocabulary resized to 151,658 (151,657 tokens + <|Reward|>), without the LM head."""
    from transformers import Qwen2VLConfig
    config = Qwen2VLConfig(**{k: v for k, v in qwen2_vl_config(vocab_size=151658).items() if k != "architectures"})
    with torch.device("meta"):
        model = reward_models.HPSv3Model(config, 151657)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert round(count(model.visual) / 1e6) == 676 and round(count(model.language_model) / 1e6) == 7069
    assert round(count(model) / 1e9, 2) == 7.75 and round(count(model) * 2 / 1e9, 1) == 15.5  # GB of weights in bf16
