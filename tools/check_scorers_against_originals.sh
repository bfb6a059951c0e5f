#!/usr/bin/env bash
# Our HPSv2, ImageReward and HPSv3 against the original hpsv2, image-reward and hpsv3 packages (random weights, same
# images).
#
#     bash tools/check_scorers_against_originals.sh          # VENV=/tmp/scorer-venv WORK=/tmp/scorer-check by default
#     ONLY=hpsv3 bash tools/check_scorers_against_originals.sh   # one scorer: hpsv2, imagereward or hpsv3
#
# Not run by CI. Builds a second environment OUTSIDE the repo ($VENV, about 6 GB: torch 2.14.1 + torchvision 0.29.1,
# which the originals need; hpsv2 1.2.0 and image-reward 1.5 without their pinned test/training extras;
# transformers 4.36.2, whose modeling_utils still re-exports what ImageReward's BLIP imports (4.57 no longer does);
# clip-anytorch for the `import clip` of its CLIP baselines), writes
# about 4 GB of checkpoints to $WORK, and runs the steps of check_scorers_against_originals.py, one big
# model in memory at a time (peak about 10 GB). Measured on our 2-core CPU: about 15 minutes after the install.
# HPSv3 needs a third environment ($VENV3, about 5 GB): hpsv3 1.0.0 pins transformers 4.45.2 and imports its training
# code (peft, trl, omegaconf, fire, pandas, matplotlib, tensorboard, datasets) at import; installed --no-deps without
# deepspeed, opencv, diffusers, timm, einops and qwen-vl-utils, which scoring does not import. Its check uses a tiny
# random Qwen2-VL (no 7B here): about 1 minute.
# The last line says OK when every score agrees to 1e-4; $WORK/agreement.json has the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/scorer-venv}
VENV3=${VENV3:-/tmp/hpsv3-venv}
WORK=${WORK:-/tmp/scorer-check}
ONLY=${ONLY:-hpsv2 imagereward hpsv3}
PYTHON=${PYTHON:-python}  # this repo's environment (requirements.txt)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1  # nothing is downloaded at run time

has() { [[ " $ONLY " == *" $1 "* ]]; }
if { has hpsv2 || has imagereward; } && [ ! -x "$VENV/bin/python" ]; then
    python -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
    # --no-deps: hpsv2 pins pytest==7.2.0 and protobuf<4 for its training code, image-reward wants datasets,
    # diffusers and accelerate for ReFL training; scoring needs none of them
    "$VENV/bin/pip" install -q --no-deps hpsv2==1.2.0 image-reward==1.5 open_clip_torch==3.3.0
    "$VENV/bin/pip" install -q --no-deps clip-anytorch==2.6.0
    "$VENV/bin/pip" install -q "transformers==4.36.2" "huggingface-hub<1.0" timm==0.6.13 fairscale==0.4.13 ftfy regex \
        einops sentencepiece safetensors clint requests pillow numpy "setuptools<81"  # setuptools: clip's pkg_resources
fi
if has hpsv3 && [ ! -x "$VENV3/bin/python" ]; then
    python -m venv "$VENV3"
    "$VENV3/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
    "$VENV3/bin/pip" install -q --no-deps hpsv3==1.0.0
    "$VENV3/bin/pip" install -q "transformers==4.45.2" "huggingface-hub<1.0" trl==0.11.4 peft==0.13.2 "accelerate<1.3" \
        omegaconf fire rich safetensors pillow numpy pandas matplotlib tensorboard datasets
fi
if has hpsv2; then
    # the hpsv2 1.2.0 wheel lacks open_clip's BPE vocabulary that its tokenizer opens at import: it is open_clip's file
    SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    [ -f "$SITE/hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz" ] || \
        cp "$SITE/open_clip/bpe_simple_vocab_16e6.txt.gz" "$SITE/hpsv2/src/open_clip/"
fi

mkdir -p "$WORK"
has hpsv2 && "$VENV/bin/python" tools/check_scorers_against_originals.py original-hpsv2 "$WORK"
has imagereward && "$VENV/bin/python" tools/check_scorers_against_originals.py original-imagereward "$WORK"
has hpsv3 && "$VENV3/bin/python" tools/check_scorers_against_originals.py original-hpsv3 "$WORK"
"$PYTHON" tools/check_scorers_against_originals.py ours "$WORK" $ONLY
