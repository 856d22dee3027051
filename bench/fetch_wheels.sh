#!/usr/bin/env bash
# Download the few small pure-Python wheels that bench/gpu_check.py needs on a GPU machine that has torch, torchvision,
# transformers, timm, safetensors and huggingface_hub but no package registry: open_clip, ftfy and wcwidth.
# They go to bench/wheels/ (git-ignored); copy that folder along with the working tree, then on the GPU machine:
#   pip install --no-index --no-deps bench/wheels/*.whl
# bitsandbytes is not carried (a ~60 MB binary wheel tied to a CUDA build): without it the NF4 rows are skipped.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/wheels}"
py="${PYTHON:-python3}"
mkdir -p "$dest"
# --no-deps: the machine already has open_clip's other requirements (torch, torchvision, regex, tqdm,
# huggingface_hub, safetensors, timm). All three wheels are pure Python (wcwidth pinned to 0.2.13, a pure
# release, because later ones are compiled), so they install on any Python 3 and any platform.
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --dest "$dest" \
    "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.2.13"
ls -l "$dest"
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "total: $total bytes ($(( total / 1024 / 1024 )) MiB) in $dest"
if [ "$total" -ge $((40 * 1024 * 1024)) ]; then echo "the wheels exceed 40 MiB" >&2; exit 1; fi
