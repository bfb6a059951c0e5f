"""HPSv2 and ImageReward rebuilt from transformers' own modules, and the key maps from their official checkpoints.

    model = hpsv2_from_open_clip(torch.load("HPS_v2.1_compressed.pt", weights_only=True)["state_dict"])  # CLIPModel
    model = imagereward_from_checkpoint(torch.load("ImageReward.pt", weights_only=True))       # ImageRewardModel

Neither original package is needed (open_clip and image-reward both need torchvision, and ImageReward's BLIP code
does not import under transformers 5). What each original does, and we do the same:

- HPSv2 / HPSv2.1 (Wu et al. 2023, github.com/tgxs002/HPSv2): an open_clip ViT-H-14 fine-tuned on HPD v2. Its
  scorer (img_score.py) preprocesses with open_clip's `image_transform(224, is_train=False, resize_longest_max=True)`:
  to a float tensor in [0, 1], the LONGER side resized to 224 (bicubic on the tensor, antialiased, as torchvision
  >= 0.17 does; sizes rounded with Python's round), then padded with black (0) to 224 x 224, centred (the odd pixel
  on the right/bottom), then normalised with OpenAI CLIP's mean and std. A non-square image is padded, not cropped.
  Score: cos(image features, text features), about 0.25-0.30 for SD1.5 images.
  One deliberate difference: the original skips the pad when the longer side is already 224 (a non-square image of
  that size then fails inside the model); we pad it.
- ImageReward v1.0 (Xu et al. 2023, github.com/THUDM/ImageReward): BLIP's ViT-L/16 at 224 px, a BERT-base text
  encoder with cross-attention to the image in every layer (BLIP's med_config, encoder width 1024), and an MLP on
  the [CLS] output; reward = (mlp - 0.16717) / 1.03334. Preprocessing: the SHORTER side resized to 224 (PIL
  bicubic; the longer side truncated to an int, as torchvision's Resize does), a centre crop of 224 (offsets
  rounded), OpenAI CLIP's mean and std. Prompts: bert-base-uncased's tokenizer, padded to 35 tokens, truncated.

Model sizes are read from the checkpoints' shapes (so tiny test checkpoints build tiny models); the head count,
which shapes do not show, is width // 64 (ViT-H-14's text tower 1024 -> 16, BLIP ViT-L 1024 -> 16, BERT-base 768 -> 12)
except ViT-H-14's vision tower: 1280 wide with head_width 80, 16 heads (open_clip's ViT-H-14.json).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's normalisation
IMAGEREWARD_MAX_TOKENS = 35  # ImageReward.score's tokenizer call: padding="max_length", max_length=35


def without_init(build):
    """build() with torch's weight initialisers switched off: every weight is overwritten from the checkpoint, and
    initialising ViT-H-14's billion parameters first costs about half a minute on a CPU."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers: initialise, only slower
        return build()
    with no_init_weights():
        return build()


def head_count(width):
    """Attention heads of a tower of this width: 64 per head (BERT-base, BLIP ViT-L, open_clip text towers and ViT-B/L),
    except open_clip's ViT-H-14 vision tower, whose config sets head_width 80 (1280 wide, 16 heads)."""
    return 16 if width == 1280 else max(1, width // 64)


def to_tensor(image):
    """A PIL image as a (3, H, W) float32 tensor in [0, 1], like torchvision's ToTensor."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def normalize(pixels, mean=CLIP_MEAN, std=CLIP_STD):
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ------------------------------------------------------------------------------------------------
# HPSv2: open_clip ViT-H-14 -> transformers CLIPModel

def hpsv2_pixels(image, size=224):
    """HPSv2's validation transform (open_clip ResizeMaxSize + pad): (3, size, size), normalised."""
    x = to_tensor(image)
    h, w = x.shape[1:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):  # torchvision's tensor resize: bicubic, antialiased, not clamped
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[0]
    pad_h, pad_w = size - new_h, size - new_w
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)  # black bars
    return normalize(x)


def is_open_clip_state(state):
    return "visual.conv1.weight" in state and "token_embedding.weight" in state and "text_projection" in state


def hpsv2_config(state, eos_token_id=49407):
    """The CLIPConfig of an open_clip ViT CLIP checkpoint (ViT-H-14 for HPSv2), read from its shapes."""
    from transformers import CLIPConfig
    layers = lambda prefix: len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
    width, _, patch, _ = state["visual.conv1.weight"].shape
    text_width = state["token_embedding.weight"].shape[1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    vision = dict(hidden_size=width, intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=layers("visual.transformer.resblocks."), num_attention_heads=head_count(width),
                  image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-5)
    text = dict(vocab_size=state["token_embedding.weight"].shape[0], hidden_size=text_width,
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=layers("transformer.resblocks."), num_attention_heads=head_count(text_width),
                max_position_embeddings=state["positional_embedding"].shape[0], hidden_act="gelu", layer_norm_eps=1e-5,
                bos_token_id=eos_token_id - 1, eos_token_id=eos_token_id, pad_token_id=0)  # open_clip pads with 0
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=state["text_projection"].shape[1])


def open_clip_to_hf(state):
    """open_clip CLIP state dict -> transformers CLIPModel state dict (float32). Raises ValueError on another kind."""
    if not is_open_clip_state(state):
        raise ValueError("not an open_clip CLIP checkpoint (no visual.conv1.weight / token_embedding.weight)")
    if any(k.startswith("visual.trunk.") or k.startswith("text.transformer.") for k in state):
        raise ValueError("an open_clip model with a timm or HF tower, not HPSv2's ViT-H-14")
    state = {k: v.float() for k, v in state.items()}
    out = {}

    def tower(src, dst, n_layers):
        for i in range(n_layers):
            s, d = f"{src}.resblocks.{i}.", f"{dst}.encoder.layers.{i}."
            q, k, v = state[s + "attn.in_proj_weight"].chunk(3)  # nn.MultiheadAttention packs q, k, v
            qb, kb, vb = state[s + "attn.in_proj_bias"].chunk(3)
            out.update({d + "self_attn.q_proj.weight": q, d + "self_attn.k_proj.weight": k, d + "self_attn.v_proj.weight": v,
                        d + "self_attn.q_proj.bias": qb, d + "self_attn.k_proj.bias": kb, d + "self_attn.v_proj.bias": vb})
            for a, b in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                out[d + b + ".weight"], out[d + b + ".bias"] = state[s + a + ".weight"], state[s + a + ".bias"]

    config = hpsv2_config(state)
    tower("visual.transformer", "vision_model", config.vision_config.num_hidden_layers)
    tower("transformer", "text_model", config.text_config.num_hidden_layers)
    out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
    out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    for a, b in [("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")]:
        out[b + ".weight"], out[b + ".bias"] = state[a + ".weight"], state[a + ".bias"]
    out["visual_projection.weight"] = state["visual.proj"].T.contiguous()  # open_clip: x @ proj
    out["text_projection.weight"] = state["text_projection"].T.contiguous()
    out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
    out["logit_scale"] = state["logit_scale"].reshape(())
    return out


def hpsv2_from_open_clip(state, eos_token_id=49407):
    """A transformers CLIPModel (eval mode, float32) with the weights of an open_clip checkpoint's state dict."""
    from transformers import CLIPModel
    hf = open_clip_to_hf(state)
    model = without_init(lambda: CLIPModel(hpsv2_config(state, eos_token_id)))
    missing, unexpected = model.load_state_dict(hf, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers, rebuilt by the model
    if missing or unexpected:
        raise ValueError(f"key mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def hpsv2_scores(model, tokenizer, images, prompts):
    """cos(image, prompt) with HPSv2's preprocessing and a 77-token context (truncated). (N,) float32."""
    size = model.config.vision_config.image_size
    pixels = torch.stack([hpsv2_pixels(im, size) for im in images]).to(model.device, model.dtype)
    tok = tokenizer(list(prompts), padding="max_length", truncation=True,
                    max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
    img = model.get_image_features(pixel_values=pixels).pooler_output
    txt = model.get_text_features(input_ids=tok["input_ids"].to(model.device),
                                  attention_mask=tok["attention_mask"].to(model.device)).pooler_output
    return (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1).cpu()


# ------------------------------------------------------------------------------------------------
# ImageReward: BLIP ViT + BERT with cross-attention + MLP, from transformers' BLIP modules

def imagereward_pixels(image, size=224):
    """ImageReward's transform: Resize(size, bicubic) on the shorter side, CenterCrop(size), CLIP normalisation."""
    from PIL import Image
    image = image.convert("RGB")
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # torchvision truncates the longer side
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return normalize(to_tensor(image.crop((left, top, left + size, top + size))))


def is_imagereward_state(state):
    return "blip.visual_encoder.patch_embed.proj.weight" in state and "mlp.layers.0.weight" in state


def imagereward_configs(state):
    """(BlipVisionConfig, BlipTextConfig) of an ImageReward checkpoint, read from its shapes (BLIP's med_config)."""
    from transformers import BlipTextConfig, BlipVisionConfig
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
    width, _, patch, _ = state["blip.visual_encoder.patch_embed.proj.weight"].shape
    grid = math.isqrt(state["blip.visual_encoder.pos_embed"].shape[1] - 1)
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                              num_hidden_layers=count("blip.visual_encoder.blocks."), num_attention_heads=head_count(width),
                              image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6)
    t = "blip.text_encoder."
    vocab, text_width = state[t + "embeddings.word_embeddings.weight"].shape
    text = BlipTextConfig(vocab_size=vocab, hidden_size=text_width, encoder_hidden_size=width,
                          intermediate_size=state[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                          num_hidden_layers=count(t + "encoder.layer."), num_attention_heads=head_count(text_width),
                          max_position_embeddings=state[t + "embeddings.position_embeddings.weight"].shape[0],
                          hidden_act="gelu", layer_norm_eps=1e-12, is_decoder=True,
                          bos_token_id=None, sep_token_id=None, pad_token_id=0)  # is_decoder: build cross-attention
    return vision, text


class ImageRewardModel(torch.nn.Module):
    """ImageReward: reward = (mlp(text_encoder(prompt, cross-attending to vit(image))[CLS]) - mean) / std."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        d = text_config.hidden_size  # the original MLP: no activations between the linears; dropouts keep its keys
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                                       torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, pixel_values, input_ids, attention_mask):  # (N, 3, 224, 224), (N, L), (N, L) -> (N,)
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state  # (N, 1 + patches, 1024)
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        cls = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state[:, 0]  # bidirectional
        return ((self.mlp(cls.float()) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


def imagereward_to_hf(state):
    """ImageReward.pt state dict -> ImageRewardModel state dict. Raises ValueError on another kind of checkpoint."""
    if not is_imagereward_state(state):
        raise ValueError("not an ImageReward checkpoint (no blip.visual_encoder.patch_embed.proj.weight / mlp.layers.0.weight)")
    state = {k: v.float() for k, v in state.items()}
    out, v = {}, "blip.visual_encoder."
    out["vision.embeddings.patch_embedding.weight"] = state[v + "patch_embed.proj.weight"]
    out["vision.embeddings.patch_embedding.bias"] = state[v + "patch_embed.proj.bias"]
    out["vision.embeddings.class_embedding"] = state[v + "cls_token"]
    out["vision.embeddings.position_embedding"] = state[v + "pos_embed"]
    out["vision.post_layernorm.weight"], out["vision.post_layernorm.bias"] = state[v + "norm.weight"], state[v + "norm.bias"]
    for key, value in state.items():
        if key.startswith(v + "blocks."):  # blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}
            i, rest = key[len(v + "blocks."):].split(".", 1)
            for a, b in [("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"),
                         ("attn.proj", "self_attn.projection"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
                if rest.startswith(a + "."):
                    out[f"vision.encoder.layers.{i}.{b}{rest[len(a):]}"] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            out["text." + key[len("blip.text_encoder."):]] = value  # med.py's BERT names are transformers' BLIP text names
        elif key.startswith("mlp.layers."):
            out["mlp." + key[len("mlp.layers."):]] = value
    return out  # blip.vision_proj / text_proj / itm_head (BLIP pretraining heads) are not used by the reward


def imagereward_from_checkpoint(state):
    """An ImageRewardModel (eval, float32) with the weights of an ImageReward.pt state dict."""
    model = without_init(lambda: ImageRewardModel(*imagereward_configs(state)))
    missing, unexpected = model.load_state_dict(imagereward_to_hf(state), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"key mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval().requires_grad_(False)


def imagereward_tokenizer(tokenizer):
    """bert-base-uncased's tokenizer with BLIP's two added tokens ([DEC], [ENC]: ids 30522, 30523), as init_tokenizer does."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


@torch.no_grad()
def imagereward_scores(model, tokenizer, images, prompts):
    """ImageReward's normalised reward of each (image, prompt). (N,) float32."""
    device = next(model.parameters()).device
    size = model.vision.config.image_size
    pixels = torch.stack([imagereward_pixels(im, size) for im in images]).to(device)
    tok = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS,
                    return_tensors="pt")
    return model(pixels, tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu()
