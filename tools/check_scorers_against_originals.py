"""Our HPSv2 and ImageReward against the original packages, side by side, on random weights (no download needed).

    bash tools/check_scorers_against_originals.sh        # builds the side environment, then runs the three steps:

    $VENV/bin/python tools/check_scorers_against_originals.py original-hpsv2 WORK        # hpsv2 + open_clip, torchvision
    $VENV/bin/python tools/check_scorers_against_originals.py original-imagereward WORK  # image-reward, transformers 4
    python tools/check_scorers_against_originals.py ours WORK                            # this repo's environment

The original steps build the ORIGINAL models from their own classes with random weights (seed 0), save them in the
official checkpoint formats (HPS: {'state_dict': ...} in fp16 like HPS_v2.1_compressed.pt; ImageReward.pt: the
model's state dict), and score WORK/images with the packages' own scorers (hpsv2.img_score.score,
ImageReward.load(...).score). `ours` loads those files through scorers.py (and tools/convert_hpsv2.py's folder) and
compares: scores to 1e-4, preprocessed pixels and embeddings too. Random-weight scores are small, so the MLP of
ImageReward is re-drawn at unit gain and every comparison prints the spread of the scores beside the difference.
Not run by CI: it needs a second environment of about 6 GB and some 15 minutes of 2 CPU cores.
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


# ------------------------------------------------------------------------------------------------
# ours (this repo's environment)

def report(name, ours, original):
    diff = float(np.abs(ours - original).max())
    print(f"{name}: largest |difference| {diff:.3g} (values {original.min():.4g} to {original.max():.4g}, "
          f"std {original.std():.3g})")
    return diff


def ours(work):
    import argparse
    import gc
    import torch
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import reward_models
    from scorers import load_scorers
    from transformers import BertTokenizer, CLIPTokenizer
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    images = load_images(work)
    ims, prompts = [images[i] for i, _ in pairs()], [p for _, p in pairs()]
    results = {}

    clip_tok = os.path.join(work, "clip_tokenizer")
    CLIPTokenizer(os.path.join(work, "clip_bpe", "vocab.json"), os.path.join(work, "clip_bpe", "merges.txt")
                  ).save_pretrained(clip_tok)
    bert_tok = os.path.join(work, "bert_tokenizer")
    BertTokenizer(os.path.join(work, "bert_vocab.txt")).save_pretrained(bert_tok)
    args = argparse.Namespace(hpsv2_weights=os.path.join(work, "HPS_random.pt"), hpsv2_tokenizer=clip_tok,
                              imagereward_weights=os.path.join(work, "ImageReward_random.pt"),
                              imagereward_tokenizer=bert_tok)

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

    ref = np.load(os.path.join(work, "imagereward_original.npz"))
    pixels = torch.stack([reward_models.imagereward_pixels(im) for im in images]).numpy()
    results["imagereward pixels"] = report("ImageReward preprocessed pixels", pixels, ref["pixels"])
    score = load_scorers(["imagereward"], args, "cpu")["imagereward"]
    results["imagereward scores"] = report("ImageReward scores", score(ims, prompts), ref["scores"])
    with open(os.path.join(work, "agreement.json"), "w") as f:
        json.dump(results, f, indent=1)
    worst = max(v for k, v in results.items() if "scores" in k)
    print(f"largest score difference {worst:.3g}: {'OK' if worst <= 1e-4 else 'FAILED'} (tolerance 1e-4)")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    step, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    if step == "original-hpsv2":
        make_images(work)
        original_hpsv2(work)
    elif step == "original-imagereward":
        make_images(work)
        original_imagereward(work)
    elif step == "ours":
        sys.exit(ours(work))
    else:
        raise SystemExit(f"unknown step {step!r}: original-hpsv2, original-imagereward or ours")
