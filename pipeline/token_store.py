"""The tokenized corpus: documents joined by end-of-text and packed into fixed-length rows.

Layout (one Zarr v3 group, `DIR/tokens.zarr`): arrays `train` [S, T] and `validation` [S_val, T]
of token ids; attributes `tokenizer_fingerprint`, `corpus_fingerprint`, `seq_len`, `vocab_size`,
`eos_id`, counts and the documents of each split.
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


def ids_fingerprint(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).astype("<u4").tobytes())
    return digest.hexdigest()[:16]


def write_token_store(corpus_dir: Path, splits: dict[str, np.ndarray], attrs: dict[str, Any]) -> zarr.Group:
    group = zarr.open_group(corpus_dir / STORE_NAME, mode="w", zarr_format=3)
    for name, rows in splits.items():
        group.create_array(
            name,
            data=rows,
            chunks=(min(256, max(1, rows.shape[0])), rows.shape[1]),
            compressors=BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
        )
    group.attrs.update(attrs)
    return group


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
