"""Convert the official HPSv2 checkpoint (open_clip ViT-H-14) to a transformers CLIPModel folder.

    python tools/convert_hpsv2.py --checkpoint HPS_v2.1_compressed.pt --out hpsv2.1-hf/
    python tools/convert_hpsv2.py --checkpoint xswu/HPSv2:HPS_v2_compressed.pt --out hpsv2.0-hf/   # HPSv2.0
    python evaluate.py ... --hpsv2_weights hpsv2.1-hf/

The folder holds config.json, model.safetensors (float32, about 3.9 GB) and the CLIP tokenizer (from --tokenizer:
the BPE vocabulary every OpenAI/LAION CLIP shares, open_clip's too). evaluate.py also converts the official file on
load, so this only saves the conversion (and the pickle-free torch.load) on every run. The preprocessing is not in
the folder: scorers.py always applies HPSv2's own (pad to square, not crop), see reward_models.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reward_models  # noqa: E402
from files import fail  # noqa: E402
from scorers import PICKSCORE_PROCESSOR, load_tokenizer, state_dict_of  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="HPS_v2.1_compressed.pt or HPS_v2_compressed.pt: a file or repo:filename (xswu/HPSv2 on the hub)")
    p.add_argument("--tokenizer", default=PICKSCORE_PROCESSOR, help="CLIP tokenizer to save beside it: hub id or folder")
    p.add_argument("--out", required=True, help="output folder (created)")
    args = p.parse_args(argv)
    from transformers import CLIPTokenizer
    state = state_dict_of(args.checkpoint)
    if not reward_models.is_open_clip_state(state):
        fail(f"{args.checkpoint} is not an open_clip CLIP checkpoint (no visual.conv1.weight)")
    tokenizer = load_tokenizer("convert_hpsv2", CLIPTokenizer, args.tokenizer)
    try:
        model = reward_models.hpsv2_from_open_clip(state, tokenizer.eos_token_id)
    except (ValueError, KeyError, RuntimeError) as e:
        fail(f"{args.checkpoint}: {type(e).__name__}: {e}")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    print(f"wrote {args.out}: CLIPModel, {n / 1e6:.1f}M parameters, vision {c.vision_config.num_hidden_layers} x "
          f"{c.vision_config.hidden_size} at {c.vision_config.image_size} px, text {c.text_config.num_hidden_layers} x "
          f"{c.text_config.hidden_size}, {len(state)} open_clip tensors mapped")


if __name__ == "__main__":
    main()
