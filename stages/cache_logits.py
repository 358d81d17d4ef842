"""Stage: run the teacher once over the corpus and write its top-k targets to a Zarr cache."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pipeline.cache import CacheSpec, open_or_create, record_run, utc_now
from pipeline.capture import capture
from pipeline.errors import require
from pipeline.inspect_cache import cache_stats
from pipeline.models import load_causal_lm, output_vocab_size, resolve_device, resolve_teacher, weights_fingerprint
from pipeline.outputs import check_not_an_input, writer_lock
from pipeline.settings.cache import CacheConfig
from pipeline.token_store import TOKENIZER_NAME, open_token_store
from pipeline.tokenizer import check_model_tokenizer


def main(teacher: str, corpus: Path, out: Path, cfg: CacheConfig, overwrite: bool = False, progress: bool = True,
         restart_on_mismatch: bool = False) -> None:
    check_not_an_input(out, {"--corpus": corpus, "--teacher": teacher})
    store = open_token_store(corpus)
    attrs = store.attrs
    rows = store[cfg.split]
    device = resolve_device(cfg.device)
    source = resolve_teacher(teacher)
    model = load_causal_lm(source, device)
    vocab = output_vocab_size(model)
    require(vocab >= attrs["vocab_size"],
            f"teacher vocab {vocab} < corpus tokenizer vocab {attrs['vocab_size']}: the corpus was not tokenized for this teacher")
    require(cfg.k <= vocab, f"k={cfg.k} is larger than the teacher vocab {vocab}")
    require(cfg.tail_samples == 0 or cfg.k < vocab, f"tail_samples needs a tail: k={cfg.k} covers the whole vocab")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    require(max_positions is None or attrs["seq_len"] <= max_positions,
            f"seq_len {attrs['seq_len']} exceeds the teacher's max_position_embeddings {max_positions}")
    check_model_tokenizer(source, attrs["tokenizer_fingerprint"], "teacher", "corpus",
                          hint=": prepare the corpus with the teacher's tokenizer (prepare_corpus.teacher)")
    spec = CacheSpec(
        teacher_fingerprint=weights_fingerprint(source, model),
        tokenizer_fingerprint=attrs["tokenizer_fingerprint"],
        corpus_fingerprint=attrs["corpus_fingerprint"],
        split=cfg.split,
        vocab_size=vocab,
        k=cfg.k,
        seq_len=attrs["seq_len"],
        n_sequences=rows.shape[0],
        sequences_per_shard=cfg.sequences_per_shard,
        sequences_per_chunk=cfg.sequences_per_chunk,
        temperatures=tuple(sorted(cfg.temperatures)),
        eos_id=attrs["eos_id"],
        tail_samples=cfg.tail_samples,
        seed=cfg.seed,
    )
    tokenizer_json = (Path(corpus) / TOKENIZER_NAME).read_text("utf-8")
    with writer_lock(out):
        started = utc_now()
        group = open_or_create(out, spec, tokenizer_json, overwrite, restart_on_mismatch,
                               say=lambda line: click.echo(line, err=True))
        start = time.monotonic()
        written = capture(model, rows, group, spec, cfg.batch_size, device, progress=progress)
        seconds = time.monotonic() - start
        new_tokens = written * spec.sequences_per_shard * spec.seq_len  # upper bound (last shard may be short)
        stats = cache_stats(group, out)
        tokens_per_s = min(new_tokens, stats["tokens"]) / max(seconds, 1e-9)
        record_run(out, teacher, {"started": started, "device": device.type, "shards_written": written,
                                  "seconds": round(seconds, 3), "tokens_per_s": round(tokens_per_s)})
    click.echo(
        f"cache-logits: {stats['tokens']:,} tokens ({written} shards written now, "
        f"~{tokens_per_s:,.0f} tok/s on {device.type}); "
        f"{stats['bytes_on_disk']:,} bytes, {stats['bytes_per_token']:.1f} B/token, "
        f"{stats['ratio_to_dense_fp16']:.0f}x smaller than dense fp16; "
        f"mean captured top-{spec.k} mass {stats['captured_mass_mean']:.4f} -> {out}"
    )
