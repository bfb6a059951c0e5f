#!/usr/bin/env bash
# Our HPSv2 and ImageReward against the original hpsv2 and image-reward packages (random weights, same images).
#
#     bash tools/check_scorers_against_originals.sh          # VENV=/tmp/scorer-venv WORK=/tmp/scorer-check by default
#
# Not run by CI. Builds a second environment OUTSIDE the repo ($VENV, about 6 GB: torch 2.14.1 + torchvision 0.29.1,
# which the originals need; hpsv2 1.2.0 and image-reward 1.5 without their pinned test/training extras;
# transformers 4.36.2, whose modeling_utils still re-exports what ImageReward's BLIP imports (4.57 no longer does);
# clip-anytorch for the `import clip` of its CLIP baselines), writes
# about 4 GB of checkpoints to $WORK, and runs the three steps of check_scorers_against_originals.py, one big
# model in memory at a time (peak about 10 GB). Measured on our 2-core CPU: about 15 minutes after the install.
# The last line says OK when every score agrees to 1e-4; $WORK/agreement.json has the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/scorer-venv}
WORK=${WORK:-/tmp/scorer-check}
PYTHON=${PYTHON:-python}  # this repo's environment (requirements.txt)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1  # nothing is downloaded at run time

if [ ! -x "$VENV/bin/python" ]; then
    python -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
    # --no-deps: hpsv2 pins pytest==7.2.0 and protobuf<4 for its training code, image-reward wants datasets,
    # diffusers and accelerate for ReFL training; scoring needs none of them
    "$VENV/bin/pip" install -q --no-deps hpsv2==1.2.0 image-reward==1.5 open_clip_torch==3.3.0
    "$VENV/bin/pip" install -q --no-deps clip-anytorch==2.6.0
    "$VENV/bin/pip" install -q "transformers==4.36.2" "huggingface-hub<1.0" timm==0.6.13 fairscale==0.4.13 ftfy regex \
        einops sentencepiece safetensors clint requests pillow numpy "setuptools<81"  # setuptools: clip's pkg_resources
fi
# the hpsv2 1.2.0 wheel lacks open_clip's BPE vocabulary that its tokenizer opens at import: it is open_clip's file
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
[ -f "$SITE/hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz" ] || \
    cp "$SITE/open_clip/bpe_simple_vocab_16e6.txt.gz" "$SITE/hpsv2/src/open_clip/"

mkdir -p "$WORK"
"$VENV/bin/python" tools/check_scorers_against_originals.py original-hpsv2 "$WORK"
"$VENV/bin/python" tools/check_scorers_against_originals.py original-imagereward "$WORK"
"$PYTHON" tools/check_scorers_against_originals.py ours "$WORK"
