"""The synthetic user who likes red (Diffusion-KTO, appendix C), and the feedback files it writes.

The user's taste: a red-boosted version of an image is desirable, the original image undesirable.
The images are the toy base model's OWN samples (fixed seeds, random captions of the toy world), so
the fine-tuned model is pushed away from what it already makes, as with real user feedback.
The feedback is written in the two formats real users hand in:

  out/kto/liked/00000.png + 00000.txt     the red-boosted images, caption in the .txt beside each
  out/kto/disliked/00000.png + 00000.txt  the originals                        (train_kto.py --data out/kto)
  out/dpo/train.parquet                   Pick-a-Pic v2 schema pairs, boosted image preferred,
                                          the winner's side drawn at random   (train_dpo.py --data out/dpo/train.parquet)
  out/prompts.txt                         the check prompts (one per line)    (evaluate.py --prompts)

    python -m toy.red_user --base toy/data/base --out toy/data/feedback    # ~1 minute on 2 CPU cores
"""
import argparse
import datetime
import io
import os
import time
import uuid

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from toy.make_base import check_prompts, random_scene
from toy.palette import redness

# the Pick-a-Pic v2 columns, in its order (image_*_url are dead links upstream: written as nulls)
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid",
                    "best_image_uid", "model_0", "model_1", "ranking_id", "user_id", "num_example_per_prompt",
                    "are_different", "has_label", "created_at", "image_0_url", "image_1_url")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="toy/data/base", help="the toy base pipeline (diffusers layout)")
    p.add_argument("--out", default="toy/data/feedback", help="output folder")
    p.add_argument("--n", type=int, default=512, help="base samples; each gives one liked, one disliked image, one pair")
    p.add_argument("--boost", type=float, default=0.3, help="red boost: R <- min(255, (1 + boost) * R)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the base samples (the base's own scheduler: DDIM for the toy base)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance of the base samples")
    p.add_argument("--batch", type=int, default=64, help="samples per pipeline call")
    p.add_argument("--seed", type=int, default=0, help="seed of captions, sampling noise, sides and uids")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 is faster on a machine busy with other jobs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def boost_red(image, amount=0.3):
    """The desirable version of an image: its red channel multiplied by 1 + amount (capped at 255).

    A gain rather than an offset: a blue shape stays blue (its red stays low), so the caption color
    check still reads a reddened image's shape right; a gray background gains ~0.1 redness."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    a[..., 0] *= 1.0 + amount
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


@torch.no_grad()
def sample_base(pipe, captions, steps, guidance, seed, batch=64, quiet=False):
    """The base model's samples, image k drawn from the noise of seed + k (so any subset is reproducible)."""
    images = []
    for i in tqdm(range(0, len(captions), batch), desc="sampling", disable=quiet):
        chunk = captions[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    return images


def write_image_folder(out, captions, liked, disliked):
    """liked/ and disliked/ class folders, each image with its caption in a .txt of the same stem."""
    for sub, images in (("liked", liked), ("disliked", disliked)):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
        for k, (caption, im) in enumerate(zip(captions, images)):
            im.save(os.path.join(out, sub, f"{k:05d}.png"))
            with open(os.path.join(out, sub, f"{k:05d}.txt"), "w") as f:
                f.write(caption + "\n")


def jpeg_bytes(image, quality=95):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_pickapic_parquet(path, captions, winners, losers, rng, user_id=1,
                           winner_model="toy-base+red-boost", loser_model="toy-base"):
    """Pairs in the Pick-a-Pic v2 schema; the winner is on side 0 or 1 at random (label 1.0 / 0.0).

    Returns the number of pairs whose winner is image 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    n = len(captions)
    winner_first = rng.random(n) < 0.5  # (n,) randomise the side, or a model could learn "left wins"
    new_uid = lambda: str(uuid.UUID(int=int(rng.integers(0, 2 ** 63)) << 64 | int(rng.integers(0, 2 ** 63))))
    per_prompt = {c: captions.count(c) for c in set(captions)}
    start = datetime.datetime(2024, 1, 1)
    rows = {k: [] for k in PICKAPIC_COLUMNS}
    for k in range(n):
        uid_w, uid_l = new_uid(), new_uid()
        first = winner_first[k]
        sides = [(winners[k], uid_w, winner_model, 1.0), (losers[k], uid_l, loser_model, 0.0)]
        if not first:
            sides.reverse()
        rows["caption"].append(captions[k])
        for j, (im, uid, model, label) in enumerate(sides):
            rows[f"jpg_{j}"].append(jpeg_bytes(im))
            rows[f"label_{j}"].append(label)
            rows[f"image_{j}_uid"].append(uid)
            rows[f"model_{j}"].append(model)
            rows[f"image_{j}_url"].append(None)
        rows["best_image_uid"].append(uid_w)
        rows["ranking_id"].append(k)
        rows["user_id"].append(user_id)
        rows["num_example_per_prompt"].append(per_prompt[captions[k]])
        rows["are_different"].append(True)
        rows["has_label"].append(True)
        rows["created_at"].append(start + datetime.timedelta(seconds=k))
    schema = pa.schema([
        ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
        ("label_0", pa.float64()), ("label_1", pa.float64()),
        ("image_0_uid", pa.string()), ("image_1_uid", pa.string()), ("best_image_uid", pa.string()),
        ("model_0", pa.string()), ("model_1", pa.string()), ("ranking_id", pa.int64()), ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()), ("are_different", pa.bool_()), ("has_label", pa.bool_()),
        ("created_at", pa.timestamp("ns")), ("image_0_url", pa.string()), ("image_1_url", pa.string())])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(pa.table(rows, schema=schema), path)
    return int(winner_first.sum())


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    t0 = time.time()
    if DiffusionPipeline.load_config(args.base)["_class_name"] == "StableDiffusionPipeline":  # the toy base
        pipe = StableDiffusionPipeline.from_pretrained(args.base, safety_checker=None, requires_safety_checker=False)
    else:  # another family's pipeline, e.g. the toy flow base (StableDiffusion3Pipeline), with its own sampler
        pipe = DiffusionPipeline.from_pretrained(args.base)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(args.seed)
    captions = [random_scene(rng)[1] for _ in range(args.n)]  # the world's caption distribution
    originals = sample_base(pipe, captions, args.steps, args.guidance, args.seed, args.batch, args.quiet)
    boosted = [boost_red(im, args.boost) for im in originals]
    t_sample = time.time() - t0

    write_image_folder(os.path.join(args.out, "kto"), captions, liked=boosted, disliked=originals)
    parquet = os.path.join(args.out, "dpo", "train.parquet")
    n_first = write_pickapic_parquet(parquet, captions, boosted, originals, rng)
    with open(os.path.join(args.out, "prompts.txt"), "w") as f:
        f.write("\n".join(check_prompts()) + "\n")

    red_orig = np.mean([redness(im) for im in originals])
    red_boost = np.mean([redness(im) for im in boosted])
    print(f"sampled {len(originals)} images from {args.base} in {t_sample:.0f}s "
          f"({len(set(captions))} distinct captions, {type(pipe.scheduler).__name__.removesuffix('Scheduler')} "
          f"{args.steps} steps, guidance {args.guidance})")
    print(f"mean redness: originals {red_orig:.4f}, red-boosted {red_boost:.4f}")
    print(f"kto: {len(boosted)} liked + {len(originals)} disliked images with .txt captions in {args.out}/kto")
    print(f"dpo: {len(captions)} pairs in {parquet} (winner is image 0 in {n_first}, image 1 in "
          f"{len(captions) - n_first}); no ties, no pairs skipped")
    print(f"prompts: {len(check_prompts())} check prompts in {args.out}/prompts.txt")
    return {"n_liked": len(boosted), "n_disliked": len(originals), "n_pairs": len(captions),
            "redness_original": float(red_orig), "redness_boosted": float(red_boost)}


if __name__ == "__main__":
    main()
