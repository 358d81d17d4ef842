"""Checksums of the cache's shard objects: recorded when a shard is written, checked by `verify`.

Two layers, both standard Zarr v3:
- every chunk inside a shard ends with a crc32c (the `crc32c` codec), so any reader, the loader
  included, fails loudly on a corrupted chunk instead of decoding garbage;
- each complete shard has a row in `shard_checksums`: per data array, the crc32c of the whole shard
  object and a presence bit. `verify` compares every object with its row (no decoding), which also
  catches a deleted shard object: zarr would read it as the fill value.
"""

from __future__ import annotations

from dataclasses import dataclass

import google_crc32c
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from pipeline.cache.format import CHECKSUMS, DONE, PRESENT, CacheSpec, array_layout
from pipeline.errors import UserError, require


@dataclass(frozen=True)
class Problem:
    shard: int
    array: str
    what: str  # "checksum mismatch" | "missing object" | "unreadable flag"

    def __str__(self) -> str:
        return f"shard {self.shard}: {self.array}: {self.what}"


def shard_key(array: zarr.Array, shard: int) -> str:
    """The store key of shard `shard` of a sequence-sharded array (shards split the first axis only)."""
    return f"{array.path}/{array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))}"


def _object(group: zarr.Group, key: str) -> bytes | None:
    buffer = sync(group.store.get(key, prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()


def checksum_entry(data: bytes | None) -> int:
    return 0 if data is None else PRESENT | google_crc32c.value(data)


def shard_checksums(group: zarr.Group, spec: CacheSpec, shard: int) -> np.ndarray:
    """(n_arrays,) uint64: the checksum entries of shard `shard`'s objects as they are in the store now."""
    names = list(array_layout(spec))
    return np.array([checksum_entry(_object(group, shard_key(group[name], shard))) for name in names], np.uint64)


def _flags(group: zarr.Group, n_shards: int) -> tuple[np.ndarray, list[int]]:
    """The completion flags, and the shards whose flag object is unreadable (counted as not complete)."""
    try:
        return group[DONE][:].astype(bool), []
    except Exception:
        flags, bad = np.zeros(n_shards, bool), []
        for shard in range(n_shards):
            try:
                flags[shard] = bool(group[DONE][shard])
            except Exception:
                bad.append(shard)
        return flags, bad


def verify(group: zarr.Group, spec: CacheSpec, on_shard=lambda: None) -> list[Problem]:
    """Every problem of the complete shards: objects missing or differing from their recorded checksum."""
    names = list(array_layout(spec))
    arrays = [group[name] for name in names]
    done, bad_flags = _flags(group, spec.n_shards)
    problems = [Problem(shard, DONE, "unreadable flag") for shard in bad_flags]
    checksums = group[CHECKSUMS]
    for shard in np.flatnonzero(done):
        try:
            expected = checksums[shard]
        except Exception:
            problems.append(Problem(int(shard), CHECKSUMS, "unreadable checksum row"))
            continue
        if not expected.any():
            problems.append(Problem(int(shard), CHECKSUMS, "missing checksum row"))
            continue
        for name, array, want in zip(names, arrays, expected):
            got = checksum_entry(_object(group, shard_key(array, int(shard))))
            if got != int(want):
                what = "missing object" if got == 0 else "checksum mismatch"
                problems.append(Problem(int(shard), name, what))
        on_shard()
    return problems


def stored_shards(group: zarr.Group, name: str) -> np.ndarray:
    """(n_shards,) bool: which shards of array `name` have an object in the store, from one listing of
    its objects (a few requests in an object store, whatever the number of shards)."""
    array = group[name]
    prefix = f"{array.path}/c/"

    async def listed() -> list[str]:
        return [key async for key in group.store.list_prefix(prefix)]

    present = np.zeros(-(-array.shape[0] // (array.shards or array.chunks)[0]), bool)
    for key in sync(listed()):
        index = key[len(prefix):].split("/", 1)[0]
        if index.isdigit() and int(index) < present.size:
            present[int(index)] = True
    return present


def missing_objects(group: zarr.Group, spec: CacheSpec) -> list[Problem]:
    """Complete shards whose objects are absent from the store: one listing per array (every array of
    a complete shard has an object: they are written even when they hold only the fill value), no
    reads, for every open of a cache for training."""
    done = stored_shards(group, DONE)
    problems = [Problem(int(shard), CHECKSUMS, "missing checksum row")
                for shard in np.flatnonzero(done & ~stored_shards(group, CHECKSUMS))]
    for name in array_layout(spec):
        problems += [Problem(int(shard), name, "missing object") for shard in np.flatnonzero(done & ~stored_shards(group, name))]
    return problems


def remove_shard_objects(group: zarr.Group, spec: CacheSpec, shard: int) -> None:
    """Delete shard `shard`'s object of every data array (absent ones are no error). A shard is then
    written from nothing: zarr never reads (and fails on) a damaged old object to merge into it."""
    for name in array_layout(spec):
        sync(group.store.delete(shard_key(group[name], shard)))


def clear_shards(group: zarr.Group, spec: CacheSpec, shards: list[int]) -> None:
    """Mark shards as not written and remove their objects, so the next `cache-logits` with the same
    settings recaptures them: flag first (a shard is never complete without its objects)."""
    for shard in sorted(set(shards)):
        group[DONE][shard] = 0
        group[CHECKSUMS][shard] = 0
        remove_shard_objects(group, spec, shard)


def read_rows(array: zarr.Array, lo: int, hi: int, where: str) -> np.ndarray:
    """array[lo:hi], with a corrupted chunk (checksum mismatch, undecodable bytes) as one clear error."""
    try:
        return array[lo:hi]
    except Exception as error:
        cause = "checksum mismatch" if "checksum" in str(error).lower() else type(error).__name__
        raise UserError(f"{where}: {array.path} rows {lo}-{hi} cannot be read ({cause}): "
                        f"the cache is corrupted; run `pipeline verify {where}`") from None


def require_checksums(group: zarr.Group, spec: CacheSpec, shards: list[int], names: list[str], where: str) -> None:
    """Refuse shards whose objects of arrays `names` differ from their recorded checksums (what `inspect`
    reads: its statistics are then of the bytes the capture wrote, not of damage decoded as zeros)."""
    layout = list(array_layout(spec))
    for shard in shards:
        expected = group[CHECKSUMS][shard]
        for name in names:
            got = checksum_entry(_object(group, shard_key(group[name], shard)))
            if got != int(expected[layout.index(name)]):
                what = "missing object" if got == 0 else "checksum mismatch"
                raise UserError(f"{where}: shard {shard}: {name}: {what}; the cache is damaged: "
                                f"`pipeline verify {where}` lists all of it, `--repair` marks it for recapture")


def require_intact(group: zarr.Group, spec: CacheSpec, where: str) -> None:
    """Refuse a cache whose complete shards miss an object (checked without reading any data)."""
    problems = missing_objects(group, spec)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    require(not problems, f"{where} is damaged: {problems[0] if problems else ''}{more}; "
                          f"run `pipeline verify {where} --repair`, then `pipeline cache-logits` to recapture")
