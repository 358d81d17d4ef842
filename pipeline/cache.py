"""The logit cache: one Zarr v3 group, self-describing, written in whole shards.

See docs/cache-format.md for the layout. This module owns creating, validating and opening it;
`capture` fills it and `loader` streams it.
"""

from __future__ import annotations

import datetime
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

import pipeline
from pipeline.errors import UserError, require

FORMAT_VERSION = 3
# topk_logprobs are stored in steps of 1/LOGPROB_STEPS nats in one byte: log-probs below
# LOGPROB_FLOOR (p < 1.2e-7) are clipped to it. Quantisation error <= 1/32 nat per value.
LOGPROB_STEPS = 16
LOGPROB_FLOOR = -255 / LOGPROB_STEPS
DONE = "shard_complete"
TOKENIZER = "tokenizer_json"

# Attributes that must agree for a rerun to resume into an existing cache.
IDENTITY_KEYS = (
    "format_version", "teacher", "teacher_fingerprint", "tokenizer_fingerprint", "corpus_fingerprint",
    "split", "vocab_size", "k", "seq_len", "n_sequences", "sequences_per_shard", "sequences_per_chunk",
    "temperatures", "tail_samples", "seed",
)


@dataclass(frozen=True)
class CacheSpec:
    """Everything that defines a cache's shape and identity."""

    teacher: str
    teacher_fingerprint: str
    tokenizer_fingerprint: str
    corpus_fingerprint: str
    split: str
    vocab_size: int
    k: int
    seq_len: int
    n_sequences: int
    sequences_per_shard: int
    sequences_per_chunk: int
    temperatures: tuple[float, ...]
    eos_id: int
    tail_samples: int = 0  # ids per position drawn from the teacher's distribution outside the top-k
    seed: int = 0  # of those draws

    @property
    def n_shards(self) -> int:
        return -(-self.n_sequences // self.sequences_per_shard)

    @property
    def id_dtype(self) -> np.dtype:
        from pipeline.token_store import id_dtype

        return id_dtype(self.vocab_size)

    @property
    def extra_temperatures(self) -> tuple[float, ...]:
        return tuple(t for t in self.temperatures if t != 1.0)

    def identity(self) -> dict[str, Any]:
        attrs = {key: getattr(self, key) for key in IDENTITY_KEYS if key != "format_version"}
        attrs["temperatures"] = list(self.temperatures)
        attrs["format_version"] = FORMAT_VERSION
        return attrs


def _codecs(kind: str, dtype: np.dtype) -> dict[str, Any]:
    """Standard Zarr v3 / numcodecs codecs per array kind (measured in bench/cache_size.py).

    - "sorted_ids": ids sorted ascending within a position, delta-coded, then zstd: the top-k sets
      cluster on frequent tokens, so the gaps are small (about 3.5x smaller than raw ids).
    - "logprobs": one byte per value (FixedScaleOffset, 1/16 nat steps), bit-shuffled, zstd.
    - "ids", "values": plain zstd with byte / bit shuffling.
    """
    from zarr.codecs.numcodecs import Delta, FixedScaleOffset

    blosc = lambda shuffle, size: BloscCodec(cname="zstd", clevel=5, shuffle=shuffle, typesize=size)  # noqa: E731
    if kind == "sorted_ids":
        return {"filters": [Delta(dtype=dtype.str)], "compressors": blosc("shuffle", dtype.itemsize)}
    if kind == "logprobs":
        quantise = FixedScaleOffset(offset=0, scale=-LOGPROB_STEPS, dtype="<f4", astype="u1")
        return {"filters": [quantise], "compressors": blosc("bitshuffle", 1)}
    if kind == "ids":
        return {"compressors": blosc("shuffle", dtype.itemsize)}
    return {"compressors": blosc("bitshuffle", dtype.itemsize)}


def array_layout(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], np.dtype, str]]:
    """name -> (shape, dtype, codec kind) for every data array in the cache."""
    S, T, k = spec.n_sequences, spec.seq_len, spec.k
    layout = {
        "input_ids": ((S, T), spec.id_dtype, "ids"),
        "topk_ids": ((S, T, k), spec.id_dtype, "sorted_ids"),
        "topk_logprobs": ((S, T, k), np.dtype(np.float32), "logprobs"),
        "tail_logprob": ((S, T), np.dtype(np.float32), "values"),
    }
    if spec.tail_samples:
        layout["tail_ids"] = ((S, T, spec.tail_samples), spec.id_dtype, "sorted_ids")
    if spec.extra_temperatures:
        layout["log_partition"] = ((S, T, len(spec.extra_temperatures)), np.dtype(np.float32), "values")
    return layout


def create_cache(path: Path, spec: CacheSpec, tokenizer_json: str) -> zarr.Group:
    """Create an empty cache (no shard complete) with all arrays, attributes and the tokenizer."""
    group = zarr.open_group(path, mode="w", zarr_format=3)
    # The tokenizer travels inside the cache, so a student needs nothing else.
    encoded = np.frombuffer(tokenizer_json.encode("utf-8"), dtype=np.uint8)
    group.create_array(TOKENIZER, data=encoded, chunks=(max(1, encoded.size),), compressors=BloscCodec(cname="zstd", clevel=5))
    for name, (shape, dtype, kind) in array_layout(spec).items():
        chunk = (spec.sequences_per_chunk, *shape[1:])
        shard = (spec.sequences_per_shard, *shape[1:])
        with warnings.catch_warnings():  # "numcodecs codecs are not in the v3 spec": zarr-python reads them
            warnings.simplefilter("ignore")
            group.create_array(name, shape=shape, dtype=dtype, chunks=chunk, shards=shard, fill_value=0,
                               **_codecs(kind, dtype))
    # One object per shard flag, so each writer sets its own flags without touching another's.
    group.create_array(DONE, shape=(spec.n_shards,), dtype=np.uint8, chunks=(1,), fill_value=0)
    codecs = {name: str(group[name].metadata.to_dict().get("codecs")) for name in array_layout(spec)}
    group.attrs.update(
        {
            **spec.identity(),
            "eos_id": spec.eos_id,
            "codecs": codecs,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "package_version": pipeline.__version__,
        }
    )
    return group


def is_cache(path: Path) -> bool:
    try:
        return "format_version" in zarr.open_group(path, mode="r").attrs
    except Exception:
        return False


def identity_differences(group: zarr.Group, spec: CacheSpec) -> list[str]:
    wanted = spec.identity()
    return [f"{key}: cache has {group.attrs.get(key)!r}, this run has {wanted[key]!r}"
            for key in IDENTITY_KEYS if group.attrs.get(key) != wanted[key]]


def matches(path: Path, spec: CacheSpec) -> bool:
    return not identity_differences(zarr.open_group(path, mode="r"), spec)


def open_or_create(path: Path, spec: CacheSpec, tokenizer_json: str, overwrite: bool) -> zarr.Group:
    """Resume into a matching cache, create a new one, or refuse (leaving `path` untouched)."""
    if path.exists() and overwrite:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not path.exists():
        return create_cache(path, spec, tokenizer_json)
    require(is_cache(path), f"{path} exists and is not a logit cache; choose another --out or remove it")
    group = zarr.open_group(path, mode="r+")
    differs = identity_differences(group, spec)
    if differs:
        raise UserError(f"{path} was made by another capture ({'; '.join(differs)}); "
                        "use --overwrite to start over or choose another --out")
    return group


def open_cache(path: Path | str) -> zarr.Group:
    """Open an existing cache for reading, checking that it is one and of a known format."""
    path = Path(path)
    require(path.exists(), f"cache not found: {path}")
    require(is_cache(path), f"{path} is not a logit cache (no format_version attribute)")
    group = zarr.open_group(path, mode="r")
    version = group.attrs["format_version"]
    require(version == FORMAT_VERSION, f"{path}: cache format {version} is not supported (this version reads {FORMAT_VERSION})")
    return group


def complete_shards(group: zarr.Group) -> np.ndarray:
    """(n_shards,) bool: which shards were fully written."""
    return group[DONE][:].astype(bool)


def require_complete(group: zarr.Group, path: Path | str) -> None:
    done = complete_shards(group)
    require(done.all(), f"{path}: {int((~done).sum())} of {done.size} shards are incomplete; "
                        "re-run `pipeline cache-logits` to finish the capture")


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def cache_tokenizer(group: zarr.Group):
    """The tokenizer (a `tokenizers.Tokenizer`) stored in the cache."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(group[TOKENIZER][:].tobytes().decode("utf-8"))
