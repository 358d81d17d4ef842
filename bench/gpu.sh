#!/usr/bin/env bash
# The GPU checks and the real-size tables, in one run on a machine with a CUDA GPU (sized for under 8
# minutes on one H100; not yet run on a GPU: none was lent), added as a dated section at the top of
# docs/benchmarks.md (and to $OUT/gpu.md when OUT is set). A step that fails says so in the section and
# the others still run:
#
#   bash bench/gpu.sh
#
# 1. the GPU tests (tests/test_gpu.py, and the capture's GPU-vs-CPU test);
# 2. capture vs bare forward at an 8B-shaped teacher (Llama d 4,096, MLP 14,336, 32 heads / 8 key-value
#    heads, V 128,256, random weights, 4 layers), bf16;
# 3. the fused loss vs the logits' path vs Hugging Face's loss vs Liger-Kernel / Cut Cross-Entropy (where
#    installed) at d = 4,096, V = 151,936, bf16 autocast;
# 4. a student step (a 4-layer d-2,048 Llama at V = 151,936): fused vs logits vs Hugging Face's loss.
#
# The packages a machine lacks (zarr, numcodecs, ...; Liger, CCE) can travel as wheels in .whl/
# (bench/gpu_wheels.sh downloads them here); they are installed into /tmp/site first.
# GPU_BENCH_SMOKE=1 runs every step at toy sizes, on any machine (how this script is tested without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "${GPU_BENCH_SMOKE:-0}" = 1 ]; then  # toy sizes: every step runs, in seconds, without a GPU
  capture=(--vocab 512 --d-model 64 --layers 1 --d-ff 128 --heads 4 --kv-heads 2 --sequences 4 --seq-len 64 --batch-size 2)
  loss=(--vocab 2048 --hidden 64 --positions 256)
  student=(--vocab 2048 --hidden 64 --positions 256 --layers 1)
  tests=(tests/test_gpu.py)
  loss_methods=(fused logits)
  step_methods=(fused logits)
else
  "$PYTHON" -c 'import torch, sys; sys.exit(None if torch.cuda.is_available() else "bench/gpu.sh: no CUDA GPU here")'
  capture=(--vocab 128256 --d-model 4096 --layers 4 --d-ff 14336 --heads 32 --kv-heads 8 --sequences 64 --seq-len 2048
           --batch-size 8)
  loss=(--vocab 151936 --hidden 4096 --positions 8192 32768)
  student=(--vocab 151936 --hidden 2048 --positions 8192 --layers 4)
  tests=(tests/test_gpu.py tests/test_cache.py::test_gpu_capture_matches_cpu)
  loss_methods=(fused logits hf liger cce)
  step_methods=(fused logits hf)
fi
failed() { echo "(this step failed: exit $1)"; }

section=$(mktemp)
{
  echo "## $(date +%F) — $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'), torch $("$PYTHON" -c 'import torch; print(torch.__version__)'): bench/gpu.sh"
  echo
  echo '### GPU tests'
  echo '```'
  "$PYTHON" -m pytest -q -p no:cacheprovider -p no:xdist -m "slow or not slow" "${tests[@]}" 2>&1 | tail -n 3 || failed $?
  echo '```'
  echo
  echo '### Capture vs bare forward (`bench/capture_overhead.py`, an 8B-shaped teacher, 4 layers, tail draws 8)'
  echo '```'
  "$PYTHON" bench/capture_overhead.py "${capture[@]}" --k 64 --tail-samples 8 --repeats 2 2>&1 || failed $?
  echo '```'
  echo
  echo '### The loss at d = 4,096 (`bench/student_memory.py`, bf16 autocast)'
  echo
  "$PYTHON" bench/student_memory.py "${loss[@]}" --dtypes bf16 --methods "${loss_methods[@]}" --repeats 3 2>&1 || failed $?
  echo
  echo '### A student step (`bench/student_memory.py --layers 4`, bf16 autocast)'
  echo
  "$PYTHON" bench/student_memory.py "${student[@]}" --dtypes bf16 --methods "${step_methods[@]}" --repeats 3 2>&1 || failed $?
  echo
} | tee "$section"

[ -n "${OUT:-}" ] && cp "$section" "$OUT/gpu.md"
if [ "${GPU_BENCH_SMOKE:-0}" != 1 ]; then  # the section goes first, under the title
  "$PYTHON" - "$section" <<'PY'
import sys
from pathlib import Path

doc, section = Path("docs/benchmarks.md"), Path(sys.argv[1]).read_text()
title, _, rest = doc.read_text().partition("\n## ")
doc.write_text(f"{title.rstrip()}\n\n{section.rstrip()}\n\n## {rest}")
PY
fi
