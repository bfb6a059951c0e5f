"""Pipelines built from config with random weights, saved in the diffusers layout: SD1.5-shaped (build_pipeline), SDXL,
SD3, FLUX.1 and FLUX.2 [klein] in miniature.

Used by the tests (tiny), bench.py (tiny, small, sd15) and the toy world (toy). No download: the tokenizers are
written from a small word list (CLIP's BPE, T5's Unigram, Qwen's byte-level BPE), so `from_pretrained(dir)` loads
the result exactly as it loads the released models.
"""
import json
import os

import torch

# a small vocabulary: the toy world's captions plus a few words the tests use
VOCAB = ("a an the of on in with and photo picture image red green blue yellow purple orange white black "
         "circle square triangle cross ring star small big dog cat tree sky sunset").split()

# name -> (unet block_out_channels, layers per block, cross-attention dim, text hidden, text layers,
#          vae block_out_channels, image resolution, attention heads: diffusers' `attention_head_dim` is the
#          number of heads in SD's UNet; the toy's 2 heads of 16-32 dims train 25% faster on a CPU than 8 of 4-8)
SIZES = {
    "tiny": dict(unet=(8, 16), layers=1, xdim=16, text_hidden=16, text_layers=1, vae=(8, 8), res=32),
    "toy": dict(unet=(32, 64), layers=1, xdim=32, text_hidden=32, text_layers=2, vae=(16, 32, 32), res=32, heads=2),
    "small": dict(unet=(32, 64, 64), layers=1, xdim=64, text_hidden=64, text_layers=2, vae=(16, 32), res=64),
}


def write_tokenizer(path, words=VOCAB):
    """A CLIP BPE tokenizer whose merges build each word of `words` from its letters.

    CLIP's BPE appends '</w>' to the last letter of a word, so the word 'red' is built by the merges
    'r e' -> 're', 're d</w>' -> 'red</w>'. Letters not in any word still tokenize (as single letters).
    """
    os.makedirs(path, exist_ok=True)
    letters = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for w in sorted(set(words)):
        if len(w) < 2:
            continue
        prev = w[0]
        for i, ch in enumerate(w[1:], start=1):
            nxt = ch + "</w>" if i == len(w) - 1 else ch
            merges.append(f"{prev} {nxt}")
            prev = prev + nxt
            vocab.setdefault(prev, len(vocab))
    merges = list(dict.fromkeys(merges))
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer(vocab=os.path.join(path, "vocab.json"), merges=os.path.join(path, "merges.txt"),
                        model_max_length=77)
    tok.save_pretrained(path)
    return tok


def tiny_clip_config(tok):
    """A two-layer CLIP text encoder's config, 16 wide (projection 16 too), for the tokenizer `tok`."""
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=16)


def build_sdxl_pipeline(out_dir, seed=0, words=VOCAB, res=32):
    """A random-weight tiny StableDiffusionXLPipeline, saved to `out_dir`: SDXL's layout and conditioning in
    miniature (two CLIP text encoders, the second with a projection; a UNet with addition_embed_type
    "text_time" taking the pooled embedding and six time ids), as diffusers' own SDXL tests build it."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=res // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8, cross_attention_dim=32,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    tok = write_tokenizer(os.path.join(out_dir, "tokenizer"), words)
    tok_2 = write_tokenizer(os.path.join(out_dir, "tokenizer_2"), words)
    text_encoder, text_encoder_2 = CLIPTextModel(tiny_clip_config(tok)), CLIPTextModelWithProjection(tiny_clip_config(tok))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, sample_size=res, scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=unet,
                                     scheduler=scheduler)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


def write_t5_tokenizer(path, words=VOCAB):
    """A T5 (Unigram) tokenizer whose pieces are `words` (each with T5's word-start mark) and single characters,
    written to `path`: what SD3's and FLUX's third text encoder reads, made here instead of downloaded."""
    from transformers import T5Tokenizer
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in sorted(set(words))] \
        + [("\u2581", -2.0)] + [(c, -3.0) for c in chars]  # whole words first, spelled out only when unknown
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    tok.save_pretrained(path)
    return tok


def build_sd3_pipeline(out_dir, seed=0, words=VOCAB, res=32):
    """A random-weight tiny StableDiffusion3Pipeline, saved to `out_dir`: SD3's layout and conditioning in
    miniature (two CLIP text encoders with projections and a T5 encoder, a joint-attention transformer on 2x2
    patches, a VAE with SD3's scaling and shift factors, the flow-matching scheduler with SD3's shift 3.0)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tok = write_tokenizer(os.path.join(out_dir, "tokenizer"), words)
    tok_2 = write_tokenizer(os.path.join(out_dir, "tokenizer_2"), words)
    tok_3 = write_t5_tokenizer(os.path.join(out_dir, "tokenizer_3"), words)
    text_encoder, text_encoder_2 = (CLIPTextModelWithProjection(tiny_clip_config(tok)),
                                    CLIPTextModelWithProjection(tiny_clip_config(tok)))
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tok_3), d_model=48, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2, pad_token_id=tok_3.pad_token_id,
                                             eos_token_id=tok_3.eos_token_id, decoder_start_token_id=0))
    # two blocks: the last one's text stream ends early (context_pre_only: no output projection), the first's does not;
    # joint_attention_dim: T5's width; the two CLIP encoders' states side by side (16 + 16) are zero-padded to it, as
    # SD3's 768 + 1280 are to T5-XXL's 4096; pooled_projection_dim: the two pooled outputs side by side
    transformer = SD3Transformer2DModel(
        sample_size=res // 2, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=res // 2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, sample_size=res, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)  # SD3's factors
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tok_2, text_encoder_3=text_encoder_3, tokenizer_3=tok_3)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


def build_flux_pipeline(out_dir, seed=0, words=VOCAB, res=32, guidance_embeds=True):
    """A random-weight tiny FluxPipeline, saved to `out_dir`: FLUX.1's layout and conditioning in miniature (a CLIP
    text encoder read only for its pooled output, a T5 encoder whose states are the text sequence, a transformer of
    double- and single-stream blocks on 2x2 patches of latents packed into tokens, rotary positions, a 16-channel VAE
    with FLUX's scaling and shift factors, the flow-matching scheduler with FLUX.1's shift that grows with the image).
    guidance_embeds=True is FLUX.1 [dev]'s shape (the guidance scale is an input of the transformer, distilled from
    classifier-free guidance), False is [schnell]'s."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    tok = write_tokenizer(os.path.join(out_dir, "tokenizer"), words)
    tok_2 = write_t5_tokenizer(os.path.join(out_dir, "tokenizer_2"), words)
    text_encoder = CLIPTextModel(tiny_clip_config(tok))  # only its pooled output is read: 16 wide here, 768 in FLUX.1
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tok_2), d_model=48, d_kv=8, d_ff=32, num_layers=1,
                                             num_heads=2, pad_token_id=tok_2.pad_token_id,
                                             eos_token_id=tok_2.eos_token_id, decoder_start_token_id=0))
    # in_channels: a 2x2 patch of the 16 latent channels is one token of 64 (as in FLUX.1); joint_attention_dim: T5's
    # width (4096 in FLUX.1); pooled_projection_dim: CLIP's; the three rotary axes (the text index, the patch's row and
    # column: 16, 56 and 56 of FLUX.1's 128) split one head's 16 dims
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, sample_size=res, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)  # FLUX.1's factors
    # FLUX.1's scheduler config: with use_dynamic_shifting the pipeline passes mu, linear in the number of image tokens
    # from 0.5 at 256 to 1.15 at 4096 (its calculate_shift), and the sigmas are shifted by exp(mu); shift=3.0 is in
    # FLUX.1's config too but is not used then
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                        text_encoder_2=text_encoder_2, tokenizer_2=tok_2, transformer=transformer)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


# the part of Qwen3's chat template that FLUX.2 [klein] uses: one user turn, the assistant's turn opened, and the
# empty thinking block that enable_thinking=False writes
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def write_qwen_tokenizer(path, words=VOCAB):
    """A Qwen2 byte-level BPE tokenizer trained on `words`, with Qwen3's special tokens and chat template, written to
    `path`: what FLUX.2 [klein]'s Qwen3 text encoder reads, made here instead of downloaded.

    Each word is trained alone and after a space, the two ways Qwen's pre-tokenizer hands it over ('red', ' red'),
    so each is one piece either way; other text still tokenizes, byte by byte.
    """
    from transformers import Qwen2Tokenizer
    words = sorted(set(words) | {"user", "assistant"})  # the chat template's roles are whole pieces too
    corpus = words + [" " + w for w in words] + ["\n\n"]  # and its blank line, one piece in Qwen's vocabulary too
    tok = Qwen2Tokenizer().train_new_from_iterator(
        corpus, vocab_size=1000, show_progress=False,
        new_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def build_flux2_klein_pipeline(out_dir, seed=0, words=VOCAB, res=32):
    """A random-weight tiny Flux2KleinPipeline, saved to `out_dir`: FLUX.2 [klein]'s layout and conditioning in
    miniature (one Qwen3 language model as text encoder, its hidden states after layers 9, 18 and 27 side by side; a
    transformer of double- and single-stream blocks with four rotary axes and no guidance input; the FLUX.2 VAE, whose
    32 latent channels are patchified 2x2 into 128 and normalised by the VAE's batch-norm statistics; FLUX.1's
    scheduler config, the shift from the pipeline's own empirical mu). The base model's shape: is_distilled=False, so
    guidance_scale > 1 runs real classifier-free guidance against the empty prompt."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    tok = write_qwen_tokenizer(os.path.join(out_dir, "tokenizer"), words)
    # 36 layers as Qwen3-4B and -8B have (the pipeline reads hidden states 9, 18 and 27 by default), 16 wide
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=36, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id))
    # in_channels: the VAE's 2x2 patch of 32 channels (128, as in FLUX.2); joint_attention_dim: the three hidden
    # states side by side (3 x 16; 3 x 2560 = 7680 in klein 4B); the four rotary axes (time, row, column, text index:
    # 32 each of FLUX.2's 128) split one head's 16 dims
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(8, 8),
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             norm_num_groups=8, layers_per_block=1, sample_size=res)
    # the real VAE's batch-norm statistics were measured on data; made-up ones here (not 0 and 1), so that code
    # which forgets to normalise the latents as the pipeline does gets different latents, and a test can see it
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1's config
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer, is_distilled=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


def build_pipeline(out_dir, size="tiny", seed=0, words=VOCAB):
    """Build a random-weight StableDiffusionPipeline of the named size and save it to `out_dir`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    if size == "sd15":
        unet = UNet2DConditionModel()  # the library default is SD1.5's UNet configuration
        cfg = dict(text_hidden=768, text_layers=12, vae=(128, 256, 512, 512), res=512)
    else:
        cfg = SIZES[size]
        n = len(cfg["unet"])
        unet = UNet2DConditionModel(
            sample_size=cfg["res"] // 2 ** (len(cfg["vae"]) - 1), in_channels=4, out_channels=4,
            block_out_channels=cfg["unet"], layers_per_block=cfg["layers"], cross_attention_dim=cfg["xdim"],
            attention_head_dim=cfg.get("heads", 8), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (n - 1),
            up_block_types=("UpBlock2D",) * (n - 1) + ("CrossAttnUpBlock2D",))
    tok = write_tokenizer(os.path.join(out_dir, "tokenizer"), words)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=cfg["text_hidden"] if size == "sd15" else cfg["xdim"],
        intermediate_size=4 * (cfg["text_hidden"] if size == "sd15" else cfg["xdim"]),
        num_hidden_layers=cfg["text_layers"], num_attention_heads=4 if size != "sd15" else 12,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=cfg["vae"],
        down_block_types=("DownEncoderBlock2D",) * len(cfg["vae"]),
        up_block_types=("UpDecoderBlock2D",) * len(cfg["vae"]),
        norm_num_groups=8 if size != "sd15" else 32, layers_per_block=1 if size != "sd15" else 2,
        sample_size=cfg["res"])
    # SD1.5's scheduler settings; clip_sample=False matters: latents are not in [-1, 1]
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe
