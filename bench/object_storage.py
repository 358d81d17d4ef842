"""Write and read throughput of a cache in a local S3 server (SeaweedFS on 127.0.0.1) vs local disk.

    python bench/object_storage.py [--cache data/logits.zarr] [--repeats 3]

Write: every shard of an existing cache is written into a new cache the way the capture writes it
(`write_shard`: one object per array, checksums read back, flag), locally and into the S3 server.
Read: the student's loader streams the whole cache once (one epoch, 1 worker). Both are timed
alternately; the ratios of medians are reported. The S3 server runs on this same machine, so this
measures the protocol and client overhead, not a network.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import header, local_s3  # noqa: E402

from pipeline.io import storage  # noqa: E402
from pipeline.cache.format import CacheSpec, array_layout  # noqa: E402
from pipeline.cache.store import cache_tokenizer, create_cache, disk_bytes, open_cache
from pipeline.capture.shards import write_shard  # noqa: E402
from pipeline.train.loader import StreamSpec, make_loader  # noqa: E402


def write_all(source, spec: CacheSpec, tokenizer_json: str, out) -> float:
    shards = [{name: source[name][slice(*spec.shard_rows(s))] for name in array_layout(spec)} for s in range(spec.n_shards)]
    if storage.exists(out):
        storage.remove(out)
    group = create_cache(out, spec, tokenizer_json)
    start = time.perf_counter()
    for shard, arrays in enumerate(shards):
        write_shard(group, spec, shard, arrays)
    return time.perf_counter() - start


def read_all(where) -> float:
    stream = StreamSpec(str(where), batch_size=16, seed=0, shuffle_window=1024, epochs=1)
    start = time.perf_counter()
    for _ in make_loader(stream, num_workers=1):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default="data/logits.zarr")
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    source = open_cache(opts.cache)
    spec = CacheSpec.from_attrs(dict(source.attrs))
    tokenizer_json = cache_tokenizer(source).to_str()
    size = disk_bytes(opts.cache)
    with tempfile.TemporaryDirectory() as scratch, local_s3(Path(scratch)) as bucket:
        places = {"local": Path(scratch) / "copy.zarr", "s3": f"{bucket}/copy.zarr"}
        writes: dict[str, list[float]] = {k: [] for k in places}
        reads: dict[str, list[float]] = {k: [] for k in places}
        for _ in range(opts.repeats):
            for name, where in places.items():
                writes[name].append(write_all(source, spec, tokenizer_json, where))
                reads[name].append(read_all(where))
    mb = size / 1e6
    w = {k: float(np.median(v)) for k, v in writes.items()}
    r = {k: float(np.median(v)) for k, v in reads.items()}
    print(header("object storage: a cache written to and read from a local S3 server vs local disk"))
    print(f"# {opts.cache}: {spec.n_shards} shards x {len(array_layout(spec))} arrays, {mb:.1f} MB, "
          f"{opts.repeats} runs each")
    print(f"write  local {mb / w['local']:7.1f} MB/s   s3 {mb / w['s3']:7.1f} MB/s   ratio s3/local {w['local'] / w['s3']:.3f}")
    print(f"read   local {mb / r['local']:7.1f} MB/s   s3 {mb / r['s3']:7.1f} MB/s   ratio s3/local {r['local'] / r['s3']:.3f}")


if __name__ == "__main__":
    main()
