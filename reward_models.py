"""HPSv2, ImageReward and HPSv3 rebuilt from transformers' own modules, and the key maps from their official files.

    model = hpsv2_from_open_clip(torch.load("HPS_v2.1_compressed.pt", weights_only=True)["state_dict"])  # CLIPModel
    model = imagereward_from_checkpoint(torch.load("ImageReward.pt", weights_only=True))       # ImageRewardModel
    model = hpsv3_from_checkpoint(safetensors.torch.load_file("HPSv3.safetensors"), qwen2_vl_config)  # HPSv3Model

No original package is needed (open_clip, image-reward and hpsv3 all need torchvision, ImageReward's BLIP code does
not import under transformers 5, and hpsv3 pins transformers 4.45.2). What each original does, and we do the same:

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

- HPSv3 (Ma et al. 2025, github.com/MizzenAI/HPSv3, hpsv3 1.0.0 on PyPI): Qwen2-VL-7B-Instruct with a small MLP
  ("rm_head") on the last hidden state of an added <|Reward|> token; it gives (mu, sigma) and the score is mu. Below,
  in its own section.

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


# ------------------------------------------------------------------------------------------------
# HPSv3: Qwen2-VL-7B-Instruct + a reward head on the hidden state of an added <|Reward|> token
#
# What the original does (hpsv3 1.0.0: inference.py HPSv3RewardInferencer, model/qwen2vl_trainer.py
# Qwen2VLRewardModelBT, dataset/data_collator_qwen.py, config/HPSv3_7B.yaml), and we do the same:
# - the image: resized with PIL bicubic so that both sides are multiples of 28 and the area is about 256 * 28 * 28
#   (qwen-vl-utils' smart_resize with min_pixels = max_pixels), whatever its size: 256 visual tokens for a square;
#   then Qwen2-VL's image processor: /255, OpenAI CLIP's mean and std, 14 x 14 patches (its own resize is a no-op
#   on such a size);
# - the text: Qwen2-VL-7B-Instruct's chat template around one user turn, the image followed by HPSv3's instruction
#   with the prompt in it and "Please provide the overall ratings of this image: <|Reward|>"; the tokenizer gets
#   <|Reward|> as an added special token, the embeddings are resized to it, batches are padded on the right;
# - the model: the decoder is called WITHOUT position ids, so every token, the image's included, gets its plain index
#   0..L-1 on all three of Qwen2-VL's rotary axes (not the 2-D image positions that Qwen2-VL's own forward computes);
# - the head: Linear(3584, 1024), ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2) in float32 on the <|Reward|>
#   token's last hidden state; out come (mu, sigma) of its uncertainty-aware ranking loss, and the score is mu;
# - precision: the model in bf16, the head in float32 (on a CPU we run all of it in float32: the original cannot run
#   its bf16 model there, its head's autocast is for CUDA only); the bf16 cast includes the rotary frequencies, which
#   stay bf16 numbers in float32 too, and the vision tower's rotary angles are computed in bf16 (HPSv3VisionRotary);
#   attention is PyTorch's SDPA (hpsv3 1.0.0 uses FlashAttention 2 where it is installed: bf16 rounding apart, the same);
# - the checkpoint (MizzenAI/HPSv3:HPSv3.safetensors) is the state dict of that model class under transformers 4.45.2,
#   loaded with strict=True: visual.* (the ViT and its merger), model.* (the decoder), lm_head.weight (unused for the
#   score: we drop it, 1 GB) and rm_head.{0,3,5}.*; a training checkpoint may wrap it in {"model": ...}.

HPSV3_PIXELS = 256 * 28 * 28  # inference.py's min_pixels = max_pixels: every image becomes about 448 x 448
HPSV3_FACTOR = 28  # Qwen2-VL's patch (14) times its merge size (2): both sides are multiples of this
REWARD_TOKEN = "<|Reward|>"
# data_collator_qwen.py's INSTRUCTION (hpsv3 1.0.0, MIT, (c) 2024 HPSv3 Team), line by line so that its trailing spaces
# stay visible; sha256 0393599d...e68b7a, checked in the tests
HPSV3_INSTRUCTION = "\n".join([
    "",
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being "
    "the best. ",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal "
    "body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.",
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult "
    "material. If such content is present, the image quality and satisfaction score should be the lowest possible. ",
    "",
    "**Text Alignment:**  ",
    "Assess how well the image matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.",
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.",
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, "
    "but critical attributes should be preserved.",
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.",
    "Textual prompt - {text_prompt}",
    "", "", ""])
HPSV3_RATING = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"  # prompt_with_special_token


def hpsv3_size(height, width, pixels=HPSV3_PIXELS, factor=HPSV3_FACTOR):
    """qwen-vl-utils' smart_resize with min_pixels = max_pixels = pixels: (height, width), both multiples of factor,
    the aspect ratio kept as well as that allows, the area as close to `pixels` as the rounding allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"hpsv3: aspect ratio over 200 ({width} x {height}), which Qwen2-VL refuses")
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > pixels:  # too big: scale down, round down
        beta = math.sqrt(height * width / pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < pixels:  # too small: scale up, round up
        beta = math.sqrt(pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def hpsv3_pixels(image, patch=14, merge=2, temporal=2):
    """HPSv3's image input: ((h/14) * (w/14), 3 * 2 * 14 * 14) float32 patches and the grid [1, h/14, w/14].

    Each 14 x 14 patch is flattened with the image repeated twice in time (Qwen2-VL's patches are two video frames
    deep), and the patches are ordered so that each 2 x 2 group that the merger joins into one token is contiguous."""
    from PIL import Image
    image = image.convert("RGB")
    h, w = hpsv3_size(image.height, image.width)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BICUBIC)
    x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers' rescale: in float64
    x = normalize(torch.from_numpy(x).permute(2, 0, 1))  # (3, h, w)
    gh, gw = h // patch, w // patch
    x = x[None].expand(temporal, -1, -1, -1).reshape(temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(2, 5, 3, 6, 1, 0, 4, 7)  # (gh/2, gw/2, 2, 2, channel, time, 14, 14)
    return x.reshape(gh * gw, 3 * temporal * patch * patch), torch.tensor([1, gh, gw])


def hpsv3_text(prompt, image_tokens):
    """The whole input text of one (image, prompt): Qwen2-VL-7B-Instruct's chat template with its default system turn,
    one user turn (the image, then HPSv3's instruction and rating line) and the generation prompt; <|image_pad|>
    repeated once per visual token, as Qwen2VLProcessor expands it."""
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|>" + "<|image_pad|>" * image_tokens + "<|vision_end|>"
            + HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_RATING + "<|im_end|>\n<|im_start|>assistant\n")


def is_hpsv3_state(state):
    return all(k in state for k in ["visual.patch_embed.proj.weight", "model.embed_tokens.weight", "rm_head.0.weight"])


def hpsv3_head(hidden_size):
    """The 'ranknet' rm_head with no rm_head_kwargs (HPSv3_7B.yaml): keys 0, 3, 5; the dropout does nothing in eval."""
    return torch.nn.Sequential(torch.nn.Linear(hidden_size, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


class HPSv3VisionRotary(torch.nn.Module):
    """The vision tower's 2-D rotary table as transformers 4.45 computes it in the original's model, which is moved to
    bf16 whole (buffers included): the angles rounded to the table's dtype and their cos and sin computed in it. In
    float32 this is transformers 5's own table (tested); in bf16 transformers 5 would compute the angles in float32."""

    def __init__(self, vision_config):
        super().__init__()
        quarter = vision_config.embed_dim // vision_config.num_heads // 2  # half the head for rows, half for columns
        theta = (getattr(vision_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.inv_freq = torch.nn.Buffer(1.0 / theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter),
                                        persistent=False)

    def forward(self, x, position_ids):  # position_ids: (N, 2), the row and column of each patch
        angles = position_ids[..., None].to(self.inv_freq.dtype) * self.inv_freq  # (N, 2, head/4), in the model's dtype
        cos, sin = angles.cos().float().flatten(1), angles.sin().float().flatten(1)  # (N, head/2): rows, then columns
        return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # (N, head)


class HPSv3Model(torch.nn.Module):
    """HPSv3: Qwen2-VL's vision tower and decoder (transformers 5's classes) and the reward head; forward -> (B, 2)."""

    def __init__(self, config, reward_token_id):
        super().__init__()
        from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl
        self.visual = qwen2_vl.Qwen2VisionTransformerPretrainedModel(config.vision_config)  # ViT + 2 x 2 patch merger
        self.language_model = qwen2_vl.Qwen2VLTextModel(config.text_config)  # the decoder, without its LM head
        self.rm_head = hpsv3_head(config.text_config.hidden_size)
        self.image_token_id, self.reward_token_id = config.image_token_id, reward_token_id

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw):  # (B, L), (B, L), (n, 1176), (B, 3)
        embeds = self.language_model.embed_tokens(input_ids)  # (B, L, d)
        pixel_values = pixel_values.to(self.visual.get_dtype())
        image = self.visual(pixel_values, grid_thw=image_grid_thw).pooler_output  # (visual tokens, d), merged
        embeds = embeds.masked_scatter((input_ids == self.image_token_id)[..., None], image.to(embeds.dtype))
        # the original calls the decoder with no position ids: plain indices on all three rotary axes (see above)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(3, *input_ids.shape)  # (3, B, L)
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                     use_cache=False).last_hidden_state  # (B, L, d)
        at_reward = input_ids == self.reward_token_id
        if not (at_reward.sum(1) == 1).all():
            raise ValueError(f"hpsv3: each input needs exactly one {REWARD_TOKEN} token (a prompt may not contain it)")
        return self.rm_head(hidden[at_reward].float())  # (B, 2): mu, sigma; the head in float32, as the original


def hpsv3_to_hf(state, dtype=torch.float32):
    """HPSv3.safetensors state dict -> HPSv3Model state dict: model.* is the decoder, lm_head is dropped; the towers
    cast to `dtype`, the head to float32. Each tensor is taken out of `state` as it is cast, so that the checkpoint's
    copy of a weight is freed as its cast copy is made: at most one layer is held twice (the CPU's float32 model
    needs the 31 GB of its own weights, not those plus the checkpoint's 16.6 GB)."""
    if not is_hpsv3_state(state):
        raise ValueError("not an HPSv3 checkpoint (no visual.patch_embed / model.embed_tokens / rm_head.0 weights)")
    out = {}
    for key in list(state):
        if key.startswith("model."):
            out["language_model." + key[len("model."):]] = state.pop(key).to(dtype)
        elif key.startswith("visual."):
            out[key] = state.pop(key).to(dtype)
        elif key.startswith("rm_head."):
            out[key] = state.pop(key).float()
    return out


def hpsv3_from_checkpoint(state, config, reward_token_id, dtype=torch.float32):
    """An HPSv3Model (eval) with an HPSv3 checkpoint's weights: the towers in `dtype`, the head in float32.

    `config` is Qwen2-VL-7B-Instruct's Qwen2VLConfig; its vocabulary is resized to the checkpoint's (+ <|Reward|>).
    `state` (unwrapped from {"model": ...} if a training checkpoint, as scorers.state_dict_of does) is emptied of the
    weights it gives. The model is built on the meta device and takes the cast tensors as its weights (assign=True):
    7B does not sit in memory twice. Only the rotary tables, computed from the config and not stored, are then built for real, with
    bf16 frequencies as the original's (below)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
    hf = hpsv3_to_hf(state, dtype)
    vocab, width = hf["language_model.embed_tokens.weight"].shape
    if width != config.text_config.hidden_size:
        raise ValueError(f"the checkpoint is {width} wide, the config {config.text_config.hidden_size}: "
                         f"not the Qwen2-VL it was trained from")
    config.text_config.vocab_size = vocab
    with torch.device("meta"):
        model = HPSv3Model(config, reward_token_id)
    missing, unexpected = model.load_state_dict(hf, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"key mapping incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.language_model.rotary_emb = Qwen2VLRotaryEmbedding(config=config.text_config)
    model.visual.rotary_pos_emb = HPSv3VisionRotary(config.vision_config)
    # the original casts its whole model to bf16 once built, buffers included: its rotary frequencies are bf16 numbers
    # even when it then runs in float32 (and it was trained with them); float32 ones move its scores by ~0.01
    for rotary in (model.language_model.rotary_emb, model.visual.rotary_pos_emb):
        rotary.inv_freq = rotary.inv_freq.to(torch.bfloat16).float()
    model.visual.to(dtype)  # (the rotary tables; the weights are in dtype already)
    model.language_model.to(dtype)
    return model.eval().requires_grad_(False)


def hpsv3_tokenizer(tokenizer):
    """Qwen2-VL's tokenizer with <|Reward|> added as a special token (the original's create_model_and_processor) and
    padding on the right: positions count from 0 at each input's first token, as in the original's batches."""
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    tokenizer.padding_side = "right"
    return tokenizer


@torch.no_grad()
def hpsv3_rewards(model, tokenizer, images, prompts, batch_size=8):
    """HPSv3's (mu, sigma) of each (image, prompt), batch_size pairs per forward. (N, 2) float32; the score is mu."""
    device = model.rm_head[0].weight.device
    out = []
    for start in range(0, len(images), batch_size):
        pixels, grids = zip(*[hpsv3_pixels(im) for im in images[start:start + batch_size]])
        texts = [hpsv3_text(p, int(g.prod()) // 4) for p, g in zip(prompts[start:start + batch_size], grids)]
        tok = tokenizer(texts, padding=True, return_tensors="pt")  # right padding: see hpsv3_tokenizer
        out.append(model(tok["input_ids"].to(device), tok["attention_mask"].to(device), torch.cat(pixels).to(device),
                         torch.stack(grids).to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def hpsv3_scores(model, tokenizer, images, prompts, batch_size=8):
    """HPSv3's score, mu, of each (image, prompt): the original's HPSv3RewardInferencer.reward(...)[:, 0]. (N,)"""
    return hpsv3_rewards(model, tokenizer, images, prompts, batch_size)[:, 0]
