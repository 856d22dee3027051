#!/usr/bin/env bash
# Download the few small wheels that bench/gpu_check.py needs on a GPU machine that has torch, torchvision,
# transformers, timm, safetensors and huggingface_hub but no package registry: open_clip and its tokenizer's helpers.
# They go to bench/wheels/ (git-ignored); copy that folder along with the working tree, then on the GPU machine:
#   pip install --no-index --find-links bench/wheels open_clip_torch
# bitsandbytes is not carried (a ~60 MB binary wheel tied to a CUDA build): without it the NF4 rows are skipped.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/wheels}"
py="${PYTHON:-python3}"
mkdir -p "$dest"
# --no-deps: the machine already has open_clip's other requirements (torch, torchvision, regex, tqdm,
# huggingface_hub, safetensors, timm). Two are pure Python; wcwidth 0.9 is an abi3 wheel for this machine's platform
# (Linux x86_64, like the GPU machine) that installs on any CPython >= 3.10.
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --dest "$dest" \
    "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.9.4"
ls -l "$dest"
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "total: $total bytes ($(( total / 1024 / 1024 )) MiB) in $dest"
if [ "$total" -ge $((40 * 1024 * 1024)) ]; then echo "the wheels exceed 40 MiB" >&2; exit 1; fi
