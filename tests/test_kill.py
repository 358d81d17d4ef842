"""A real `kill -9` in the middle of `pipeline cache-logits`, then a rerun: equal to an uninterrupted capture."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import plays_corpus_and_teacher

PARAMS = "cache_logits:\n  k: 8\n  batch_size: 4\n  sequences_per_chunk: 4\n  sequences_per_shard: 8\n"


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_9_mid_capture_then_rerun_equals_uninterrupted(tmp_path):
    corpus, teacher = plays_corpus_and_teacher(tmp_path, 12_000)
    (tmp_path / "params.yaml").write_text(PARAMS)
    args = ("cache-logits", "--teacher", teacher, "--corpus", corpus)

    assert cli(*args, "--out", tmp_path / "whole.zarr", cwd=tmp_path).wait() == 0

    victim = cli(*args, "--out", tmp_path / "killed.zarr", cwd=tmp_path)
    flags = tmp_path / "killed.zarr" / "shard_complete" / "c"
    deadline = time.monotonic() + 120
    while not (flags.exists() and len(list(flags.iterdir())) >= 3) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    done = zarr.open_group(tmp_path / "killed.zarr", mode="r")["shard_complete"][:]
    assert 0 < done.sum() < done.size, "the kill should land mid-capture"

    rerun = cli(*args, "--out", tmp_path / "killed.zarr", cwd=tmp_path)
    assert rerun.wait() == 0, rerun.stdout.read()
    whole, resumed = zarr.open_group(tmp_path / "whole.zarr", mode="r"), zarr.open_group(tmp_path / "killed.zarr", mode="r")
    for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob", "shard_complete"):
        np.testing.assert_array_equal(resumed[name][:], whole[name][:], err_msg=name)
