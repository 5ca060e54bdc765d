#!/usr/bin/env bash
# DALI for a GPU machine that cannot reach the internet but has PyTorch (a stock PyTorch or
# NGC image), packed small enough to carry in a few transfers of limited size: the wheels are
# installed into a folder for the machine's Python, their shared libraries stripped, the other
# CPython versions' extension modules dropped, the folder xz-compressed and split into parts.
#
#     tools/offline_wheels.sh OUT [PYTHON_VERSION=3.12] [PART_MB=54]
#
# On the GPU machine, with every OUT/pN/part-* copied into one folder PARTS:
#     mkdir -p /tmp/site && cat PARTS/part-* | xz -d | tar -xf - -C /tmp/site
#     export PYTHONPATH=/tmp/site
# torch, torchvision, numpy, click, tqdm, pillow, scipy, matplotlib and pytest are taken from
# the image. Versions are the ones pyproject.toml pins (DALI) and what DALI 2.4.0 resolved to.
set -euo pipefail
out=${1:?usage: tools/offline_wheels.sh OUT [PYTHON_VERSION] [PART_MB]}
py=${2:-3.12}
part_mb=${3:-54}
wheels=(
    nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
    nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82
    nvidia-libnvcomp-cu13==5.3.0.16 astunparse==1.6.3 gast==0.7.0 six==1.17.0 optree==0.20.0
    nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0 webdataset==1.0.2 braceexpand==0.1.7
)
tag=cpython-${py/./}
rm -rf "$out" && mkdir -p "$out/site"
python3 -m pip install --quiet --no-deps --no-compile --only-binary=:all: --target "$out/site" \
    --python-version "$py" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 "${wheels[@]}"
# Extension modules built for other Pythons (DALI ships one per CPython version).
find "$out/site" -name '*.cpython-3*.so' ! -name "*.$tag-*" -delete
find "$out/site" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
mkdir -p "$out/split"
tar -cf - -C "$out/site" . | xz -9 -T0 | split -b "${part_mb}M" - "$out/split/part-"
i=0
for f in "$out"/split/part-*; do
    i=$((i + 1)) && mkdir -p "$out/p$i" && mv "$f" "$out/p$i/"
done
rmdir "$out/split"
echo "$(du -sh "$out/site" | cut -f1) installed, $(cat "$out"/p*/part-* | wc -c) bytes xz, in $i parts: $out/p1 .. $out/p$i"
