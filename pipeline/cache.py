"""The logit cache: one Zarr v3 group, self-describing, written in whole shards.

See docs/cache-format.md for the layout. This module owns creating, validating and opening it;
`capture` fills it, `integrity` checks it and `loader` streams it.

Creation is marked: the group's attributes say `logit_cache_creating` until every array exists, and
only then are they replaced by the identity (with `format_version`). So a crash during creation
leaves something this tool recognises as its own unfinished work, which the next run replaces.
What the group's attributes hold is the cache's content identity only; when, where and how fast it
was written lives in the `provenance` sub-group, which DVC does not hash (.dvcignore).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import warnings
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

import pipeline
from pipeline import storage
from pipeline.errors import UserError, require
from pipeline.storage import Location, display

FORMAT_VERSION = 5
# topk_logprobs are stored in steps of 1/LOGPROB_STEPS nats in one byte: log-probs below
# LOGPROB_FLOOR (p < 1.2e-7) are clipped to it. Quantisation error <= 1/32 nat per value.
LOGPROB_STEPS = 16
LOGPROB_FLOOR = -255 / LOGPROB_STEPS
DONE = "shard_complete"
CHECKSUMS = "shard_checksums"
ROW_DIGESTS = "shard_row_digests"  # per shard: the digest of the corpus rows it was computed from
TOKENIZER = "tokenizer_json"
PROVENANCE = "provenance"
CREATING = "logit_cache_creating"
# bit 32 of a checksum entry: the shard object exists (zarr writes no object for an all-fill shard)
PRESENT = 1 << 32

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
        from pipeline.token_store import id_dtype

        return id_dtype(self.vocab_size)

    @property
    def extra_temperatures(self) -> tuple[float, ...]:
        return tuple(t for t in self.temperatures if t != 1.0)

    def temperature_column(self, temperature: float) -> int | None:
        """The column of log_partition / tempered_tail_logprob stored for `temperature` (None: not stored)."""
        extra = self.extra_temperatures
        return extra.index(temperature) if temperature in extra else None

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


def _codecs(kind: str, dtype: np.dtype) -> dict[str, Any]:
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


def bookkeeping_layout(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of the per-shard flag, checksum and corpus row digest arrays."""
    return {DONE: ((spec.n_shards,), np.dtype(np.uint8)),
            CHECKSUMS: ((spec.n_shards, len(array_layout(spec))), np.dtype(np.uint64)),
            ROW_DIGESTS: ((spec.n_shards,), np.dtype(np.uint64))}


def shard_row_digest(corpus_row_digests: np.ndarray) -> int:
    """One shard's corpus identity, from its rows' digests (pipeline.token_store.row_digests)."""
    payload = np.ascontiguousarray(corpus_row_digests).astype("<u8").tobytes()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def create_cache(path: Location, spec: CacheSpec, tokenizer_json: str) -> zarr.Group:
    """Create an empty cache (no shard complete) with all arrays, attributes and the tokenizer.

    `path` must not hold anything that is not this tool's (the caller checks)."""
    group = storage.open_group(path, mode="w", zarr_format=3, attributes={CREATING: True})
    checked = [Crc32cCodec()]
    # The tokenizer travels inside the cache, so a student needs nothing else.
    encoded = np.frombuffer(tokenizer_json.encode("utf-8"), dtype=np.uint8)
    group.create_array(TOKENIZER, data=encoded, chunks=(max(1, encoded.size),),
                       compressors=[BloscCodec(cname="zstd", clevel=5), *checked])
    layout = array_layout(spec)
    for name, (shape, dtype, kind) in layout.items():
        chunk = (spec.sequences_per_chunk, *shape[1:])
        shard = (spec.sequences_per_shard, *shape[1:])
        with warnings.catch_warnings():  # "numcodecs codecs are not in the v3 spec": zarr-python reads them
            warnings.simplefilter("ignore")
            group.create_array(name, shape=shape, dtype=dtype, chunks=chunk, shards=shard, fill_value=0,
                               **_codecs(kind, dtype))
    # One object per shard's flag and checksum row, so each writer sets its own without touching another's.
    for name, (shape, dtype) in bookkeeping_layout(spec).items():
        group.create_array(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]), fill_value=0, compressors=checked)
    codecs = {name: str(group[name].metadata.to_dict().get("codecs")) for name in layout}
    # Written last: from here on the directory is a cache (format_version present).
    group.attrs.put({**spec.identity(), "eos_id": spec.eos_id, "codecs": codecs, "shard_arrays": list(layout)})
    return group


def _attrs(path: Location) -> dict[str, Any] | None:
    try:
        return dict(storage.open_group(path, mode="r").attrs)
    except Exception:  # not a Zarr group, unreadable or corrupt metadata
        return None


def is_cache(path: Location) -> bool:
    return "format_version" in (_attrs(path) or {})


def made_by_this_tool(path: Location) -> bool:
    """A complete cache, or one whose creation was interrupted: safe for this tool to replace."""
    attrs = _attrs(path) or {}
    return "format_version" in attrs or attrs.get(CREATING) is True


def identity_differences(attrs: dict[str, Any], spec: CacheSpec) -> list[str]:
    wanted = spec.identity()
    return [f"{key}: cache has {attrs.get(key)!r}, this run has {wanted[key]!r}"
            for key in IDENTITY_KEYS if attrs.get(key) != wanted[key]]


def open_or_create(path: Location, spec: CacheSpec, tokenizer_json: str, overwrite: bool = False,
                   restart_on_mismatch: bool = False, say=print, force_compute: bool = False,
                   row_digests: np.ndarray | None = None) -> zarr.Group:
    """Resume into a matching cache, create a new one, or refuse (leaving `path` untouched).

    Only something this tool made is ever replaced: a cache (with --overwrite, or with
    restart_on_mismatch when it was made by another capture), an unfinished creation, or an empty
    directory. With `force_compute` a cache that differs only in the teacher's dtype or device kind
    is resumed (its identity keeps the values it was created with). A cache of a corpus that grew
    (or otherwise changed) is resized and keeps each complete shard whose rows are unchanged
    (`row_digests`: the corpus split's, see `regrow`). Call with the writer lock held.
    """
    shown = display(path)
    if not storage.is_vacant(path):
        require(made_by_this_tool(path), f"{shown} exists and is not a logit cache; refusing to replace it "
                                         "(choose another --out or remove it yourself)")
        attrs = _attrs(path)
        if "format_version" not in attrs:
            say(f"{shown}: an earlier capture died while creating the cache; creating it again")
        elif not overwrite:
            differs = identity_differences(attrs, spec)
            grown = [line for line in differs if line.split(":")[0] in GROWABLE_KEYS]
            if grown and row_digests is not None and len(grown) == len(differs):
                group = storage.open_group(path, mode="r+")
                if regrow(group, spec, attrs, row_digests, restart_on_mismatch, shown, say):
                    return group
                storage.remove(path)
                return create_cache(path, spec, tokenizer_json)
            compute_only = bool(differs) and all(line.split(":")[0] in COMPUTE_KEYS for line in differs)
            if compute_only and force_compute:
                say(f"{shown}: resuming with another teacher dtype or device as forced ({'; '.join(differs)}); "
                    "the shards written now may differ from the others in their low bits")
            if not differs or (compute_only and force_compute):
                return storage.open_group(path, mode="r+")
            if compute_only and not restart_on_mismatch:
                raise UserError(f"{shown} was captured with another teacher dtype or device ({'; '.join(differs)}): "
                                "resuming would mix shards that differ in their low bits; use the same --dtype/--device, "
                                "--force to resume anyway, or --overwrite to start over")
            if not restart_on_mismatch:
                raise UserError(f"{shown} was made by another capture ({'; '.join(differs)}); "
                                "use --overwrite to start over or choose another --out")
            say(f"{shown} was made by another capture ({differs[0]}{'; ...' if len(differs) > 1 else ''}): starting over")
        storage.remove(path)
    return create_cache(path, spec, tokenizer_json)


def regrow(group: zarr.Group, spec: CacheSpec, attrs: dict[str, Any], row_digests: np.ndarray,
           restart_on_mismatch: bool, shown: str, say) -> bool:
    """Fit a cache to a corpus that grew or changed: keep each complete shard whose corpus rows are
    the same (recorded shard row digest == the corpus's now, over the same rows), mark the others
    incomplete, resize every array to the new number of sequences, then record the new identity.

    Each step can be repeated, so a capture killed half-way through this simply does it again. A
    complete *full* shard whose rows changed means another corpus, not a grown one: refused (False
    returned with restart_on_mismatch: the caller starts over)."""
    old = CacheSpec.from_attrs(attrs)
    done = group[DONE][:].astype(bool)
    recorded = group[ROW_DIGESTS][:]
    keep = np.zeros(spec.n_shards, bool)
    changed = []
    for shard in np.flatnonzero(done[: spec.n_shards]):
        lo, hi = old.shard_rows(int(shard))
        same_rows = hi <= len(row_digests) and shard_row_digest(row_digests[lo:hi]) == int(recorded[shard])
        keep[shard] = same_rows and spec.shard_rows(int(shard)) == (lo, hi)
        if not same_rows and hi - lo == old.sequences_per_shard:
            changed.append(int(shard))
    if changed:
        if not restart_on_mismatch:
            raise UserError(f"{shown} was captured from other corpus rows ({len(changed)} complete shards differ, "
                            f"the first is shard {changed[0]}): not a grown corpus; use --overwrite to start over "
                            "or choose another --out")
        say(f"{shown} was captured from other corpus rows (shard {changed[0]} differs): starting over")
        return False
    for shard in np.flatnonzero(done):
        if shard >= spec.n_shards or not keep[shard]:
            group[DONE][int(shard)] = 0  # first: a crash from here on leaves these incomplete
    shapes = {name: shape for name, (shape, *_) in {**array_layout(spec), **bookkeeping_layout(spec)}.items()}
    for name, shape in shapes.items():
        group[name].resize(shape)
    group.attrs.update({key: getattr(spec, key) for key in GROWABLE_KEYS})
    say(f"{shown}: the corpus now has {spec.n_sequences} sequences (was {old.n_sequences}); keeping "
        f"{int(keep.sum())} complete shards, capturing {spec.n_shards - int(keep.sum())}")
    return True


def open_cache(where: Location) -> zarr.Group:
    """Open an existing cache for reading, checking that it is one, of a known format, with every array."""
    path = display(where)
    require(storage.exists(where), f"cache not found: {path}")
    attrs = _attrs(where)
    require(attrs is not None, f"{path} is not a readable Zarr group (corrupt or missing zarr.json)")
    require(attrs.get(CREATING) is not True, f"{path}: the capture died while creating it; re-run `pipeline cache-logits`")
    require("format_version" in attrs, f"{path} is not a logit cache (no format_version attribute)")
    version = attrs["format_version"]
    require(version == FORMAT_VERSION, f"{path}: cache format {version} is not supported (this version reads "
                                       f"{FORMAT_VERSION}); recapture it with `pipeline cache-logits --overwrite`")
    missing = [f.name for f in fields(CacheSpec) if f.name not in attrs]
    require(not missing, f"{path}: attributes missing from the cache's zarr.json: {', '.join(missing)}")
    group = storage.open_group(where, mode="r")
    spec = CacheSpec.from_attrs(attrs)
    expected = {name: (shape, dtype) for name, (shape, dtype, _) in array_layout(spec).items()} | bookkeeping_layout(spec)
    for name, (shape, dtype) in expected.items():
        try:
            array = group[name]
        except Exception:  # KeyError when absent; JSON or metadata errors when zarr.json is damaged
            raise UserError(f"{path}: array {name} is missing or its zarr.json is unreadable; "
                            "the cache is damaged (see `pipeline verify`)") from None
        require(array.shape == shape and array.dtype == dtype,
                f"{path}: array {name} has shape {array.shape} {array.dtype}, expected {shape} {dtype}")
    return group


def complete_shards(group: zarr.Group) -> np.ndarray:
    """(n_shards,) bool: which shards were fully written."""
    return group[DONE][:].astype(bool)


def require_complete(group: zarr.Group, path: Location) -> None:
    done = complete_shards(group)
    require(done.all(), f"{display(path)}: {int((~done).sum())} of {done.size} shards are incomplete; "
                        "re-run `pipeline cache-logits` to finish the capture")


def disk_bytes(path: Location) -> int:
    """Bytes of the cache's content (the provenance record excluded), on disk or in the object store."""
    return storage.total_bytes(path, skip=PROVENANCE)


def cache_tokenizer(group: zarr.Group):
    """The tokenizer (a `tokenizers.Tokenizer`) stored in the cache."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(group[TOKENIZER][:].tobytes().decode("utf-8"))
    except Exception:  # a checksum mismatch, or bytes that are not a tokenizer
        raise UserError("the cache's tokenizer_json is corrupted; recapture with `pipeline cache-logits --overwrite`") from None


# --- provenance: when, where and how the cache was written (not part of its identity) -----------

def read_provenance(path: Location) -> dict[str, Any]:
    try:
        return dict(storage.open_group(storage.child(path, PROVENANCE), mode="r").attrs)
    except Exception:
        return {}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_run(path: Location, teacher: str, run: dict[str, Any]) -> None:
    """Append one capture run (its `started` time, host, device, timing) to the cache's provenance record."""
    record = read_provenance(path)
    now = utc_now()
    record.setdefault("created", run.get("started", now))
    record["teacher"] = teacher  # as given on the command line: where it came from, not what it is
    record["location"] = display(path)  # where it lives, never how to get in
    record["package_version"] = pipeline.__version__
    record["runs"] = [*record.get("runs", []), {"finished": now, "host": socket.gethostname(), **run}][-100:]
    storage.open_group(storage.child(path, PROVENANCE), mode="a", zarr_format=3).attrs.put(record)


def _shard_record_key(shard: int) -> str:
    return f"{PROVENANCE}/shards/{shard:07d}.json"


def record_shard(group: zarr.Group, shard: int, record: dict[str, Any]) -> None:
    """Who wrote shard `shard`, where, how and how fast: one small object per shard, so writers never
    touch each other's records (kept out of the cache's identity and DVC hash, like all provenance)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    payload = json.dumps({"shard": shard, **record}, sort_keys=True).encode()
    sync(group.store.set(_shard_record_key(shard), default_buffer_prototype().buffer.from_bytes(payload)))


def read_shard_records(group: zarr.Group, shards: list[int]) -> list[dict[str, Any]]:
    """The records of these shards that exist (a shard written before format 4's records has none)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def fetch_all() -> list:
        import asyncio

        keys = [_shard_record_key(s) for s in shards]
        return await asyncio.gather(*(group.store.get(k, prototype=default_buffer_prototype()) for k in keys))

    records = []
    for buffer in sync(fetch_all()):
        if buffer is not None:
            try:
                records.append(json.loads(buffer.to_bytes()))
            except ValueError:
                continue  # a damaged record says nothing; the data's own checksums still hold
    return records
