#!/usr/bin/env bash
# Fetch what bench/gpu_check.py needs on a GPU machine that has torch (CUDA 13.0 build), torchvision, timm, regex,
# transformers, safetensors, huggingface_hub, numpy and packaging but no package registry:
#   open_clip_torch, ftfy, wcwidth   pure Python (any platform)
#   bitsandbytes                     its Python files and only the library for CUDA 13.0 (libbitsandbytes_cuda130.so)
# Everything is unpacked into bench/wheels/site/ (git-ignored, a few MB); carry bench/wheels with the working tree.
# gpu_check.py puts that folder on sys.path at start when it exists (packages the machine has still come first), so the
# machine needs no pip install. Another CUDA build: BNB_CUDA=128 bash bench/fetch_wheels.sh keeps cuda128's library.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${1:-$here/wheels}"
py="${PYTHON:-python3}"
cuda="${BNB_CUDA:-130}"
download="$dest/download"
site="$dest/site"
rm -rf "$download" "$site.new"
mkdir -p "$download" "$site.new"
# --no-deps: the machine has the other requirements (torch, torchvision, regex, tqdm, huggingface_hub, safetensors,
# timm, numpy, packaging). wcwidth is pinned to 0.2.13, a pure release. bitsandbytes 0.50.2 ships one manylinux wheel
# (py3-none) with a library per CUDA version, cuda130 among them.
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    --dest "$download" "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.2.13" "bitsandbytes==0.50.2"
"$py" - "$download" "$site.new" "$cuda" <<'EOF'
import sys, zipfile
from pathlib import Path
download, site, cuda = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
keep_lib = f"bitsandbytes/libbitsandbytes_cuda{cuda}.so"
for whl in sorted(download.glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        names = [n for n in z.namelist() if not (n.startswith("bitsandbytes/libbitsandbytes_") and n != keep_lib)]
        if whl.name.startswith("bitsandbytes") and keep_lib not in z.namelist():
            sys.exit(f"{whl.name} has no {keep_lib}: pick a bitsandbytes release built for CUDA {cuda}")
        z.extractall(site, names)
    print(f"unpacked {whl.name} ({whl.stat().st_size / 2**20:.1f} MiB wheel, {len(names)} files kept)")
EOF
rm -rf "$site" && mv "$site.new" "$site" && rm -rf "$download"
du -sh "$site"/* | sed 's/^/  /'
total=$(du -sb "$site" | cut -f1)
echo "total: $total bytes ($(( total / 1024 / 1024 )) MiB) in $site"
if [ "$total" -ge $((40 * 1024 * 1024)) ]; then echo "the carried packages exceed 40 MiB" >&2; exit 1; fi
