"""Capture throughput of 2 processes under torchrun (1 thread each) vs 1 process with 2 threads.

    python bench/distributed_capture.py [--teacher data/teacher] [--corpus data/corpus] [--split validation]

Runs the real command both ways, alternately (`--repeats` times each), on this machine's CPU cores,
and reports the ratio of the median job throughputs (tokens/s from the command's own summary line).
It also checks that both made the same arrays.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header  # noqa: E402


def run(args: list[str], processes: int, out: Path) -> float:
    threads = max(1, (os.cpu_count() or 2) // processes)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([*launcher, "-m", "pipeline", "cache-logits", *args, "--out", str(out), "--overwrite"],
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stdout[-2000:] + result.stderr[-2000:])
    found = re.search(r"~([\d,]+) tok/s on", result.stdout)
    return float(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default="data/teacher")
    parser.add_argument("--corpus", default="data/corpus")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sequences-per-shard", type=int, default=32)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        params = Path(scratch) / "params.yaml"
        params.write_text(yaml.safe_dump({"cache_logits": {"split": opts.split,
                                                           "sequences_per_shard": opts.sequences_per_shard}}))
        args = ["--teacher", opts.teacher, "--corpus", opts.corpus, "--params", str(params), "--device", "cpu"]
        speeds: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(opts.repeats):
            for processes in (1, 2):
                speeds[processes].append(run(args, processes, Path(scratch) / f"p{processes}.zarr"))
        one, two = (zarr.open_group(Path(scratch) / f"p{n}.zarr", mode="r") for n in (1, 2))
        same = all(np.array_equal(one[name][:], two[name][:]) for name in one.attrs["shard_arrays"])
        tokens = one.attrs["n_sequences"] * one.attrs["seq_len"]
    median = {n: float(np.median(v)) for n, v in speeds.items()}
    print(header("distributed capture: 2 processes x 1 thread vs 1 process x 2 threads"))
    print(f"# {opts.split} split, {tokens:,} tokens, {opts.sequences_per_shard} sequences per shard, "
          f"{opts.repeats} runs each, same arrays: {same}")
    print(f"1 process  x {os.cpu_count()} threads: {median[1]:,.0f} tok/s  {[round(v) for v in speeds[1]]}")
    print(f"2 processes x {max(1, (os.cpu_count() or 2) // 2)} thread(s): {median[2]:,.0f} tok/s  {[round(v) for v in speeds[2]]}")
    print(f"ratio (2 processes / 1 process): {median[2] / median[1]:.3f}")


if __name__ == "__main__":
    main()
