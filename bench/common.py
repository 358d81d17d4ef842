"""Shared helpers for the benchmark scripts: machine description and a teacher to measure."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import time
from pathlib import Path
from typing import Iterator

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def header(title: str) -> str:
    return f"# {title}\n# {datetime.date.today().isoformat()} on {machine()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def local_s3(scratch: Path, bucket: str = "bench") -> Iterator[str]:
    """A real S3 server (SeaweedFS on 127.0.0.1) with one bucket for a benchmark, the AWS variables a
    user would set pointed at it; yields the bucket's URL."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pipeline.io import storage
    from tests.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3

    server = SeaweedS3(scratch / "s3")
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                       "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        storage.filesystem(f"s3://{bucket}")[0].mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()
