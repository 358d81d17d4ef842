"""Building a corpus: documents -> tokenizer.json + tokens.zarr (train/validation rows), as a stream,
and growing one in place (`--append`).

Units of the source (pipeline.corpus.sources) are tokenized on `workers` processes and written, in unit
order, into the store chunk by chunk: peak memory does not grow with the corpus. A new BPE learns
from a bounded sample of the train split first (`bpe_sample_mb`). Text documents are packed into
rows; conversations (pipeline.corpus.chat) fill one row each, with a loss mask.

The append protocol: an append keeps an existing corpus's rows and adds the units of the source it
does not hold yet (units.json lists what it holds). The store is marked `appending` first (readers
refuse it) and its counts, carry and fingerprint are written last, in one update: an interrupted
append leaves rows past the counts, which the next one cuts off before it starts. When a setting the
rows depend on changed, or one of the held units changed or went away, `units_to_append` says why
and the whole corpus is prepared again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from tqdm import tqdm

from pipeline.config import as_dict
from pipeline.corpus import sources
from pipeline.corpus.chat import NO_TEMPLATE
from pipeline.corpus.sources import Unit
from pipeline.corpus.token_store import (STORE_NAME, TOKENIZER_NAME, RowWriter, corpus_tokenizer_json,
                                         create_token_store, id_dtype, ids_fingerprint, move_tail_rows,
                                         open_token_store)
from pipeline.corpus.tokenize import CHAT_COUNTS, SPLITS, first_document, tokenized_units, training_texts
from pipeline.corpus.tokenizer import eos_id, fingerprint, load_pretrained_tokenizer, train_bpe
from pipeline.errors import UserError, require
from pipeline.io import storage
from pipeline.io.storage import Location, display
from pipeline.settings.corpus import CorpusConfig

UNITS_NAME = "units.json"  # the units the corpus holds, in order (what --append compares)


def template_digest(template: str | None) -> str | None:
    return hashlib.sha256(template.encode()).hexdigest()[:16] if template is not None else None


UNIT_KEYS = frozenset(Unit("", "").identity())  # what each entry of units.json holds


def read_units(out: Location, attrs: dict) -> list[dict] | None:
    """The units the corpus holds: the first `units_held` of units.json (an append writes the list
    before the counts, so an interrupted one may have listed units whose rows are not counted). None
    when there is no list; a list that is not the one this tool writes (unreadable, cut, edited) is
    refused in one line naming it."""
    where = storage.child(out, UNITS_NAME)
    if "units_held" not in attrs or not storage.is_file(where):
        return None
    try:
        units = json.loads(storage.read_text(where))
    except (ValueError, UnicodeDecodeError):
        units = None
    held = attrs["units_held"]
    require(isinstance(units, list) and len(units) >= held
            and all(isinstance(u, dict) and u.keys() == UNIT_KEYS and isinstance(u["path"], str) for u in units),
            f"{display(where)} is damaged: not the list of the corpus's {held} units this tool writes")
    return units[:held]


def write_units_list(out: Location, units: list[Unit]) -> None:
    """units.json, whole or not at all (one object in a store; locally written aside, then renamed):
    a full disk while it is written leaves the previous list."""
    payload = json.dumps([u.identity() for u in units], indent=0)
    where = storage.child(out, UNITS_NAME)
    if storage.is_url(where):
        storage.write_bytes(str(where), payload.encode())
        return
    tmp = Path(where).with_name(UNITS_NAME + ".tmp")
    try:
        tmp.write_text(payload)
        tmp.replace(where)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def units_to_append(out: Location, cfg: CorpusConfig, template: str | None, units: list[Unit]) -> tuple[list[Unit], str | None]:
    """(the units to add, None), or ([], why the corpus's rows cannot be kept)."""
    attrs = dict(open_token_store(out, appending_ok=True).attrs)
    old = attrs.get("config", {})
    for name in CorpusConfig.ROW_SETTINGS:
        if old.get(name) != getattr(cfg, name):
            return [], f"{name} changed ({old.get(name)!r} -> {getattr(cfg, name)!r}), so every row would change"
    if attrs.get("chat_template_digest") != template_digest(template):
        return [], "the chat template changed, so every row would change"
    try:
        held = read_units(out, attrs)
    except UserError as damaged:  # its rows are intact, but which units they hold is not known
        return [], str(damaged)
    if held is None:
        return [], f"{display(out)} has no {UNITS_NAME} (prepared by an older version)"
    current = {json.dumps(u.identity(), sort_keys=True) for u in units}
    for unit in held:
        if json.dumps(unit, sort_keys=True) not in current:
            return [], f"{storage.display(unit['path'])} changed or is gone since it was tokenized"
    held_keys = {json.dumps(u, sort_keys=True) for u in held}
    new = [u for u in units if json.dumps(u.identity(), sort_keys=True) not in held_keys]
    if new and attrs.get("holdout") == "tail":
        return [], "its validation rows are the end of its token stream, which new units would move"
    return new, None


def load_tokenizer(cfg: CorpusConfig, units: list[Unit]):
    if cfg.teacher:
        return load_pretrained_tokenizer(cfg.teacher)
    tokenizer = train_bpe(training_texts(units, cfg), cfg.vocab_size)
    return tokenizer, eos_id(tokenizer)


def prepare(out: Path, cfg: CorpusConfig, template: str | None, units: list[Unit], progress: bool) -> str:
    """Prepare a whole corpus into the (empty, local) directory `out`; returns what was made, in one line."""
    first = first_document(units, cfg)
    require(first is not None, f"{cfg.source}: the corpus is empty (no non-blank text)")
    chat = first.messages is not None
    require(not chat or template or cfg.teacher, NO_TEMPLATE)  # a new BPE has no chat template: say so before training it
    tokenizer, eos = load_tokenizer(cfg, units)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    group = create_token_store(out)
    writers = {name: RowWriter(group, name, cfg.seq_len, id_dtype(vocab_size), masked=chat) for name in SPLITS}
    counts, workers = write_units(writers, units, tokenizer.to_str(), eos, cfg, (template or "") if chat else None,
                                  progress)
    held_out = hold_out(group, writers, counts, cfg)
    tokenizer.save(str(out / TOKENIZER_NAME))
    group.attrs.update({
        "tokenizer_fingerprint": fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "eos_id": eos,
        "seq_len": cfg.seq_len,
        "source": cfg.source,
        "kind": "chat" if chat else "text",
        "chat_template_digest": template_digest(template),
        # what the rows are made of, not how fast: a speed knob must not change the corpus's DVC hash
        "config": {name: value for name, value in as_dict(cfg).items() if name not in CorpusConfig.RUN_ONLY_SETTINGS},
        "holdout": "tail" if held_out else "documents",  # an append keeps the rows only of a split by document
    })
    finish(out, group, writers, units, counts, cfg)
    chat_note = ""
    if chat:
        train = counts["train"]
        chat_note = (f"; chat: one conversation per row, {train['padding'] / max(1, train['sequences'] * cfg.seq_len):.0%} "
                     f"of train positions padding, {train['truncated']} cut at seq_len, {train['dropped']} dropped "
                     "(no assistant token in the row)")
        cut_answers = sum(counts[name]["truncated_answers"] for name in SPLITS)
        if cut_answers:
            chat_note += f", {cut_answers} truncated answers (their end of turn not learned)"
    note = f"; {held_out}" if held_out else "; no validation split (validation_fraction 0)" if not cfg.validation_fraction else ""
    return (f"prepared corpus: vocab {vocab_size}, train {counts['train']['tokens']:,} tokens "
               f"({counts['train']['documents']} docs), validation {counts['validation']['tokens']:,} tokens "
               f"({counts['validation']['documents']} docs), {len(units)} units on {workers} "
               f"worker{'s' if workers > 1 else ''}{chat_note}{note}")


def append_units(out: Location, cfg: CorpusConfig, template: str | None, new: list[Unit], progress: bool) -> str:
    """Add the new units' rows after the corpus's own, in place. The store is marked `appending` first
    (readers refuse it) and its counts, carry and fingerprint are written last, in one update: an
    interrupted append leaves rows past the counts, which the next one cuts off before it starts.
    Returns what was done, in one line."""
    group = storage.open_group(storage.child(out, STORE_NAME), mode="r+")
    attrs = dict(group.attrs)
    interrupted = bool(attrs.get("appending"))  # an earlier append died: its rows are cut off below
    if not new and not interrupted:
        return f"prepare-corpus --append: {display(out)} already holds every unit of {cfg.source}; nothing to add"
    old = attrs["counts"]
    group.attrs.update({"appending": True})  # readers refuse the store until finish() records the new counts
    writers = {name: RowWriter.resume(group, name, old[name]["sequences"], attrs.get("carry", {}).get(name))
               for name in SPLITS}
    held = [Unit(**unit) for unit in read_units(out, attrs)]
    chat = attrs.get("kind") == "chat"
    added, _ = write_units(writers, new, corpus_tokenizer_json(out, attrs["tokenizer_fingerprint"]), attrs["eos_id"], cfg,
                           (template or "") if chat else None, progress)
    total = {name: {key: old[name].get(key, 0) + value for key, value in added[name].items()} for name in SPLITS}
    finish(out, group, writers, [*held, *new], total, cfg)
    return (f"prepare-corpus --append: {len(new)} new units{' (an interrupted append cut off first)' if interrupted else ''}; "
               + ", ".join(f"{name} {old[name]['sequences']} -> {total[name]['sequences']} rows" for name in SPLITS))


def holdout_plan(train_rows: int, validation_rows: int, fraction: float) -> tuple[str, int]:
    """How the held-out rows are found, from the rows the split by document gave: ("documents", 0) as
    they are; ("none", 0) with no validation split asked for (fraction 0); ("tail", n): move the last n
    train rows to validation (no document was held out: one long text, or a few); ("all-tail", n): the
    same after every row went to validation (every document was held out). ("refuse", total) when there
    are fewer rows than the splits need."""
    total = train_rows + validation_rows
    if fraction == 0:
        return ("none", 0) if train_rows else ("refuse", total)
    if train_rows and validation_rows:
        return "documents", 0
    if total < 2:
        return "refuse", total
    n = min(total - 1, max(1, round(fraction * total)))
    return ("tail", n) if train_rows else ("all-tail", n)


def hold_out(group, writers: dict[str, RowWriter], counts: dict, cfg: CorpusConfig) -> str | None:
    """Carry out `holdout_plan` on the written splits (updating `counts`); what was done, to say, or None."""
    train, validation = counts["train"]["sequences"], counts["validation"]["sequences"]
    action, n = holdout_plan(train, validation, cfg.validation_fraction)
    if action == "refuse":
        documents = counts["train"]["documents"] + counts["validation"]["documents"]
        need = "one row" if cfg.validation_fraction == 0 else "two rows (one to train on, one to hold out)"
        raise UserError(f"the corpus makes {n} rows of seq_len={cfg.seq_len} tokens from {documents} documents; it "
                        f"needs at least {need}: add text or use a smaller seq_len (--seq-len)")
    if action in ("documents", "none"):
        return None
    if action == "all-tail":
        move_tail_rows(group, "validation", "train", validation)
    move_tail_rows(group, "train", "validation", n)
    for name, rows in (("train", train + validation - n), ("validation", n)):
        counts[name]["sequences"], counts[name]["tokens"] = rows, rows * cfg.seq_len
    why = "every document fell in the validation split" if action == "all-tail" else "no document fell in the validation split"
    return (f"{why} ({counts['train']['documents'] + counts['validation']['documents']} documents): held out the last "
            f"{n} of {train + validation} rows of the token stream instead (validation_fraction "
            f"{cfg.validation_fraction})")


def finish(out: Location, group, writers: dict[str, RowWriter], units: list[Unit], counts: dict, cfg: CorpusConfig) -> None:
    """Record the units and (last, in one update: the commit point) the counts, the carry, how many
    units are held and the fingerprint."""
    write_units_list(out, units)
    carry = {name: writer.carry.tolist() for name, writer in writers.items() if not writer.masked}
    group.attrs.update({"counts": counts, "carry": carry, "units_held": len(units),
                        "corpus_fingerprint": ids_fingerprint(group, SPLITS), "appending": False})


def write_units(writers: dict[str, RowWriter], units: list[Unit], tokenizer_json: str, eos: int, cfg: CorpusConfig,
                chat_template: str | None, progress: bool) -> tuple[dict[str, dict[str, int]], int]:
    """Tokenize the units (on workers) and write their rows. chat_template: None for text, else the
    template ("" = the tokenizer's own). Returns (per split the counts of what was added, workers)."""
    # a pool pays for itself from about one unit's worth of input per worker (small corpora: this process)
    workers = min(cfg.workers or os.cpu_count() or 1, len(units), max(1, sum(u.size for u in units) // sources.UNIT_BYTES))
    rows_before = {name: w.rows for name, w in writers.items()}
    counts = {name: {"sequences": 0, "tokens": 0, "documents": 0} | dict.fromkeys(CHAT_COUNTS[1:], 0) for name in SPLITS}
    tokens, started = 0, time.monotonic()
    dtype = writers["train"].dtype
    bar = tqdm(total=sum(u.size for u in units), unit="B", unit_scale=True, desc="prepare-corpus", disable=not progress)
    with bar:
        for unit, done in zip(units, tokenized_units(units, tokenizer_json, eos, dtype, cfg, workers, chat_template)):
            for name in SPLITS:
                if chat_template is None:
                    writers[name].add(done.streams[name])
                else:
                    writers[name].add_rows(done.rows[name], done.masks[name])
                    for key in CHAT_COUNTS[1:]:
                        counts[name][key] += done.chat[name][key]
                counts[name]["documents"] += done.documents[name]
            tokens += done.tokens
            seconds = max(time.monotonic() - started, 1e-9)
            bar.set_postfix(docs_s=f"{sum(c['documents'] for c in counts.values()) / seconds:,.0f}",
                            tok_s=f"{tokens / seconds:,.0f}")
            bar.update(unit.size)
    for name, writer in writers.items():
        counts[name]["sequences"] = writer.close() - rows_before[name]
        counts[name]["tokens"] = counts[name]["sequences"] * cfg.seq_len
    return counts, workers
