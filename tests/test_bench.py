"""bench/gpu.sh, the one script a lent GPU machine runs, runs end to end (at toy sizes, on the CPU:
GPU_BENCH_SMOKE=1), so the device's short time is not spent on a broken script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_script_runs_every_step_at_toy_sizes(tmp_path):
    env = {**os.environ, "GPU_BENCH_SMOKE": "1", "PYTHON": sys.executable, "OUT": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    section = (tmp_path / "gpu.md").read_text()
    assert "failed" not in section, section
    for title in ("### GPU tests", "### Capture vs bare forward", "### The loss at d = 4,096", "### A student step"):
        assert title in section
    assert "ratio capture/bare" in section
    assert section.count("| bf16 | 64 | 256 | fused |") == 2 and section.count("| bf16 | 64 | 256 | logits |") == 2
