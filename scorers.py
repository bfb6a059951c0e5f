"""The scorers of the evaluation protocol: PickScore, CLIP score, the LAION aesthetic predictor, HPSv2,
ImageReward, HPSv3 (7B: a GPU's), and any function of yours.

    scorers = load_scorers(["pickscore", "clip", "mypkg.rewards:sharpness"], args, device)
    # {name: score(images, prompts) -> (N,)}

A scorer named `module:function` is your own: `function(images, prompts)` takes a list of PIL images and
their prompts and returns one number per image (the toy world's redness and color check come in this way,
`toy.scorers:redness`); its name in the tables is the function's name.

evaluate.py scores with them; filter_fifa.py takes its proxy reward and prompt embeddings from the CLIP
helpers here (`load_clip`, `clip_image_embeddings`, `clip_text_embeddings`, the PickScore ids).
"""
import functools
import importlib
import os
import re

import torch
import torch.nn.functional as F

import reward_models
from files import check_model_path, fail, one_line

# PickScore's weights, and the processor its authors use with them (its own repo has none)
PICKSCORE_MODEL, PICKSCORE_PROCESSOR = "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


# ------------------------------------------------------------------------------------------------
# CLIP: shared by PickScore, CLIP score, the aesthetic predictor and filter_fifa.py

def load_clip(model, processor=None, device="cpu", dtype=torch.float32):
    """A transformers CLIPModel and its processor from a hub id or a local folder, in eval mode."""
    from transformers import AutoProcessor, CLIPModel
    processor = processor or model
    for name in (model, processor):
        check_model_path(name, "CLIP model or processor folder", "a folder or a hub id like openai/clip-vit-large-patch14")
    try:
        clip = CLIPModel.from_pretrained(model, dtype=dtype).to(device).eval()
        proc = AutoProcessor.from_pretrained(processor, backend="pil")  # PIL preprocessing: no torchvision
    except Exception as e:  # offline, a missing repo, a folder without weights: one line, not a traceback
        fail(f"cannot load CLIP model {model!r} / processor {processor!r}: {one_line(e)}")
    return clip, proc


@torch.no_grad()
def clip_image_embeddings(model, processor, images, batch_size=32):
    """(N, d) float32, L2-normalised image embeddings (the projected pooled output)."""
    out = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=[im.convert("RGB") for im in images[start:start + batch_size]],
                           return_tensors="pt")["pixel_values"]
        # transformers 5: the feature getters return an output object; the projection is its pooler_output
        emb = model.get_image_features(pixel_values=pixels.to(model.device, model.dtype)).pooler_output
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


@torch.no_grad()
def clip_text_embeddings(model, processor, prompts, batch_size=256):
    """(N, d) float32, L2-normalised text embeddings; prompts longer than 77 tokens are truncated."""
    out = []
    max_len = model.config.text_config.max_position_embeddings
    for start in range(0, len(prompts), batch_size):
        tok = processor(text=list(prompts[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_len, return_tensors="pt")
        emb = model.get_text_features(input_ids=tok["input_ids"].to(model.device),
                                      attention_mask=tok["attention_mask"].to(model.device)).pooler_output
        out.append(F.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


@torch.no_grad()
def clip_scores(model, processor, images, prompts, batch_size=32):
    """The PickScore recipe: logit_scale.exp() * cos(image, text), one score per (image, prompt) pair. (N,)

    With PickScore_v1 logit_scale.exp() is 100, so SD1.5 images score about 20-22.
    """
    img = clip_image_embeddings(model, processor, images, batch_size)  # (N, d)
    txt = clip_text_embeddings(model, processor, prompts, batch_size)  # (N, d)
    return model.logit_scale.exp().float().cpu() * (img * txt).sum(-1)  # (N,)


# ------------------------------------------------------------------------------------------------
# scorers: each is loaded once, then score(images, prompts) -> (N,) numpy array per batch. The models of HPSv2,
# ImageReward and HPSv3, and the key maps from their official checkpoints, are in reward_models.py

SCORERS = ["pickscore", "clip", "aesthetic", "hpsv2", "imagereward", "hpsv3"]  # and module:function, your own


def load_weights(spec):
    """A state dict from a local file or 'repo_id:filename' on the hub (downloaded once into the hub cache),
    read safely: safetensors, or torch.load(weights_only=True), which refuses pickled code."""
    path = spec
    if not os.path.isfile(spec):
        repo, _, filename = spec.partition(":")
        if not filename:
            fail(f"weights file not found: {spec}")
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download(repo, filename)
        except Exception as e:
            fail(f"cannot download {filename} from {repo}: {type(e).__name__} (offline? pass a file)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # a cut download, or another format under the name
            fail(f"{path} is not a readable safetensors file ({one_line(e)})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a plain tensor checkpoint ({type(e).__name__}); not unpickling it")


def is_hub_or_folder(spec):
    """A folder, or a hub id (owner/name): loaded with from_pretrained; else a weights file or 'repo:filename'."""
    return os.path.isdir(spec) or (":" not in spec and spec.count("/") == 1 and not os.path.exists(spec)
                                   and not spec.startswith((".", "/", "~")) and not spec.endswith("/"))


def state_dict_of(spec):
    """load_weights(spec), unwrapped from the {'state_dict': ...} that HPS and open_clip training checkpoints use
    (or the {'model': ...} of HPSv3's)."""
    state = load_weights(spec)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        fail(f"{spec}: not a state dict of tensors")
    return state


def load_hpsv2(weights, tokenizer, device):
    """HPSv2 as (CLIPModel, CLIPTokenizer), from a transformers folder or hub id (tools/convert_hpsv2.py writes one),
    or converted on load from an official open_clip checkpoint (a file or 'repo:filename', e.g. the default
    xswu/HPSv2:HPS_v2.1_compressed.pt; xswu/HPSv2:HPS_v2_compressed.pt for v2.0) with `tokenizer`'s vocabulary."""
    from transformers import CLIPModel, CLIPTokenizer
    hint = "want HPS_v2.1_compressed.pt / HPS_v2_compressed.pt or a folder written by tools/convert_hpsv2.py"
    if is_hub_or_folder(weights):
        if os.path.isdir(weights) and not os.path.isfile(os.path.join(weights, "config.json")):
            fail(f"hpsv2: {weights} has no config.json; {hint}")
        try:
            model = CLIPModel.from_pretrained(weights, dtype=torch.float32).eval().requires_grad_(False)
            tok = CLIPTokenizer.from_pretrained(weights)
        except Exception as e:
            fail(f"hpsv2: cannot load {weights!r} as a transformers CLIP model: {one_line(e)}; {hint}")
    else:
        state = state_dict_of(weights)
        if not reward_models.is_open_clip_state(state):
            fail(f"hpsv2: {weights} is not an open_clip CLIP checkpoint (no visual.conv1.weight); {hint}")
        tok = load_tokenizer("hpsv2", CLIPTokenizer, tokenizer)
        try:
            model = reward_models.hpsv2_from_open_clip(state, tok.eos_token_id)
        except (ValueError, KeyError, RuntimeError) as e:
            fail(f"hpsv2: {weights}: {one_line(e)}; {hint}")
    return model.to(device), tok


def load_imagereward(weights, tokenizer, device):
    """ImageReward as (ImageRewardModel, BertTokenizer) from the official ImageReward.pt (a file or 'repo:filename',
    default THUDM/ImageReward:ImageReward.pt) and bert-base-uncased's tokenizer (`tokenizer`: hub id or folder)."""
    from transformers import BertTokenizer
    hint = "want ImageReward.pt (THUDM/ImageReward on the hub)"
    state = state_dict_of(weights)
    if not reward_models.is_imagereward_state(state):
        fail(f"imagereward: {weights} is not an ImageReward checkpoint "
                         f"(no blip.visual_encoder.* / mlp.layers.* weights); {hint}")
    try:
        model = reward_models.imagereward_from_checkpoint(state)
    except (ValueError, KeyError, RuntimeError) as e:
        fail(f"imagereward: {weights}: {one_line(e)}; {hint}")
    tok = reward_models.imagereward_tokenizer(load_tokenizer("imagereward", BertTokenizer, tokenizer))
    vocab = model.text.config.vocab_size
    if len(tok) > vocab:
        fail(f"imagereward: tokenizer {tokenizer!r} has {len(tok)} tokens, the checkpoint embeds {vocab}")
    return model.to(device), tok


def load_hpsv3(weights, base, device):
    """HPSv3 as (HPSv3Model, tokenizer) from the official HPSv3.safetensors (a file or 'repo:filename', default
    MizzenAI/HPSv3:HPSv3.safetensors) and the config and tokenizer of Qwen2-VL-7B-Instruct, which it was trained from
    (`base`: hub id or folder; its weights are not read). bf16 on a GPU as the original (the head in float32), float32
    on the CPU, where the 7B model takes about 31 GB (computed) and far longer an image: it is a GPU's scorer."""
    from transformers import AutoConfig, AutoTokenizer
    hint = "want HPSv3.safetensors (MizzenAI/HPSv3 on the hub) and --hpsv3_base Qwen/Qwen2-VL-7B-Instruct"
    check_model_path(base, "hpsv3: base model folder", "a folder or a hub id like Qwen/Qwen2-VL-7B-Instruct")
    try:
        config, tok = AutoConfig.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    except Exception as e:
        fail(f"hpsv3: cannot load the config and tokenizer of {base!r}: {one_line(e)}")
    if config.model_type != "qwen2_vl":
        fail(f"hpsv3: {base} is a {config.model_type} model, not Qwen2-VL; {hint}")
    state = state_dict_of(weights)
    if not reward_models.is_hpsv3_state(state):
        fail(f"hpsv3: {weights} is not an HPSv3 checkpoint (no visual.* / model.* / rm_head.* weights); {hint}")
    tok = reward_models.hpsv3_tokenizer(tok)
    reward_id = tok.convert_tokens_to_ids(reward_models.REWARD_TOKEN)
    if tok.convert_tokens_to_ids("<|image_pad|>") != config.image_token_id:
        fail(f"hpsv3: the tokenizer of {base} does not match its config "
             f"(<|image_pad|> is not token {config.image_token_id})")
    if reward_id != state["model.embed_tokens.weight"].shape[0] - 1:  # the original resizes to len(tokenizer)
        fail(f"hpsv3: {reward_models.REWARD_TOKEN} is token {reward_id} of {base}'s tokenizer, but the checkpoint "
             f"embeds {state['model.embed_tokens.weight'].shape[0]} tokens; {hint}")
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:  # (state is emptied as its weights are cast: the checkpoint's copy freed on the way)
        model = reward_models.hpsv3_from_checkpoint(state, config, reward_id, dtype)
    except (ValueError, KeyError, RuntimeError) as e:
        fail(f"hpsv3: {weights}: {one_line(e)}; {hint}")
    return model.to(device), tok


def load_tokenizer(scorer, cls, name):
    check_model_path(name, f"{scorer}: tokenizer folder", "a folder or a hub id like google-bert/bert-base-uncased")
    try:
        return cls.from_pretrained(name)
    except Exception as e:
        fail(f"{scorer}: cannot load tokenizer {name!r}: {one_line(e)}")


def aesthetic_mlp(dim=768):
    """The LAION 'improved aesthetic predictor' head: 768-1024-128-64-16-1, trained on SAC+LOGOS+AVA ratings.

    The original has NO activations between its linear layers (its ReLUs are commented out), so it is
    one linear map in effect; the dropouts sit where the original has them so that the checkpoint's
    keys (layers.0, layers.2, layers.4, layers.6, layers.7) line up. They do nothing in eval mode.
    """
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()


def load_scorer(name, args, device, clip):
    """The score function of one scorer; a scorer that cannot load stops the run with one line saying why."""
    if name == "pickscore":
        # PickScore (Kirstain et al. 2023): CLIP-H fine-tuned on Pick-a-Pic preferences;
        # logit_scale.exp() * cos(image, prompt), logit_scale.exp() = 100, so SD1.5 scores ~20-22
        model, processor = clip(args.pickscore_model, args.pickscore_processor)
        return lambda images, prompts: clip_scores(model, processor, images, prompts).numpy()
    if name == "clip":
        # CLIP score (Hessel et al. 2021): 100 * max(cos(image, prompt), 0) with OpenAI CLIP ViT-L/14
        model, processor = clip(args.clip_model, None)

        def clip_score(images, prompts):
            img, txt = clip_image_embeddings(model, processor, images), clip_text_embeddings(model, processor, prompts)
            return (100.0 * (img * txt).sum(-1).clamp(min=0)).numpy()
        return clip_score
    if name == "aesthetic":
        # LAION aesthetic predictor v2: MLP(L2-normalised CLIP ViT-L/14 image embedding), ~1-10, SD1.5 ~5.3-5.7;
        # the prompt is not used. The weights are the public checkpoint (also mirrored by TRL's DDPO example).
        model, processor = clip(args.aesthetic_clip, None)
        state = load_weights(args.aesthetic_weights)
        state = {k.removeprefix("layers."): v for k, v in state.items()}  # the original wraps the Sequential
        mlp = aesthetic_mlp(state["0.weight"].shape[1])  # 768 for ViT-L/14; smaller for the tests' tiny CLIP
        mlp.load_state_dict(state)
        mlp.to(device).requires_grad_(False)  # scoring only: no autograd graph

        def aesthetic(images, prompts):
            emb = clip_image_embeddings(model, processor, images)  # (N, d), already normalised
            return mlp(emb.to(device)).squeeze(-1).cpu().numpy()
        return aesthetic
    if name == "hpsv2":
        # HPSv2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on HPD v2, as a transformers CLIPModel
        # (reward_models.py); cos(image, prompt), SD1.5 ~0.25-0.30; a non-square image is padded, not cropped
        model, tokenizer = load_hpsv2(args.hpsv2_weights, args.hpsv2_tokenizer, device)
        return lambda images, prompts: reward_models.hpsv2_scores(model, tokenizer, images, prompts).numpy()
    if name == "imagereward":
        # ImageReward (Xu et al. 2023): BLIP ViT-L + BERT cross-attending to it + MLP, from transformers' BLIP
        # modules (reward_models.py); (raw - 0.16717) / 1.03334, so about 0 on average over its training images
        model, tokenizer = load_imagereward(args.imagereward_weights, args.imagereward_tokenizer, device)
        return lambda images, prompts: reward_models.imagereward_scores(model, tokenizer, images, prompts).numpy()
    if name == "hpsv3":
        # HPSv3 (Ma et al. 2025): Qwen2-VL-7B reads the image and an instruction holding the prompt; an MLP on the
        # hidden state of its <|Reward|> token gives (mu, sigma) and the score is mu (reward_models.py). A GPU's scorer
        model, tokenizer = load_hpsv3(args.hpsv3_weights, args.hpsv3_base, device)
        return lambda images, prompts: reward_models.hpsv3_scores(model, tokenizer, images, prompts).numpy()
    return load_function(name)


def is_function(spec):
    """`module:function` (a dotted module path, a colon, a name): a scorer or reward of the user's own."""
    return re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec) is not None


def load_function(spec):
    """The function `module:function`, importable from the current folder or the Python path."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        fail(f"cannot load the function {spec!r}: {one_line(e)}")
    if not callable(fn):
        fail(f"{spec!r} is not a function")
    return fn


# where each named scorer's weights come from: flag -> (default, the official files; help)
SCORER_FLAGS = {
    "pickscore_model": (PICKSCORE_MODEL, "PickScore: hub id or folder"),
    "pickscore_processor": (PICKSCORE_PROCESSOR, "its processor"),
    "clip_model": ("openai/clip-vit-large-patch14", "CLIP for the CLIP score"),
    "aesthetic_clip": ("openai/clip-vit-large-patch14", "CLIP for the aesthetic head"),
    "aesthetic_weights": ("trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth",
                          "aesthetic MLP weights: a file or repo:filename (.safetensors, or a tensors-only .pth)"),
    "hpsv2_weights": ("xswu/HPSv2:HPS_v2.1_compressed.pt",
                      "HPSv2: a transformers CLIP folder or hub id (tools/convert_hpsv2.py writes one), or the official "
                      "open_clip checkpoint, a file or repo:filename, converted on load (xswu/HPSv2:HPS_v2_compressed.pt "
                      "for HPSv2.0)"),
    "hpsv2_tokenizer": (PICKSCORE_PROCESSOR,
                        "HPSv2's CLIP tokenizer (hub id or folder) when --hpsv2_weights is an open_clip checkpoint"),
    "imagereward_weights": ("THUDM/ImageReward:ImageReward.pt",
                            "ImageReward: the official ImageReward.pt, a file or repo:filename"),
    "imagereward_tokenizer": ("google-bert/bert-base-uncased",
                              "ImageReward's tokenizer (bert-base-uncased): hub id or folder"),
    "hpsv3_weights": ("MizzenAI/HPSv3:HPSv3.safetensors",
                      "HPSv3: the official HPSv3.safetensors, a file or repo:filename"),
    "hpsv3_base": ("Qwen/Qwen2-VL-7B-Instruct",
                   "HPSv3's base model, for its config and tokenizer only (hub id or folder; its weights are not read)"),
}


def add_scorer_args(p):
    """SCORER_FLAGS as flags of an argparse parser: evaluate.py and online_kto.py take the same ones, load_scorers
    reads them from the parsed args."""
    for flag, (default, help) in SCORER_FLAGS.items():
        p.add_argument(f"--{flag}", default=default, help=help)


def scorer_name(spec):
    """The name a scorer has in the tables: `pickscore`, or the function's name for `module:function`."""
    return spec.partition(":")[2] if is_function(spec) else spec


def load_scorers(names, args, device):
    """{name: score function} in the order asked; a scorer that cannot load stops here, before any generation."""
    unknown = [n for n in names if n not in SCORERS and not is_function(n)]
    if unknown:
        fail(f"unknown scorer(s) {unknown}; choose from {SCORERS}, or module:function for your own")
    if len({scorer_name(n) for n in names}) < len(names):
        fail(f"two scorers with one name in {names}")
    # CLIP score and the aesthetic predictor share ViT-L/14: each (model, processor) is loaded once
    clip = functools.lru_cache(maxsize=None)(lambda model, processor: load_clip(model, processor, device))
    if not names:
        fail("no scorer given")
    return {scorer_name(n): load_scorer(n, args, device, clip) for n in names}


@functools.lru_cache(maxsize=None)
def default_hpsv3():
    """HPSv3 with SCORER_FLAGS' defaults (the hub's files, or the hub cache's) on the first GPU, else the CPU."""
    return load_hpsv3(SCORER_FLAGS["hpsv3_weights"][0], SCORER_FLAGS["hpsv3_base"][0],
                      "cuda" if torch.cuda.is_available() else "cpu")


def hpsv3(images, prompts):
    """HPSv3's score as a plain function, loaded on first call: `filter_fifa.py --reward_model scorers:hpsv3` takes it
    as FiFA's proxy reward this way (evaluate.py and online_kto.py take the named scorer `hpsv3` and its flags)."""
    return reward_models.hpsv3_scores(*default_hpsv3(), images, prompts).numpy()
