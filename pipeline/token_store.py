"""The tokenized corpus: documents joined by end-of-text and packed into fixed-length rows.

Layout (one Zarr v3 group, `DIR/tokens.zarr`): arrays `train` [S, T] and `validation` [S_val, T]
of token ids, chunks of CHUNK_ROWS rows; attributes `tokenizer_fingerprint`, `corpus_fingerprint`,
`seq_len`, `vocab_size`, `eos_id`, the source and settings, and each split's counts (sequences,
tokens, documents).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline import storage
from pipeline.errors import UserError, require
from pipeline.storage import Location, display

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


class RowWriter:
    """Packs a stream of token ids into rows of seq_len and appends them to one array of the store,
    a chunk of CHUNK_ROWS rows at a time; memory: one chunk and less than one row of carry. The
    rows are those of `pack` over the same ids; what is left at `close` (less than a row) is dropped."""

    def __init__(self, group: zarr.Group, name: str, seq_len: int, dtype: np.dtype):
        self.array = group.create_array(name, shape=(0, seq_len), dtype=dtype, chunks=(CHUNK_ROWS, seq_len),
                                        compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"))
        self.seq_len, self.carry, self.rows = seq_len, np.zeros(0, dtype), 0
        self.pending: list[np.ndarray] = []  # whole rows not yet written, fewer than CHUNK_ROWS
        self.digest = hashlib.sha256()

    def add(self, ids: np.ndarray) -> None:
        stream = np.concatenate([self.carry, ids])
        n = stream.size // self.seq_len
        self.pending.append(stream[: n * self.seq_len].reshape(n, self.seq_len))
        self.carry = stream[n * self.seq_len :].copy()
        while sum(len(p) for p in self.pending) >= CHUNK_ROWS:
            rows = np.concatenate(self.pending)
            self._write(rows[:CHUNK_ROWS])
            self.pending = [rows[CHUNK_ROWS:]]

    def close(self) -> int:
        """Write the last rows; returns how many rows the array holds."""
        if self.pending:
            rows = np.concatenate(self.pending)
            if len(rows):
                self._write(rows)
            self.pending = []
        return self.rows

    def _write(self, rows: np.ndarray) -> None:
        self.array.resize((self.rows + len(rows), self.seq_len))
        self.array[self.rows : self.rows + len(rows)] = rows
        self.rows += len(rows)
        self.digest.update(np.ascontiguousarray(rows).astype("<u4").tobytes())


def create_token_store(corpus_dir: Path) -> zarr.Group:
    return zarr.open_group(corpus_dir / STORE_NAME, mode="w", zarr_format=3)


def ids_fingerprint(writers: dict[str, RowWriter]) -> str:
    """The corpus's identity: every row of every split, in order (and each split's row count)."""
    digest = hashlib.sha256()
    for name, writer in writers.items():
        digest.update(f"{name}:{writer.rows}:{writer.digest.hexdigest()}".encode())
    return digest.hexdigest()[:16]


def open_token_store(corpus_dir: Location) -> zarr.Group:
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
    return group


def is_corpus_dir(where: Location) -> bool:
    return storage.exists(storage.child(where, STORE_NAME, "zarr.json")) and storage.is_file(storage.child(where, TOKENIZER_NAME))


def corpus_tokenizer_json(corpus_dir: Location) -> str:
    """The corpus's tokenizer.json, as text."""
    where = storage.child(corpus_dir, TOKENIZER_NAME)
    require(storage.is_file(where), f"{display(corpus_dir)} has no {TOKENIZER_NAME}; re-run `pipeline prepare-corpus`")
    return storage.read_text(where)
