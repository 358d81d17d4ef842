"""Requests (and seconds) to open a cache for training, by shard count, on local disk and in a local
S3 server (SeaweedFS on 127.0.0.1).

    python bench/open_requests.py [--shards 16 128 1024]

For each shard count a synthetic cache (random targets, tiny rows: only the number of objects
matters) is written the way the capture writes it, then opened with `LogitCache.open` (every check:
format, every array, completeness, every shard object present) and, in the same run, with the
per-shard checks the previous version made (every flag and checksum row read, one existence check
per shard and array). S3 requests are counted at s3fs's one entry point for API calls.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import s3fs
from zarr.core.sync import sync

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import header, local_s3  # noqa: E402

from pipeline import LogitCache  # noqa: E402
from pipeline.cache.format import CHECKSUMS, DONE, PRESENT, CacheSpec, array_layout  # noqa: E402
from pipeline.cache.integrity import shard_key  # noqa: E402
from pipeline.cache.store import create_cache, open_cache  # noqa: E402
from pipeline.capture.shards import write_shard  # noqa: E402
from pipeline.io import storage  # noqa: E402

COUNTS: dict[str, int] = {}
_send = s3fs.S3FileSystem._call_s3


async def _counted(self, method, *args, **kwargs):
    COUNTS[method] = COUNTS.get(method, 0) + 1
    return await _send(self, method, *args, **kwargs)


s3fs.S3FileSystem._call_s3 = _counted  # this script's own instrument: every S3 API call passes here


def write_cache(where, n_shards: int) -> None:
    spec = CacheSpec("bench", "tok", "corpus", "train", vocab_size=512, k=4, seq_len=8, n_sequences=n_shards,
                     sequences_per_shard=1, sequences_per_chunk=1, temperatures=(1.0,), eos_id=0, tail_samples=2)
    rng = np.random.default_rng(0)
    if storage.exists(where):
        storage.remove(where)
    group = create_cache(where, spec, "{}")
    for shard in range(n_shards):
        arrays = {name: (rng.integers(0, 500, shape[1:]) if dtype.kind == "u" else -rng.random(shape[1:]))
                  .astype(dtype)[None] for name, (shape, dtype, _) in array_layout(spec).items()}
        write_shard(group, spec, shard, arrays)


def previous_checks(where) -> None:
    """What opening a cache checked before (O(shards x arrays) requests): the flags and checksum rows
    read in full (twice), then one existence check per complete shard and array."""
    group = open_cache(where)
    spec = CacheSpec.from_attrs(dict(group.attrs))
    done = group[DONE][:].astype(bool)
    assert done.all()
    done, rows = group[DONE][:].astype(bool), group[CHECKSUMS][:]
    for column, name in enumerate(array_layout(spec)):
        array = group[name]
        for shard in np.flatnonzero(done):
            assert not rows[shard, column] & PRESENT or sync(group.store.exists(shard_key(array, int(shard))))


def measure(open_fn, where) -> tuple[int, float]:
    COUNTS.clear()
    start = time.perf_counter()
    open_fn(where)
    return sum(COUNTS.values()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, nargs="+", default=[16, 128, 1024])
    opts = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch, local_s3(Path(scratch)) as bucket:
        for n in opts.shards:
            for place, where in (("local", Path(scratch) / f"c{n}.zarr"), ("s3", f"{bucket}/c{n}.zarr")):
                write_cache(where, n)
                now = measure(LogitCache.open, where)
                before = measure(previous_checks, where)
                rows.append((n, place, now, before))
    print(header("opening a cache for training: requests and seconds by shard count"))
    print("| shards | store | requests now | requests before | seconds now | seconds before | before / now (s) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n, place, (requests, seconds), (old_requests, old_seconds) in rows:
        counted = (lambda r: f"{r:,}") if place == "s3" else (lambda r: "–")
        print(f"| {n:,} | {place} | {counted(requests)} | {counted(old_requests)} | {seconds:.3f} | {old_seconds:.3f} "
              f"| {old_seconds / seconds:.1f} |")


if __name__ == "__main__":
    main()
