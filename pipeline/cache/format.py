"""The cache's format: its identity, the arrays it holds and how each is encoded (docs/cache-format.md).

What a cache *is*: `CacheSpec` (shape and identity), the names of its arrays and bookkeeping, their
layout and codecs. Nothing here reads or writes a store; `store` creates and opens caches,
`integrity` checks them, `provenance` records who wrote them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

FORMAT_VERSION = 7  # 7: each chunk's own crc32c recorded (`chunk_checksums`): readers check what they read
# topk_logprobs are stored in steps of 1/LOGPROB_STEPS nats in one byte: log-probs below
# LOGPROB_FLOOR (p < 1.2e-7) are clipped to it. Quantisation error <= 1/32 nat per value.
LOGPROB_STEPS = 16
LOGPROB_FLOOR = -255 / LOGPROB_STEPS
DONE = "shard_complete"
CHECKSUMS = "shard_checksums"
# per shard, per data array, per chunk: the crc32c the chunk carries (its last 4 bytes), with PRESENT. A crc32c
# of a whole shard object is blind to its content (every chunk ends with its own crc32c, and a message followed
# by its crc32c has a constant crc32c): these say *which* bytes each chunk holds, so a reader checks the chunk
# it read is the one written there (not another shard's object, nor a rewritten one) by comparing 4 bytes
CHUNK_CHECKSUMS = "chunk_checksums"
ROW_DIGESTS = "shard_row_digests"  # per shard: the digest of the corpus rows it was computed from
TOKENIZER = "tokenizer_json"
PROVENANCE = "provenance"
CREATING = "logit_cache_creating"
# bit 32 of a checksum entry: the shard object (or chunk) exists (zarr writes no object for an all-fill shard)
PRESENT = 1 << 32
# where the sharding codec puts a shard's index: at its end, (chunks, 2) little-endian uint64 (offset, length)
# followed by its crc32c; an absent chunk has both set to 2^64 - 1
INDEX_ENTRY_BYTES, INDEX_CRC_BYTES, NO_CHUNK = 16, 4, 2**64 - 1

# Attributes that must agree for a rerun to resume into an existing cache: the content, never a path.
IDENTITY_KEYS = (
    "format_version", "teacher_fingerprint", "tokenizer_fingerprint", "corpus_fingerprint",
    "split", "vocab_size", "k", "seq_len", "n_sequences", "sequences_per_shard", "sequences_per_chunk",
    "temperatures", "tail_samples", "seed", "teacher_dtype", "device_type", "loss_mask", "masked_targets",
)
# what a grown (or changed) corpus changes: a resume keeps each complete shard whose corpus rows are
# unchanged (per-shard row digests) and captures the rest
GROWABLE_KEYS = ("corpus_fingerprint", "n_sequences")
# how the teacher computed: a resume may mix these only when forced (the new shards differ in low bits)
COMPUTE_KEYS = ("teacher_dtype", "device_type")


@dataclass(frozen=True)
class CacheSpec:
    """Everything that defines a cache's shape and identity."""

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
    # how the teacher computed: another dtype or device kind gives other low bits, so a resume
    # that mixed them would make a cache whose shards disagree
    teacher_dtype: str = "float32"
    device_type: str = "cpu"
    loss_mask: bool = False  # the corpus is chat data: the cache keeps its loss mask (1: an assistant token)
    # with a loss mask: store targets at every position (True) or only where the loss counts them
    # (False: elsewhere the arrays hold their fill value, 0, which compresses to almost nothing)
    masked_targets: bool = False

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> CacheSpec:
        values = {f.name: attrs[f.name] for f in fields(cls)}
        return cls(**{**values, "temperatures": tuple(values["temperatures"])})

    @property
    def n_shards(self) -> int:
        return -(-self.n_sequences // self.sequences_per_shard)

    @property
    def id_dtype(self) -> np.dtype:
        from pipeline.corpus.token_store import id_dtype

        return id_dtype(self.vocab_size)

    @property
    def extra_temperatures(self) -> tuple[float, ...]:
        return tuple(t for t in self.temperatures if t != 1.0)

    def temperature_column(self, temperature: float) -> int | None:
        """The column of log_partition / tempered_tail_logprob stored for `temperature` (None: not stored)."""
        extra = self.extra_temperatures
        return extra.index(temperature) if temperature in extra else None

    @property
    def chunks_per_shard(self) -> int:
        return self.sequences_per_shard // self.sequences_per_chunk

    def shard_rows(self, shard: int) -> tuple[int, int]:
        lo = shard * self.sequences_per_shard
        return lo, min(lo + self.sequences_per_shard, self.n_sequences)

    def identity(self) -> dict[str, Any]:
        attrs = {key: getattr(self, key) for key in IDENTITY_KEYS if key != "format_version"}
        attrs["temperatures"] = list(self.temperatures)
        attrs["format_version"] = FORMAT_VERSION
        return attrs


def identity_digest(attrs: dict[str, Any]) -> str:
    """A short digest of a cache's identity: what a student checkpoint records of its cache."""
    payload = json.dumps({key: attrs.get(key) for key in IDENTITY_KEYS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def codecs(kind: str, dtype: np.dtype) -> dict[str, Any]:
    """Standard Zarr v3 / numcodecs codecs per array kind (measured in bench/cache_size.py).

    - "sorted_ids": ids sorted ascending within a position, delta-coded, then zstd: the top-k sets
      cluster on frequent tokens, so the gaps are small (about 3.5x smaller than raw ids).
    - "logprobs": one byte per value (FixedScaleOffset, 1/16 nat steps), bit-shuffled, zstd.
    - "ids", "values": plain zstd with byte / bit shuffling.
    Every chunk ends with a crc32c (Zarr v3 core codec), so any reader detects a corrupted chunk.
    """
    from zarr.codecs.numcodecs import Delta, FixedScaleOffset

    def blosc(shuffle: str, size: int) -> list:
        return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle, typesize=size), Crc32cCodec()]

    if kind == "sorted_ids":
        return {"filters": [Delta(dtype=dtype.str)], "compressors": blosc("shuffle", dtype.itemsize)}
    if kind == "logprobs":
        quantise = FixedScaleOffset(offset=0, scale=-LOGPROB_STEPS, dtype="<f4", astype="u1")
        return {"filters": [quantise], "compressors": blosc("bitshuffle", 1)}
    if kind == "ids":
        return {"compressors": blosc("shuffle", dtype.itemsize)}
    if kind == "mask":
        return {"compressors": blosc("bitshuffle", 1)}
    return {"compressors": blosc("bitshuffle", dtype.itemsize)}


def array_layout(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], np.dtype, str]]:
    """name -> (shape, dtype, codec kind) for every data array in the cache, in checksum-column order."""
    S, T, k = spec.n_sequences, spec.seq_len, spec.k
    layout = {
        "input_ids": ((S, T), spec.id_dtype, "ids"),
        "topk_ids": ((S, T, k), spec.id_dtype, "sorted_ids"),
        "topk_logprobs": ((S, T, k), np.dtype(np.float32), "logprobs"),
        "tail_logprob": ((S, T), np.dtype(np.float32), "values"),
    }
    if spec.loss_mask:
        layout["loss_mask"] = ((S, T), np.dtype(np.uint8), "mask")
    if spec.tail_samples:
        layout["tail_ids"] = ((S, T, spec.tail_samples), spec.id_dtype, "sorted_ids")
    if spec.extra_temperatures:
        n = len(spec.extra_temperatures)
        layout["log_partition"] = ((S, T, n), np.dtype(np.float32), "values")
        layout["tempered_tail_logprob"] = ((S, T, n), np.dtype(np.float32), "values")
    return layout


def tail_draws_apply(loss: str, temperature: float) -> bool:
    """The sampled tail ids are draws from the teacher's tail at T = 1: they serve forward KL at
    temperature 1 only (elsewhere the tail is one bucket)."""
    return loss == "forward_kl" and temperature == 1.0


def arrays_to_read(spec: CacheSpec, temperature: float = 1.0, loss: str = "forward_kl",
                   tail_draws: bool = True) -> tuple[str, ...]:
    """The arrays a reader of this cache reads for a loss of kind `loss` at `temperature` (every reader:
    the training stream, the dataset, the held-out check): the top-k targets; the tail draws when
    `tail_draws`, the cache has them and they apply; the normaliser and tempered tail when the cache
    stores `temperature`; the loss mask of a chat cache."""
    names = ["input_ids", "topk_ids", "topk_logprobs", "tail_logprob"]
    if tail_draws and spec.tail_samples and tail_draws_apply(loss, temperature):
        names.append("tail_ids")
    if spec.temperature_column(temperature) is not None:
        names += ["log_partition", "tempered_tail_logprob"]
    if spec.loss_mask:
        names.append("loss_mask")
    return tuple(names)


def bookkeeping_layout(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of the per-shard flag, checksum, chunk checksum and corpus row digest arrays
    (each chunked one shard per object)."""
    n_arrays = len(array_layout(spec))
    return {DONE: ((spec.n_shards,), np.dtype(np.uint8)),
            CHECKSUMS: ((spec.n_shards, n_arrays), np.dtype(np.uint64)),
            CHUNK_CHECKSUMS: ((spec.n_shards, n_arrays, spec.chunks_per_shard), np.dtype(np.uint64)),
            ROW_DIGESTS: ((spec.n_shards,), np.dtype(np.uint64))}


def shard_row_digest(corpus_row_digests: np.ndarray) -> int:
    """One shard's corpus identity, from its rows' digests (pipeline.corpus.token_store.row_digests)."""
    payload = np.ascontiguousarray(corpus_row_digests).astype("<u8").tobytes()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def identity_differences(attrs: dict[str, Any], spec: CacheSpec) -> list[tuple[str, Any, Any]]:
    """(key, the cache's value, this spec's value) for each identity key on which they differ."""
    wanted = spec.identity()
    return [(key, attrs.get(key), wanted[key]) for key in IDENTITY_KEYS if attrs.get(key) != wanted[key]]
