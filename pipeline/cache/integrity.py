"""Checksums of the cache's shard objects: recorded when a shard is written, checked by `verify` and by
every reader of its data.

Three layers, all standard Zarr v3 bytes:
- every chunk inside a shard ends with a crc32c (the `crc32c` codec), so a reader decoding a corrupted
  chunk fails loudly instead of decoding garbage;
- each complete shard has a row in `shard_checksums`: per data array, the crc32c of the whole shard
  object and a presence bit; `verify` compares every object with its row (no decoding), which also
  catches a deleted shard object: zarr would read it as the fill value;
- and a row in `chunk_checksums`: per data array, the crc32c each of its chunks carries. The crc32c of a
  whole object cannot tell two objects of equally long chunks apart (each chunk ends with its own
  crc32c, and a message followed by its crc32c always has the same crc32c), so these are the shard's
  identity: a reader compares the 4 bytes that end each chunk it reads with the recorded ones
  (`CheckedStore`), and so reads the bytes that were written there, or fails naming the shard.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import ByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import WrapperStore

from pipeline.cache.format import (CHECKSUMS, CHUNK_CHECKSUMS, DONE, INDEX_CRC_BYTES, INDEX_ENTRY_BYTES, NO_CHUNK,
                                   PRESENT, PROVENANCE, ROW_DIGESTS, TOKENIZER, CacheSpec, array_layout,
                                   shard_row_digest)
from pipeline.errors import UserError, require


# what `verify --repair` does with a problem: clear the shard for recapture (its data may be wrong),
# rewrite the entry from the intact data (bookkeeping that can be recomputed), or leave it to a rerun of
# `cache-logits`, which rewrites it from the corpus (the stored tokenizer)
RECAPTURE, RECOMPUTE, RECAPTURE_RUN = "recapture", "recompute", "cache-logits"


@dataclass(frozen=True)
class Problem:
    shard: int | None  # None: of the whole cache (the stored tokenizer, the provenance record)
    array: str
    what: str  # "checksum mismatch" | "missing object" | "unreadable flag" | ...
    repair: str = RECAPTURE

    def __str__(self) -> str:
        return f"{self.array}: {self.what}" if self.shard is None else f"shard {self.shard}: {self.array}: {self.what}"


def shard_key(array: zarr.Array, shard: int) -> str:
    """The store key of shard `shard` of a sequence-sharded array (shards split the first axis only)."""
    return f"{array.path}/{array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))}"


def _object(group: zarr.Group, key: str) -> bytes | None:
    buffer = sync(group.store.get(key, prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()


def checksum_entry(data: bytes | None) -> int:
    return 0 if data is None else PRESENT | google_crc32c.value(data)


def shard_index(data: bytes | memoryview, chunks: int) -> np.ndarray | None:
    """(chunks, 2) uint64: each chunk's (offset, length) in a shard object, from the index at its end;
    None when `data` cannot hold that index or the index fails its own crc32c."""
    size = chunks * INDEX_ENTRY_BYTES
    if len(data) < size + INDEX_CRC_BYTES:
        return None
    index = data[len(data) - size - INDEX_CRC_BYTES : len(data) - INDEX_CRC_BYTES]
    if google_crc32c.value(bytes(index)) != int.from_bytes(data[len(data) - INDEX_CRC_BYTES :], "little"):
        return None
    return np.frombuffer(index, "<u8").reshape(chunks, 2)


def chunk_entry(data: bytes | memoryview, offset: int, length: int) -> int:
    """PRESENT | the crc32c a chunk stored at data[offset : offset + length] carries (its last 4 bytes)."""
    return PRESENT | int.from_bytes(data[offset + length - INDEX_CRC_BYTES : offset + length], "little")


def chunk_entries(data: bytes | memoryview | None, chunks: int) -> np.ndarray | None:
    """(chunks,) uint64: each chunk's entry in a shard object (0: no chunk; all 0: no object); None when
    the object's index cannot be read or points outside it."""
    entries = np.zeros(chunks, np.uint64)
    if data is None:
        return entries
    index = shard_index(data, chunks)
    if index is None:
        return None
    for i, (offset, length) in enumerate(index.tolist()):
        if offset == NO_CHUNK and length == NO_CHUNK:
            continue
        if length < INDEX_CRC_BYTES or offset + length > len(data):
            return None
        entries[i] = chunk_entry(data, offset, length)
    return entries


def shard_records(group: zarr.Group, spec: CacheSpec, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """What the capture records of shard `shard` once written, from its objects as they are in the store
    now: ((n_arrays,) uint64 checksum entries, (n_arrays, chunks_per_shard) uint64 chunk entries)."""
    checksums = np.zeros(len(array_layout(spec)), np.uint64)
    chunks = np.zeros((len(checksums), spec.chunks_per_shard), np.uint64)
    for column, name in enumerate(array_layout(spec)):
        data = _object(group, shard_key(group[name], shard))
        checksums[column] = checksum_entry(data)
        entries = chunk_entries(data, spec.chunks_per_shard)
        if entries is None:  # never, for an object just written: its index is zarr's own
            raise RuntimeError(f"shard {shard} of {name}: the index of the object just written cannot be read")
        chunks[column] = entries
    return checksums, chunks


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


def _row(group: zarr.Group, name: str, shard: int) -> np.ndarray | None:
    """Shard `shard`'s row of a bookkeeping array, None when its object is unreadable."""
    try:
        return group[name][shard]
    except Exception:
        return None


def recorded_row_digest(group: zarr.Group, spec: CacheSpec, shard: int) -> int:
    """The digest of shard `shard`'s corpus rows, recomputed from the rows the cache holds (its input ids
    and, for chat data, its loss mask): what `shard_row_digests` must say."""
    from pipeline.corpus.token_store import row_digests

    lo, hi = spec.shard_rows(shard)
    masks = group["loss_mask"][lo:hi] if spec.loss_mask else None
    return shard_row_digest(row_digests(group["input_ids"][lo:hi], masks))


def shard_problems(group: zarr.Group, spec: CacheSpec, shard: int) -> list[Problem]:
    """Every problem of one complete shard: a checksum row missing or unreadable, an object missing,
    differing from its checksum or holding other chunks than those recorded, a row digest that is not
    its rows'."""
    names = list(array_layout(spec))
    expected, chunks = _row(group, CHECKSUMS, shard), _row(group, CHUNK_CHECKSUMS, shard)
    for row, name in ((expected, CHECKSUMS), (chunks, CHUNK_CHECKSUMS)):
        if row is None:
            return [Problem(shard, name, "unreadable checksum row")]
        if not row.any():
            return [Problem(shard, name, "missing checksum row")]
    problems = []
    for column, name in enumerate(names):
        data = _object(group, shard_key(group[name], shard))
        got = checksum_entry(data)
        if got != int(expected[column]):
            problems.append(Problem(shard, name, "missing object" if got == 0 else "checksum mismatch"))
            continue
        entries = chunk_entries(data, spec.chunks_per_shard)
        if entries is None or not np.array_equal(entries, chunks[column]):
            problems.append(Problem(shard, name, "not the object written there (its chunks' checksums differ "
                                                 "from the recorded ones: swapped or rewritten)"))
    if problems:
        return problems
    recorded = _row(group, ROW_DIGESTS, shard)
    if recorded is None:
        return [Problem(shard, ROW_DIGESTS, "unreadable row digest", RECOMPUTE)]
    if int(recorded) != recorded_row_digest(group, spec, shard):
        return [Problem(shard, ROW_DIGESTS, "differs from the digest of the shard's rows", RECOMPUTE)]
    return []


def tokenizer_problems(group: zarr.Group, fingerprint: str) -> list[Problem]:
    """The stored tokenizer unreadable, or not the one the cache's `tokenizer_fingerprint` names."""
    from tokenizers import Tokenizer

    from pipeline.corpus.tokenizer import fingerprint as fingerprint_of

    try:
        stored = fingerprint_of(Tokenizer.from_str(group[TOKENIZER][:].tobytes().decode("utf-8")))
    except Exception:  # a checksum mismatch, a missing object, bytes that are not a tokenizer
        return [Problem(None, TOKENIZER, "unreadable", RECAPTURE_RUN)]
    if stored != fingerprint:
        return [Problem(None, TOKENIZER, f"is tokenizer {stored}, the cache's tokenizer_fingerprint is {fingerprint}",
                        RECAPTURE_RUN)]
    return []


def _provenance_key(group: zarr.Group, name: str) -> str:
    return f"{group.path}/{PROVENANCE}/{name}".lstrip("/")


def _json_object(data: bytes, key: str | None = None) -> bool:
    """`data` is a JSON object (whose `key`, when given, is an object too)."""
    try:
        parsed = json.loads(data)
    except ValueError:  # not JSON, not UTF-8
        return False
    return isinstance(parsed, dict) and (key is None or isinstance(parsed.get(key), dict))


def provenance_problems(group: zarr.Group, shards: list[int]) -> list[Problem]:
    """The provenance record (the capture's history; no data) unreadable: its zarr.json, or the record of a
    complete shard (a shard without one is no problem: a capture killed after its flag writes none)."""
    problems = []
    data = _object(group, _provenance_key(group, "zarr.json"))
    if data is not None and not _json_object(data, "attributes"):
        problems.append(Problem(None, PROVENANCE, "zarr.json unreadable (the capture history)", RECOMPUTE))
    for shard in shards:
        record = _object(group, _provenance_key(group, f"shards/{shard:07d}.json"))
        if record is not None and not _json_object(record):
            problems.append(Problem(shard, PROVENANCE, "unreadable shard record (who wrote it; no data)", RECOMPUTE))
    return problems


def verify(group: zarr.Group, spec: CacheSpec, fingerprint: str | None = None, on_shard=lambda: None) -> list[Problem]:
    """Every problem of the cache: of its complete shards (`shard_problems`), their flags and provenance
    records, and (given the cache's `fingerprint`) of its stored tokenizer."""
    done, bad_flags = _flags(group, spec.n_shards)
    problems = [Problem(shard, DONE, "unreadable flag") for shard in bad_flags]
    for shard in np.flatnonzero(done):
        problems += shard_problems(group, spec, int(shard))
        on_shard()
    if fingerprint is not None:
        problems += tokenizer_problems(group, fingerprint)
    return problems + provenance_problems(group, [int(s) for s in np.flatnonzero(done)])


def repair_in_place(group: zarr.Group, spec: CacheSpec, problems: list[Problem]) -> list[Problem]:
    """Rewrite what can be recomputed from intact data (call with the writer lock held, `group` writable):
    a shard's row digest from its rows, an unreadable provenance record (removed: only history is lost).
    Returns the problems it repaired."""
    repaired = []
    for problem in problems:
        if problem.repair != RECOMPUTE:
            continue
        if problem.array == ROW_DIGESTS:
            group[ROW_DIGESTS][problem.shard] = recorded_row_digest(group, spec, problem.shard)
        elif problem.shard is None:  # the provenance group's zarr.json: a fresh one saying what happened
            note = {"repaired": "the capture history was unreadable and was reset by `pipeline verify --repair`"}
            payload = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": note}).encode()
            sync(group.store.set(_provenance_key(group, "zarr.json"),
                                 default_buffer_prototype().buffer.from_bytes(payload)))
        else:
            sync(group.store.delete(_provenance_key(group, f"shards/{problem.shard:07d}.json")))
        repaired.append(problem)
    return repaired


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
    problems = [Problem(int(shard), name, "missing checksum row") for name in (CHECKSUMS, CHUNK_CHECKSUMS)
                for shard in np.flatnonzero(done & ~stored_shards(group, name))]
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
        group[CHUNK_CHECKSUMS][shard] = 0
        remove_shard_objects(group, spec, shard)


def read_rows(array: zarr.Array, lo: int, hi: int, where: str) -> np.ndarray:
    """array[lo:hi], with a corrupted chunk (checksum mismatch, undecodable bytes) as one clear error (and
    a shard that is not the one written there, from a `CheckedStore`, as its own)."""
    try:
        return array[lo:hi]
    except UserError:
        raise
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


def shard_changed(where: str, shard: int, name: str, what: str) -> UserError:
    """A shard object a reader got is not the one written there (or is gone), as one line naming it (a plain
    UserError: a DataLoader worker's error is rebuilt from its message alone)."""
    return UserError(f"{where}: shard {shard}: {name}: {what}: the cache changed or is damaged since it was "
                     f"opened; run `pipeline verify {where}` (`--repair` marks damaged shards for recapture)")


class CheckedStore(WrapperStore):
    """A cache's store as its readers see it: every shard object of a data array that a read gets is
    the one the capture wrote there, or the read raises a UserError naming the shard (`shard_changed`);
    the rest passes through.

    For each shard it reads the recorded chunk checksums once (one small object, kept for the last
    RECORDS shards). The sharding codec gets a chunk in two requests, the shard's index then the chunk's
    bytes (or the whole object when a read covers the shard): the index's chunks must be those recorded
    (an absent one would be read as fill values), and each chunk's last 4 bytes, its crc32c, the
    recorded one (zarr then checks it against the chunk's content). No byte is hashed here.
    """

    RECORDS = 4096  # shards whose recorded chunk checksums (and read index) are kept: ~1 KB each

    def __init__(self, store: Store, spec: CacheSpec, where: str, prefix: str = ""):
        super().__init__(store)
        self._spec, self._where, self._prefix = spec, where, prefix
        self._columns = {name: column for column, name in enumerate(array_layout(spec))}
        self._records: OrderedDict[int, np.ndarray] = OrderedDict()  # shard -> (n_arrays, chunks) uint64
        self._indices: OrderedDict[str, np.ndarray] = OrderedDict()  # key -> (chunks, 2): the index read
        self._record_array = None

    def _with_store(self, store: Store) -> CheckedStore:
        return type(self)(store, self._spec, self._where, self._prefix)

    def _shard_of(self, key: str) -> tuple[str, int] | None:
        """(array, shard) when `key` is a shard object of a data array, else None."""
        if not key.startswith(self._prefix):
            return None
        name, _, rest = key[len(self._prefix):].partition("/")
        parts = rest.split("/")
        if name not in self._columns or parts[0] != "c" or len(parts) < 2 or not parts[1].isdigit():
            return None
        return (name, int(parts[1])) if all(p == "0" for p in parts[2:]) else None

    async def _recorded(self, shard: int) -> np.ndarray:
        """(n_arrays, chunks) uint64: shard `shard`'s recorded chunk entries (all 0: none recorded)."""
        if shard not in self._records:
            if self._record_array is None:
                from zarr.api.asynchronous import open_array

                self._record_array = await open_array(store=self._store, path=self._prefix + CHUNK_CHECKSUMS,
                                                      mode="r")
            self._records[shard] = np.asarray(await self._record_array.getitem(shard))
            while len(self._records) > self.RECORDS:
                self._records.popitem(last=False)
        return self._records[shard]

    def _keep_index(self, key: str, index: np.ndarray) -> None:
        self._indices[key] = index
        while len(self._indices) > self.RECORDS:
            self._indices.popitem(last=False)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await self._store.get(key, prototype, byte_range)
        found = self._shard_of(key)
        if found is None:
            return value
        name, shard = found
        if value is None:  # zarr would read the shard as fill values
            raise shard_changed(self._where, shard, name, "missing object")
        expected = (await self._recorded(shard))[self._columns[name]]  # (chunks,)
        data, chunks = memoryview(value.as_numpy_array()), len(expected)  # a view: no byte copied
        index_bytes = chunks * INDEX_ENTRY_BYTES + INDEX_CRC_BYTES
        if byte_range is None:  # the whole object
            entries = chunk_entries(data, chunks)
            if entries is None or not np.array_equal(entries, expected):
                raise shard_changed(self._where, shard, name, "not the object written there")
        elif isinstance(byte_range, SuffixByteRequest) and byte_range.suffix == index_bytes:
            index = shard_index(data, chunks)  # the index: the chunks it lists must be the recorded ones
            listed = None if index is None else (index != NO_CHUNK).any(axis=1)
            if index is not None and not np.array_equal(listed, expected != 0):
                raise shard_changed(self._where, shard, name, "not the object written there")
            if index is not None:
                self._keep_index(key, index)
        elif isinstance(byte_range, RangeByteRequest):  # a chunk, at the place the index gave
            index = self._indices.get(key)
            if index is None:
                read = await self._store.get(key, prototype, SuffixByteRequest(index_bytes))
                index = None if read is None else shard_index(read.to_bytes(), chunks)  # (chunks, 2)
            at = [] if index is None else np.flatnonzero((index[:, 0] == byte_range.start)
                                                         & (index[:, 0] + index[:, 1] == byte_range.end))
            if len(at) != 1 or chunk_entry(data, 0, len(data)) != int(expected[at[0]]):
                raise shard_changed(self._where, shard, name, "not the object written there")
        else:  # a request the sharding codec does not make: nothing to compare it with
            raise shard_changed(self._where, shard, name, f"unexpected read {byte_range}")
        return value

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def _get_many(self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
                        ) -> AsyncIterator[tuple[str, Buffer | None]]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)


def open_checked(where, spec: CacheSpec) -> zarr.Group:
    """The cache at `where` (a path or URL) opened for reading through a `CheckedStore`: what its data
    arrays give is what the capture wrote, or a UserError naming the shard. For readers of a complete cache."""
    from pipeline.io.storage import display, open_group

    group = open_group(where, mode="r")
    path = group.store_path.path
    store = CheckedStore(group.store, spec, display(where), f"{path}/" if path else "")
    return zarr.open_group(store, mode="r", path=path or None)
