"""Students on torchrun: step time of 2 processes vs 1 at the same global batch, and the loader's
throughput over what the student consumes, from local disk and from a local S3 server.

    python bench/distributed_training.py --cache VAL.zarr [--steps 40] [--repeats 2]

Training: the real `pipeline train-student` command, 1 process x 2 threads x batch 16 and
`torchrun` 2 processes x 1 thread x batch 8 (the same global batch, so the same data and the same
curve), alternately; the steady-state tokens/s is the median of the per-step figures of its
train_log.tsv (the first 5 steps left out). Loader: this process's micro-batches of 16 x seq_len
from `make_loader` with 1 worker, after a warm-up, from the cache on disk and from a copy in
SeaweedFS on 127.0.0.1 (the same machine: protocol and client cost, not a network).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import header  # noqa: E402

from pipeline.io import storage  # noqa: E402
from pipeline.train.loader import StreamSpec, make_loader  # noqa: E402
from pipeline.train.log import read_log  # noqa: E402
from tests.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3  # noqa: E402

GLOBAL_BATCH = 16


def train(cache: str, processes: int, steps: int, out: Path) -> list[dict]:
    threads = max(1, (os.cpu_count() or 2) // processes)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
                if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [*launcher, "-m", "pipeline", "train-student", "--cache", cache, "--out", str(out), "--overwrite",
               "--max-steps", str(steps), "--batch-size", str(GLOBAL_BATCH // processes), "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(result.stdout[-2000:] + result.stderr[-2000:])
    return read_log(out)


def loader_batches_per_s(cache: str, n: int = 60) -> float:
    batches = iter(make_loader(StreamSpec(cache, GLOBAL_BATCH, seed=0, shuffle_window=1024), num_workers=1))
    for _ in itertools.islice(batches, 5):  # worker start, first window
        pass
    start = time.perf_counter()
    for _ in itertools.islice(batches, n):
        pass
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    seq_len = storage.open_group(opts.cache, mode="r").attrs["seq_len"]
    rates: dict[int, list[float]] = {1: [], 2: []}
    logs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(opts.repeats):
            for processes in (1, 2):
                logs[processes] = train(opts.cache, processes, opts.steps, Path(scratch) / f"p{processes}")
                rates[processes].append(statistics.median(row["tokens_per_s"] for row in logs[processes][5:]))
        curve_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(logs[1], logs[2]))
        one, two = statistics.median(rates[1]), statistics.median(rates[2])
        consumed = one / (GLOBAL_BATCH * seq_len)  # batches of 16 sequences per second, one process

        local = loader_batches_per_s(opts.cache)
        server = SeaweedS3(Path(scratch) / "s3")
        server.start()
        os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                          AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1")
        try:
            fs, _ = storage.filesystem("s3://bench")
            fs.mkdir("bench")
            storage.upload(Path(opts.cache), "s3://bench/cache.zarr")
            remote = loader_batches_per_s("s3://bench/cache.zarr")
        finally:
            server.stop()
    print(header("students on torchrun: 2 processes vs 1 at the same global batch; loader vs consumption"))
    print(f"train, global batch {GLOBAL_BATCH} x {seq_len} tokens, {opts.steps} steps, median of {opts.repeats} runs:")
    print(f"  1 process x 2 threads: {one:,.0f} tok/s; 2 processes x 1 thread (DDP, gloo): {two:,.0f} tok/s")
    print(f"  step time 2 processes / 1 process: {one / two:.3f}  (largest loss difference per step: {curve_gap:.2e})")
    print(f"loader, 1 worker, batches of {GLOBAL_BATCH}: local {local:.1f}/s, S3 {remote:.1f}/s; "
          f"the student consumes {consumed:.2f}/s")
    print(f"  loader / consumption: local {local / consumed:.1f}x, S3 {remote / consumed:.1f}x")


if __name__ == "__main__":
    main()
