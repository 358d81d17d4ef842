"""The tokenized corpus: text packed into fixed-length rows, or one conversation per row with a loss mask.

Layout (one Zarr v3 group, `DIR/tokens.zarr`), per split (`train`, `validation`): `SPLIT` [S, T]
token ids in chunks of CHUNK_ROWS rows; `SPLIT_row_digests` [S] (each row's identity: what a cache
compares per shard); `SPLIT_loss_mask` [S, T] for chat corpora (1: an assistant token);
Attributes: `tokenizer_fingerprint`, `corpus_fingerprint`, `seq_len`, `vocab_size`, `eos_id`,
`kind` (text | chat), the source and settings, each split's counts (sequences, tokens, documents;
padding, truncated, dropped for chat) and, for text, its `carry` (the tokens after the last full
row, where an --append packs on); `appending` while an append runs (readers refuse the store then).
`DIR/units.json` lists the source units the corpus holds.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.io import storage
from pipeline.errors import UserError, require
from pipeline.io.storage import Location, display

STORE_NAME = "tokens.zarr"
TOKENIZER_NAME = "tokenizer.json"


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id below vocab_size."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    require(vocab_size <= 1 << 32, f"vocab size {vocab_size} does not fit 32-bit ids")
    return np.dtype(np.uint32)


def pack(documents: list[list[int]], eos_id: int, seq_len: int, dtype: np.dtype) -> np.ndarray:
    """Join documents, each followed by eos, and cut into rows of seq_len; the last partial row is dropped.

    Returns (n_rows, seq_len).
    """
    total = sum(len(d) + 1 for d in documents)
    stream = np.empty(total, dtype=dtype)
    pos = 0
    for ids in documents:
        stream[pos : pos + len(ids)] = ids
        stream[pos + len(ids)] = eos_id
        pos += len(ids) + 1
    n_rows = total // seq_len
    return stream[: n_rows * seq_len].reshape(n_rows, seq_len)


CHUNK_ROWS = 256
DIGEST_CHUNK = 1 << 16  # row digests per chunk of the digest array


def row_digests(rows: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """(n,) uint64: each row's identity (its ids and, for chat rows, its loss mask), whatever the id dtype.

    A logit cache records the digests of each shard's rows, so it can tell which of its shards a
    grown or changed corpus leaves as they were (pipeline.cache.store)."""
    out = np.empty(len(rows), np.uint64)
    ids = np.ascontiguousarray(rows).astype("<u4")
    for i in range(len(rows)):
        digest = hashlib.blake2b(ids[i].tobytes(), digest_size=8)
        if masks is not None:
            digest.update(np.ascontiguousarray(masks[i]).astype(np.uint8).tobytes())
        out[i] = int.from_bytes(digest.digest(), "little")
    return out


def _array_names(split: str) -> dict[str, str]:
    """The store's arrays of one split: ids [S, T], loss mask [S, T] (chat corpora), row digests [S]."""
    return {"ids": split, "mask": f"{split}_loss_mask", "digests": f"{split}_row_digests"}


class RowWriter:
    """Appends rows to one split of the store, a chunk of CHUNK_ROWS rows at a time; memory: one
    chunk and less than one row of carry.

    Text: `add(ids)` packs a stream of token ids into rows of seq_len (the rows of `pack` over the
    same ids); what is left at `close` (less than a row) is the `carry`, which the corpus records (in
    its attributes, with the row counts) and an append goes on from.
    Chat: `add_rows(rows, masks)` appends whole rows (one conversation each) with their loss masks.
    `resume` reopens a split to append to it (anything past `rows`, left by an interrupted append, is cut).
    """

    def __init__(self, group: zarr.Group, split: str, seq_len: int, dtype: np.dtype, masked: bool = False,
                 rows: int | None = None, carry: list[int] | None = None):
        self.names = _array_names(split)
        # every chunk ends with its crc32c: a corrupted chunk is refused when read, never decoded as other ids
        codec = [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()]
        if rows is None:  # a new split
            group.create_array(self.names["ids"], shape=(0, seq_len), dtype=dtype, chunks=(CHUNK_ROWS, seq_len),
                               compressors=codec)
            group.create_array(self.names["digests"], shape=(0,), dtype=np.uint64, chunks=(DIGEST_CHUNK,),
                               compressors=codec)
            if masked:
                group.create_array(self.names["mask"], shape=(0, seq_len), dtype=np.uint8, chunks=(CHUNK_ROWS, seq_len),
                                   compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()])
        carry = np.asarray(carry or [], dtype)
        self.group, self.seq_len, self.dtype, self.masked = group, seq_len, dtype, masked
        self.arrays = {key: group[name] for key, name in self.names.items() if masked or key != "mask"}
        self.rows = rows or 0
        for key, array in self.arrays.items():
            array.resize((self.rows, *array.shape[1:]))
        self.digests = self.arrays.pop("digests")  # written a whole chunk at a time (see _flush_digests)
        self.digests_written, self.digest_buffer = self.rows, []
        self.carry = carry
        self.pending: list[tuple[np.ndarray, np.ndarray | None]] = []  # whole rows not yet written
        self.padding = 0  # pad tokens in chat rows

    @classmethod
    def resume(cls, group: zarr.Group, split: str, rows: int, carry: list[int]) -> RowWriter:
        ids = group[_array_names(split)["ids"]]
        return cls(group, split, ids.shape[1], ids.dtype, _array_names(split)["mask"] in group, rows, carry)

    def add(self, ids: np.ndarray) -> None:
        stream = np.concatenate([self.carry, ids])
        n = stream.size // self.seq_len
        self.carry = stream[n * self.seq_len :].copy()
        self._queue(stream[: n * self.seq_len].reshape(n, self.seq_len), None)

    def add_rows(self, rows: np.ndarray, masks: np.ndarray) -> None:
        self._queue(rows, masks)

    def _queue(self, rows: np.ndarray, masks: np.ndarray | None) -> None:
        self.pending.append((rows, masks))
        while sum(len(r) for r, _ in self.pending) >= CHUNK_ROWS:
            rows, masks = self._take()
            self._write(rows[:CHUNK_ROWS], None if masks is None else masks[:CHUNK_ROWS])
            self.pending = [(rows[CHUNK_ROWS:], None if masks is None else masks[CHUNK_ROWS:])]

    def _take(self) -> tuple[np.ndarray, np.ndarray | None]:
        rows = np.concatenate([r for r, _ in self.pending])
        masks = np.concatenate([m for _, m in self.pending]) if self.masked else None
        return rows, masks

    def close(self) -> int:
        """Write the last rows; returns how many rows the split holds (the carry stays in `carry`)."""
        if self.pending:
            rows, masks = self._take()
            if len(rows):
                self._write(rows, masks)
            self.pending = []
        self._flush_digests(self.rows)
        return self.rows

    def _write(self, rows: np.ndarray, masks: np.ndarray | None) -> None:
        lo, hi = self.rows, self.rows + len(rows)
        values = {"ids": rows} | ({"mask": masks} if self.masked else {})
        for key, array in self.arrays.items():
            array.resize((hi, *array.shape[1:]))
            array[lo:hi] = values[key]
        self.rows = hi
        self.digest_buffer.append(row_digests(rows, masks))
        self._flush_digests(hi // DIGEST_CHUNK * DIGEST_CHUNK)

    def _flush_digests(self, upto: int) -> None:
        """Write the buffered row digests up to row `upto` (a chunk boundary, or the end at close):
        each digest chunk is compressed once, not once per chunk of rows."""
        if upto <= self.digests_written:
            return
        buffered = np.concatenate(self.digest_buffer)
        n = upto - self.digests_written
        self.digests.resize((upto,))
        self.digests[self.digests_written : upto] = buffered[:n]
        self.digests_written, self.digest_buffer = upto, [buffered[n:]]


def move_tail_rows(group: zarr.Group, source: str, target: str, n: int) -> None:
    """Move the last `n` rows of split `source` (ids, loss masks, digests) to the end of split `target`,
    in order: how a corpus with too few documents for a split by document gets its held-out rows."""
    names = _array_names(source)
    ids = group[names["ids"]]
    total = ids.shape[0]
    rows = ids[total - n :]
    masks = group[names["mask"]][total - n :] if names["mask"] in group else None
    writer = RowWriter.resume(group, target, group[_array_names(target)["ids"]].shape[0], [])
    writer.add_rows(rows, masks)
    writer.close()
    for key in ("ids", "mask", "digests"):
        if names[key] in group:
            array = group[names[key]]
            array.resize((total - n, *array.shape[1:]))


def create_token_store(corpus_dir: Path) -> zarr.Group:
    return zarr.open_group(corpus_dir / STORE_NAME, mode="w", zarr_format=3)


class CorpusDamaged(UserError):
    """Damage found in a corpus: `what` is the short description (`pipeline verify` lists them)."""

    def __init__(self, shown: str, what: str):
        self.what = what
        super().__init__(f"{shown}: {what}: the corpus is damaged or was edited; prepare it again "
                         f"(`pipeline verify {shown}` lists all the damage)")


def corpus_array(group: zarr.Group, name: str, shown: str = "the corpus") -> zarr.Array:
    """The store's array `name`, with an unreadable zarr.json (or a missing array) as one clear error."""
    try:
        return group[name]
    except Exception:  # KeyError when absent; JSON or metadata errors when its zarr.json is damaged
        raise CorpusDamaged(shown, f"array {name} is missing or its zarr.json is unreadable") from None


def read_array(array: zarr.Array, shown: str = "the corpus", lo: int | None = None, hi: int | None = None) -> np.ndarray:
    """array[lo:hi], with a chunk that cannot be decoded (checksum mismatch, corrupt bytes) as one clear error."""
    try:
        return np.asarray(array[lo:hi])
    except Exception as error:
        cause = "checksum mismatch" if "checksum" in str(error).lower() else type(error).__name__
        where = "" if lo is None else f" rows {lo}-{hi}"
        raise CorpusDamaged(shown, f"{getattr(array, 'path', 'rows')}{where} cannot be read ({cause})") from None


def split_digests(group: zarr.Group, split: str, shown: str = "the corpus") -> np.ndarray:
    """(S,) uint64: the row digests of one split (a corpus prepared before they were recorded: none)."""
    name = _array_names(split)["digests"]
    require(name in group, f"the corpus has no {name}: it was prepared by an older version; run prepare-corpus again")
    return read_array(corpus_array(group, name, shown), shown)


def loss_mask_array(group: zarr.Group, split: str, shown: str = "the corpus") -> zarr.Array | None:
    """The split's loss mask [S, T] (1: a token the student learns), None for a text corpus (all of them)."""
    name = _array_names(split)["mask"]
    return corpus_array(group, name, shown) if group.attrs.get("kind") == "chat" or name in group else None


class SplitRows:
    """One split's rows as a reader takes them (a capture, a teacher, evaluate), each checked against its
    recorded digest: a deleted chunk (zarr reads it as zeros), an edited one and a corrupt one are
    refused in one line naming the array, never read as other rows. The digests themselves are
    checked first against the corpus's fingerprint, so a mismatch is the rows' damage, not theirs."""

    def __init__(self, group: zarr.Group, split: str, shown: str):
        self.shown, self.split = shown, split
        self.ids = corpus_array(group, _array_names(split)["ids"], shown)  # (S, T)
        self.mask = loss_mask_array(group, split, shown)  # (S, T) or None
        splits = [name for name in ("train", "validation") if name in group.attrs.get("counts", {})]
        fingerprint = ids_fingerprint(group, tuple(splits), shown)
        if fingerprint != group.attrs["corpus_fingerprint"]:
            raise CorpusDamaged(shown, "the row digests do not match the corpus's fingerprint")
        self.digests = split_digests(group, split, shown)  # (S,)
        if len(self.digests) != self.ids.shape[0] or (self.mask is not None and self.mask.shape != self.ids.shape):
            raise CorpusDamaged(shown, f"the {split} split's arrays disagree in length")

    @classmethod
    def of(cls, ids: np.ndarray, mask: np.ndarray | None = None, split: str = "train") -> SplitRows:
        """Rows held in memory (benchmarks, tests), with their digests computed here."""
        rows = cls.__new__(cls)
        rows.shown, rows.split, rows.ids, rows.mask = "rows in memory", split, ids, mask
        rows.digests = row_digests(ids, mask)
        return rows

    def first(self, n: int | None) -> SplitRows:
        """The first n rows only (all of them when n is None or at least their number)."""
        if n is None or n >= len(self):
            return self
        head = copy.copy(self)
        head.digests = self.digests[:n]
        return head

    def __len__(self) -> int:
        return len(self.digests)

    def rows(self, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids (n, T), loss mask (n, T) or None) of rows lo..hi, checked."""
        hi = len(self) if hi is None else min(hi, len(self))
        ids = read_array(self.ids, self.shown, lo, hi)
        mask = None if self.mask is None else read_array(self.mask, self.shown, lo, hi)
        bad = np.flatnonzero(row_digests(ids, mask) != self.digests[lo:hi])
        if bad.size:
            arrays = self.split + ("" if self.mask is None else f" or {self.split}_loss_mask")
            raise CorpusDamaged(self.shown, f"{arrays} rows {lo}-{hi}: {bad.size} differ from their recorded "
                                            f"digests, the first row {lo + int(bad[0])} (a chunk deleted or edited)")
        return ids, mask


def ids_fingerprint(group: zarr.Group, splits: tuple[str, ...], shown: str = "the corpus") -> str:
    """The corpus's identity: every row of every split, in order (from the row digests)."""
    digest = hashlib.sha256()
    for split in splits:
        digests = split_digests(group, split, shown)
        digest.update(f"{split}:{len(digests)}:".encode() + digests.astype("<u8").tobytes())
    return digest.hexdigest()[:16]


def open_token_store(corpus_dir: Location, appending_ok: bool = False) -> zarr.Group:
    shown = display(corpus_dir)
    where = storage.child(corpus_dir, STORE_NAME)
    require(storage.exists(corpus_dir), f"corpus directory not found: {shown}")
    require(storage.exists(storage.child(where, "zarr.json")),
            f"{shown} is not a prepared corpus (no {STORE_NAME}); run `pipeline prepare-corpus`")
    try:
        group = storage.open_group(where, mode="r")
    except Exception as error:
        raise UserError(f"{display(where)}: not a readable Zarr group ({error})") from None
    require("corpus_fingerprint" in group.attrs, f"{display(where)}: missing corpus attributes; re-run prepare-corpus")
    require(appending_ok or not group.attrs.get("appending"), f"{shown}: a `prepare-corpus --append` was interrupted; run it again "
                                              "to finish it (the rows it had written are cut off first)")
    return group


def is_corpus_dir(where: Location) -> bool:
    return storage.exists(storage.child(where, STORE_NAME, "zarr.json")) and storage.is_file(storage.child(where, TOKENIZER_NAME))


def corpus_tokenizer_json(corpus_dir: Location, recorded: str) -> str:
    """The corpus's tokenizer.json, as text, checked against the fingerprint the corpus recorded when it
    was tokenized (`recorded`): an edited or replaced file is refused before anything embeds or uses it."""
    from tokenizers import Tokenizer

    from pipeline.corpus.tokenizer import fingerprint

    where = storage.child(corpus_dir, TOKENIZER_NAME)
    require(storage.is_file(where), f"{display(corpus_dir)} has no {TOKENIZER_NAME}; re-run `pipeline prepare-corpus`")
    text = storage.read_text(where)
    try:
        found = fingerprint(Tokenizer.from_str(text))
    except Exception:  # tokenizers' own errors: not JSON, not a tokenizer
        raise UserError(f"{display(where)} is not a tokenizer (damaged?): restore it or re-run `pipeline "
                        "prepare-corpus`") from None
    require(found == recorded, f"{display(where)} is not the tokenizer this corpus was tokenized with (fingerprint "
                               f"{found}, recorded {recorded}): it was edited or replaced; restore it or re-run "
                               "`pipeline prepare-corpus`")
    return text
