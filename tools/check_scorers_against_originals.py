"""Our HPSv2, ImageReward and HPSv3 against the original packages, side by side, on random weights (no download needed).

    bash tools/check_scorers_against_originals.sh        # builds the side environments, then runs the four steps:

    $VENV/bin/python tools/check_scorers_against_originals.py original-hpsv2 WORK        # hpsv2 + open_clip, torchvision
    $VENV/bin/python tools/check_scorers_against_originals.py original-imagereward WORK  # image-reward, transformers 4
    $VENV3/bin/python tools/check_scorers_against_originals.py original-hpsv3 WORK       # hpsv3 1.0.0, transformers 4.45.2
    python tools/check_scorers_against_originals.py ours WORK [hpsv2 imagereward hpsv3]  # this repo's environment

The original steps build the ORIGINAL models from their own classes with random weights (seed 0), save them in the
official checkpoint formats (HPS: {'state_dict': ...} in fp16 like HPS_v2.1_compressed.pt; ImageReward.pt: the
model's state dict), and score WORK/images with the packages' own scorers (hpsv2.img_score.score,
ImageReward.load(...).score). `ours` loads those files through scorers.py (and tools/convert_hpsv2.py's folder) and
compares: scores to 1e-4, preprocessed pixels and embeddings too. Random-weight scores are small, so the MLP of
ImageReward is re-drawn at unit gain and every comparison prints the spread of the scores beside the difference.
HPSv3 has no 7B here: the original step writes a tiny random Qwen2-VL (2 layers, 64 wide) with a byte-level tokenizer
and Qwen2-VL-7B-Instruct's chat template in the layout of Qwen/Qwen2-VL-7B-Instruct, builds HPSv3's model from it with
the package's own create_model_and_processor and HPSv3_7B.yaml, saves its state dict as HPSv3.safetensors is saved,
and scores through HPSv3RewardInferencer: in float32, and in bf16 as on a GPU. `ours` compares the scores, the input
ids (the prompt template) and the pixel patches. `ours` checks each scorer whose original step has run.
Not run by CI: it needs second environments of about 6 + 5 GB and some 15 minutes of 2 CPU cores.
"""
import json
import os
import sys

import numpy as np

PROMPTS = ["a photo of a red fox in the snow", "an oil painting of a lighthouse at dusk, dramatic sky",
           "a cute robot reading a book", "concept art of a castle on a floating island",
           "a bowl of ramen, studio lighting, 4k"]
SIZES = [(512, 512), (640, 384), (300, 500), (224, 224), (1000, 250)]  # (w, h): square, wide, tall, exact, very wide
MED_CONFIG = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu", hidden_dropout_prob=0.1,
                  hidden_size=768, initializer_range=0.02, intermediate_size=3072, layer_norm_eps=1e-12,
                  max_position_embeddings=512, model_type="bert", num_attention_heads=12, num_hidden_layers=12,
                  pad_token_id=0, type_vocab_size=2, vocab_size=30524, encoder_width=768, add_cross_attention=True)


def pairs():
    """(image index, prompt) pairs: each image with its own prompt, then every image with prompt 0 (image effect)."""
    return [(i, PROMPTS[i]) for i in range(len(SIZES))] + [(i, PROMPTS[0]) for i in range(len(SIZES))]


def make_images(work):
    """Smooth colour fields with shapes and noise, of the sizes above, saved as PNG (deterministic)."""
    from PIL import Image, ImageDraw
    os.makedirs(os.path.join(work, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(SIZES):
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        a = np.stack([np.sin(6 * x + k), np.cos(5 * y - k), np.sin(4 * (x + y) + 2 * k)], -1) * 100 + 128
        a = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
        im = Image.fromarray(a)
        ImageDraw.Draw(im).ellipse((w // 5, h // 4, w // 2, 3 * h // 4), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        im.save(os.path.join(work, "images", f"{k}.png"))


def load_images(work):
    from PIL import Image
    return [Image.open(os.path.join(work, "images", f"{k}.png")).convert("RGB") for k in range(len(SIZES))]


def write_bert_vocab(path):
    """A 30522-line WordPiece vocabulary laid out like bert-base-uncased's (its special tokens at its ids), with the
    prompts' words and the letters: bert-base-uncased cannot be downloaded here, and both sides read this file."""
    words = sorted({w for p in PROMPTS for w in p.lower().replace(",", " , ").split()})
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789,.!?'-")
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += chars + ["##" + c for c in chars] + [w for w in words if w not in chars]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 30522 - len(vocab))]
    with open(path, "w") as f:
        f.write("\n".join(vocab) + "\n")


# ------------------------------------------------------------------------------------------------
# the originals (side environment)

def original_hpsv2(work):
    import torch
    import hpsv2.img_score as img_score
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
    torch.manual_seed(0)
    # img_score.initialize_model's arguments, with pretrained=None: random weights instead of the LAION download
    model, _, preprocess_val = create_model_and_transforms(
        "ViT-H-14", None, precision="amp", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    ckpt = os.path.join(work, "HPS_random.pt")
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, ckpt)  # fp16, like _compressed
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)  # what initialize_model would set
    images = load_images(work)
    scores = [float(img_score.score(images[i], prompt, cp=ckpt, hps_version="v2.1")[0]) for i, prompt in pairs()]
    model.eval()
    tokenizer = get_tokenizer("ViT-H-14")
    with torch.no_grad():
        pixels = torch.stack([preprocess_val(im) for im in images])
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokenizer(PROMPTS), normalize=True)
    # the BPE vocabulary in transformers' layout, for our CLIPTokenizer (open_clip's SimpleTokenizer is the same BPE)
    from hpsv2.src.open_clip.tokenizer import _tokenizer
    os.makedirs(os.path.join(work, "clip_bpe"), exist_ok=True)
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's names -> OpenAI's
    with open(os.path.join(work, "clip_bpe", "vocab.json"), "w") as f:
        json.dump({rename.get(k, k): i for k, i in _tokenizer.encoder.items()}, f)
    merges = sorted(_tokenizer.bpe_ranks, key=_tokenizer.bpe_ranks.get)
    with open(os.path.join(work, "clip_bpe", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    np.savez(os.path.join(work, "hpsv2_original.npz"), scores=np.array(scores), pixels=pixels.numpy(),
             image_features=img.numpy(), text_features=txt.numpy())
    print(f"original HPSv2: {len(scores)} scores, {scores[:3]}...")


def original_imagereward(work):
    import types
    import torch
    # ImageReward/__init__ also imports ReFL.py, its fine-tuning code (diffusers, datasets, accelerate of 2023):
    # an empty module stands in for it; scoring does not touch it
    sys.modules["ImageReward.ReFL"] = types.ModuleType("ImageReward.ReFL")
    import ImageReward as RM
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from transformers import BertTokenizer
    vocab = os.path.join(work, "bert_vocab.txt")
    write_bert_vocab(vocab)

    def init_tokenizer():  # BLIP's init_tokenizer, from the local vocabulary instead of the hub's bert-base-uncased
        tok = BertTokenizer(vocab)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
        return tok
    blip_pretrain.init_tokenizer = init_tokenizer
    med_config = os.path.join(work, "med_config.json")  # THUDM/ImageReward's med_config.json (BLIP's)
    with open(med_config, "w") as f:
        json.dump(MED_CONFIG, f)
    torch.manual_seed(0)
    model = RM.ImageReward(med_config=med_config, device="cpu")
    with torch.no_grad():  # unit-gain MLP: the original's 1/(768+1) init makes every random score -0.1618
        for layer in model.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, layer.in_features ** -0.5)
                layer.bias.normal_(0, 0.1)
    ckpt = os.path.join(work, "ImageReward_random.pt")
    torch.save(model.state_dict(), ckpt)
    del model
    model = RM.load(ckpt, device="cpu", med_config=med_config)  # the package's own loader and scorer
    images = load_images(work)
    scores = [float(model.score(prompt, images[i])) for i, prompt in pairs()]
    pixels = torch.stack([model.preprocess(im) for im in images])
    np.savez(os.path.join(work, "imagereward_original.npz"), scores=np.array(scores), pixels=pixels.numpy())
    print(f"original ImageReward: {len(scores)} scores, {scores[:3]}...")


# Qwen2-VL-7B-Instruct's chat_template.json, which the original's processor applies (read from the model repository)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
QWEN2_VL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # in Qwen2-VL's order (ids 151643-151656 there)


def write_tiny_qwen2_vl(base):
    """A stand-in for Qwen/Qwen2-VL-7B-Instruct: byte-level BPE (256 bytes, 8 merges) with Qwen2-VL's special tokens in
    its order, its image processor settings and chat template, and a random 2-layer Qwen2-VL 64 wide (seed 0)."""
    import torch
    from transformers import (AddedToken, Qwen2TokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor)
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
    os.makedirs(base, exist_ok=True)
    byte = bytes_to_unicode()
    vocab = {byte[b]: b for b in range(256)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("o", "n"), ("Ġ", "a"), ("r", "e")]
    vocab.update({a + b: 256 + i for i, (a, b) in enumerate(merges)})
    with open(os.path.join(base, "bpe_vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(base, "bpe_merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = Qwen2TokenizerFast(os.path.join(base, "bpe_vocab.json"), os.path.join(base, "bpe_merges.txt"), unk_token=None,
                             bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True) for t in QWEN2_VL_SPECIAL], special_tokens=True)
    tok.eos_token = "<|im_end|>"  # Qwen2-VL-7B-Instruct's: eos <|im_end|>, pad <|endoftext|>
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 16384),
                     tokenizer=tok, chat_template=QWEN2_VL_CHAT_TEMPLATE).save_pretrained(base)
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vocab_size=len(tok) + 2, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), vision_token_id=ids("<|vision_pad|>"),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_config=dict(depth=2, embed_dim=64, mlp_ratio=2, num_heads=4, in_chans=3, hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2))
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(base)


def original_hpsv3(work):
    import hpsv3
    import torch
    from hpsv3.inference import HPSv3RewardInferencer
    from hpsv3.train import create_model_and_processor
    from hpsv3.utils.parser import DataConfig, ModelConfig, PEFTLoraConfig, TrainingConfig, parse_args_with_yaml
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    base = os.path.join(work, "qwen2vl_tiny")
    write_tiny_qwen2_vl(base)
    cfg = OmegaConf.load(os.path.join(os.path.dirname(hpsv3.__file__), "config", "HPSv3_7B.yaml"))
    cfg.model_name_or_path = base  # the 7B's own settings otherwise: ranknet head, 2 outputs, <|Reward|>, bf16
    yaml = os.path.join(work, "HPSv3_tiny.yaml")
    OmegaConf.save(cfg, yaml)
    # the model as HPSv3's training builds it (adds <|Reward|>, resizes the embeddings, bf16 with a float32 head),
    # every matrix re-drawn at unit gain: at Qwen2-VL's 0.02 init the image barely reaches the <|Reward|> token
    (_, training, model_config, lora), _ = parse_args_with_yaml((DataConfig, TrainingConfig, ModelConfig, PEFTLoraConfig),
                                                                yaml, is_train=False)
    model = create_model_and_processor(model_config, lora, training)[0]
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    ckpt = os.path.join(work, "HPSv3_random.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)  # what HPSv3.safetensors holds
    del model
    inferencer = HPSv3RewardInferencer(config_path=yaml, checkpoint_path=ckpt, device="cpu")  # the package's loader
    images = load_images(work)
    ims, prompts = [images[i] for i, _ in pairs()], [p for _, p in pairs()]
    batch = inferencer.prepare_batch(ims, prompts)
    with torch.inference_mode():
        # bf16, as on a GPU: there the head's autocast(cuda, float32) casts the bf16 hidden states to float32; on the
        # CPU that autocast is off, so a hook does the cast (the only thing changed in the package's forward). In bf16
        # a score moves with the padding of its batch, so bf16 is compared one pair at a time; the batch shows by how much
        inferencer.model.rm_head.register_forward_pre_hook(lambda module, args: (args[0].float(),))
        bf16 = torch.cat([inferencer.reward([im], [p]).float() for im, p in zip(ims, prompts)])
        bf16_batch = inferencer.reward(ims, prompts).float()
        inferencer.model.float()  # float32: the comparison of the code paths, in one padded batch
        fp32 = inferencer.reward(ims, prompts)
    np.savez(os.path.join(work, "hpsv3_original.npz"), scores=fp32[:, 0].numpy(), sigma=fp32[:, 1].numpy(),
             scores_bf16=bf16[:, 0].numpy(), scores_bf16_batch=bf16_batch[:, 0].numpy(),
             input_ids=batch["input_ids"].numpy(), attention_mask=batch["attention_mask"].numpy(),
             pixels=batch["pixel_values"].numpy(), grid=batch["image_grid_thw"].numpy())
    print(f"original HPSv3: {len(fp32)} scores (mu), {fp32[:3, 0].tolist()}...; inputs {tuple(batch['input_ids'].shape)}")


# ------------------------------------------------------------------------------------------------
# ours (this repo's environment)

def report(name, ours, original):
    diff = float(np.abs(ours - original).max())
    print(f"{name}: largest |difference| {diff:.3g} (values {original.min():.4g} to {original.max():.4g}, "
          f"std {original.std():.3g})")
    return diff


def ours(work, only=()):
    import argparse
    import gc
    import torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import reward_models
    from scorers import load_scorers
    from transformers import BertTokenizer
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    images = load_images(work)
    ims, prompts = [images[i] for i, _ in pairs()], [p for _, p in pairs()]
    results = {}

    clip_tok, bert_tok = os.path.join(work, "clip_tokenizer"), os.path.join(work, "bert_tokenizer")
    args = argparse.Namespace(hpsv2_weights=os.path.join(work, "HPS_random.pt"), hpsv2_tokenizer=clip_tok,
                              imagereward_weights=os.path.join(work, "ImageReward_random.pt"),
                              imagereward_tokenizer=bert_tok, hpsv3_weights=os.path.join(work, "HPSv3_random.safetensors"),
                              hpsv3_base=os.path.join(work, "qwen2vl_tiny"))
    ran = lambda scorer: (not only or scorer in only) and os.path.exists(os.path.join(work, f"{scorer}_original.npz"))
    if ran("hpsv2"):
        ours_hpsv2(work, args, images, ims, prompts, results)
    if ran("imagereward"):
        BertTokenizer(os.path.join(work, "bert_vocab.txt")).save_pretrained(bert_tok)
        ref = np.load(os.path.join(work, "imagereward_original.npz"))
        pixels = torch.stack([reward_models.imagereward_pixels(im) for im in images]).numpy()
        results["imagereward pixels"] = report("ImageReward preprocessed pixels", pixels, ref["pixels"])
        score = load_scorers(["imagereward"], args, "cpu")["imagereward"]
        results["imagereward scores"] = report("ImageReward scores", score(ims, prompts), ref["scores"])
        del score
        gc.collect()
    if ran("hpsv3"):
        ours_hpsv3(work, args, images, ims, prompts, results)
    if not results:
        raise SystemExit(f"no original step has run in {work}")
    with open(os.path.join(work, "agreement.json"), "w") as f:
        json.dump(results, f, indent=1)
    worst = max(v for k, v in results.items() if "scores" in k and "bf16" not in k)  # bf16: reported, not judged
    differ = [k for k, v in results.items() if "differ" in k and v]
    ok = worst <= 1e-4 and not differ
    print(f"largest score difference {worst:.3g} (tolerance 1e-4){'; ' + ', '.join(differ) if differ else ''}: "
          f"{'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def ours_hpsv2(work, args, images, ims, prompts, results):
    import gc
    import torch
    import reward_models
    from scorers import load_scorers
    from transformers import CLIPTokenizer
    clip_tok = args.hpsv2_tokenizer
    CLIPTokenizer(os.path.join(work, "clip_bpe", "vocab.json"), os.path.join(work, "clip_bpe", "merges.txt")
                  ).save_pretrained(clip_tok)
    ref = np.load(os.path.join(work, "hpsv2_original.npz"))
    pixels = torch.stack([reward_models.hpsv2_pixels(im) for im in images]).numpy()
    results["hpsv2 pixels"] = report("HPSv2 preprocessed pixels", pixels, ref["pixels"])
    score = load_scorers(["hpsv2"], args, "cpu")["hpsv2"]
    results["hpsv2 scores (.pt converted on load)"] = report("HPSv2 scores, .pt converted on load",
                                                             score(ims, prompts), ref["scores"])
    del score
    gc.collect()
    import tools.convert_hpsv2 as convert
    folder = os.path.join(work, "hpsv2-hf")
    convert.main(["--checkpoint", args.hpsv2_weights, "--tokenizer", clip_tok, "--out", folder])
    gc.collect()
    from scorers import load_hpsv2
    model, tok = load_hpsv2(folder, None, "cpu")
    results["hpsv2 scores (converted folder)"] = report("HPSv2 scores, tools/convert_hpsv2.py folder",
                                                        reward_models.hpsv2_scores(model, tok, ims, prompts).numpy(),
                                                        ref["scores"])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        txt = model.get_text_features(**ids).pooler_output
    results["hpsv2 image features"] = report("HPSv2 normalised image features",
                                             torch.nn.functional.normalize(img, dim=-1).numpy(), ref["image_features"])
    results["hpsv2 text features"] = report("HPSv2 normalised text features",
                                            torch.nn.functional.normalize(txt, dim=-1).numpy(), ref["text_features"])
    del model
    gc.collect()


def ours_hpsv3(work, args, images, ims, prompts, results):
    import torch
    import reward_models
    from safetensors.torch import load_file
    from scorers import load_hpsv3, load_scorers
    ref = np.load(os.path.join(work, "hpsv3_original.npz"))
    model, tok = load_hpsv3(args.hpsv3_weights, args.hpsv3_base, "cpu")
    # the inputs: the prompt template and tokenizer (ids), the resize and patches (pixels), as one padded batch
    pixels, grids = zip(*[reward_models.hpsv3_pixels(im) for im in ims])
    texts = [reward_models.hpsv3_text(p, int(g.prod()) // 4) for p, g in zip(prompts, grids)]
    batch = tok(texts, padding=True, return_tensors="pt")
    same_ids = batch["input_ids"].shape == ref["input_ids"].shape and (batch["input_ids"].numpy() == ref["input_ids"]).all()
    same_mask = (batch["attention_mask"].numpy() == ref["attention_mask"]).all() if same_ids else False
    print(f"HPSv3 input ids and attention mask ({tuple(ref['input_ids'].shape)}): "
          f"{'identical' if same_ids and same_mask else 'DIFFERENT'}")
    results["hpsv3 input ids differ"] = 0.0 if same_ids and same_mask else 1.0
    results["hpsv3 grids differ"] = float(np.abs(torch.stack(grids).numpy() - ref["grid"]).max())
    results["hpsv3 pixels"] = report("HPSv3 pixel patches", torch.cat(pixels).numpy(), ref["pixels"])
    score = load_scorers(["hpsv3"], args, "cpu")["hpsv3"]  # the scorer evaluate.py and online_kto.py load
    results["hpsv3 scores"] = report("HPSv3 scores (mu), float32", score(ims, prompts), ref["scores"])
    rewards = reward_models.hpsv3_rewards(model, tok, ims, prompts, batch_size=len(ims))  # one batch, as the original's
    results["hpsv3 scores (one batch)"] = report("HPSv3 scores (mu), one padded batch", rewards[:, 0].numpy(), ref["scores"])
    results["hpsv3 sigma"] = report("HPSv3 sigma", rewards[:, 1].numpy(), ref["sigma"])
    # bf16 as on a GPU (the head in float32), one pair at a time, against the original's bf16 on the same CPU kernels
    from transformers import AutoConfig
    bf16 = reward_models.hpsv3_from_checkpoint(load_file(args.hpsv3_weights), AutoConfig.from_pretrained(args.hpsv3_base),
                                               model.reward_token_id, torch.bfloat16)
    results["hpsv3 scores bf16"] = report("HPSv3 scores (mu), bf16, one pair at a time",
                                          reward_models.hpsv3_scores(bf16, tok, ims, prompts, batch_size=1).numpy(),
                                          ref["scores_bf16"])
    results["hpsv3 bf16: original batched vs one at a time"] = report(
        "HPSv3 original's own bf16 spread, one padded batch against one pair at a time", ref["scores_bf16_batch"],
        ref["scores_bf16"])
    results["hpsv3 bf16 vs float32 (original)"] = report("HPSv3 original, bf16 against float32", ref["scores_bf16"],
                                                          ref["scores"])


if __name__ == "__main__":
    step, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    if step == "original-hpsv2":
        make_images(work)
        original_hpsv2(work)
    elif step == "original-imagereward":
        make_images(work)
        original_imagereward(work)
    elif step == "original-hpsv3":
        make_images(work)
        original_hpsv3(work)
    elif step == "ours":
        sys.exit(ours(work, sys.argv[3:]))  # the scorers named after WORK, or every one whose original step ran
    else:
        raise SystemExit(f"unknown step {step!r}: original-hpsv2, original-imagereward, original-hpsv3 or ours")
