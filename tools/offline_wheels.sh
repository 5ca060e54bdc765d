#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach the internet but has PyTorch (a stock PyTorch or
# NGC image): DALI with its GPU codecs and pure-Python needs, for the machine's Python, split
# into parts of at most PART_MB so that each fits a transfer limit.
#
#     tools/offline_wheels.sh OUT [PYTHON_VERSION=3.12] [PART_MB=56]
#
# On the GPU machine, with every OUT/pN/part-* copied into one folder PARTS:
#     mkdir -p /tmp/wheels && cat PARTS/part-* | tar -xf - -C /tmp/wheels
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/wheels/*.whl
#     export PYTHONPATH=/tmp/site
# torch, torchvision, numpy, click, tqdm, pillow, scipy, matplotlib and pytest are taken from
# the image. Versions are the ones pyproject.toml pins (DALI) and what DALI 2.4.0 resolved to.
set -euo pipefail
out=${1:?usage: tools/offline_wheels.sh OUT [PYTHON_VERSION] [PART_MB]}
py=${2:-3.12}
part_mb=${3:-56}
wheels=(
    nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
    nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82
    nvidia-libnvcomp-cu13==5.3.0.16 astunparse==1.6.3 gast==0.7.0 six==1.17.0 optree==0.20.0
    nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0 webdataset==1.0.2 braceexpand==0.1.7
)
mkdir -p "$out/all"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out/all" "${wheels[@]}"
rm -rf "$out"/p[0-9]* && mkdir -p "$out/split"
tar -cf - -C "$out/all" . | split -b "${part_mb}M" - "$out/split/part-"
i=0
for f in "$out"/split/part-*; do
    i=$((i + 1)) && mkdir -p "$out/p$i" && mv "$f" "$out/p$i/"
done
rmdir "$out/split"
echo "$(ls "$out/all" | wc -l) wheels, $(du -sh "$out/all" | cut -f1), in $i parts: $out/p1 .. $out/p$i"
