"""Stage: run the teacher once over the corpus and write its top-k targets to a Zarr cache."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pipeline.cache import CacheSpec, is_cache, matches, open_or_create
from pipeline.capture import CacheConfig, capture
from pipeline.errors import require
from pipeline.inspect_cache import cache_stats
from pipeline.models import load_causal_lm, output_vocab_size, resolve_device, resolve_teacher, weights_fingerprint
from pipeline.token_store import TOKENIZER_NAME, open_token_store
from pipeline.tokenizer import check_model_tokenizer


def main(teacher: str, corpus: Path, out: Path, cfg: CacheConfig, overwrite: bool = False, progress: bool = True,
         restart_on_mismatch: bool = False) -> None:
    store = open_token_store(corpus)
    attrs = store.attrs
    rows = store[cfg.split]
    device = resolve_device(cfg.device)
    teacher = resolve_teacher(teacher)
    model = load_causal_lm(teacher, device)
    vocab = output_vocab_size(model)
    require(vocab >= attrs["vocab_size"],
            f"teacher vocab {vocab} < corpus tokenizer vocab {attrs['vocab_size']}: the corpus was not tokenized for this teacher")
    require(cfg.k <= vocab, f"k={cfg.k} is larger than the teacher vocab {vocab}")
    require(cfg.tail_samples == 0 or cfg.k < vocab, f"tail_samples needs a tail: k={cfg.k} covers the whole vocab")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    require(max_positions is None or attrs["seq_len"] <= max_positions,
            f"seq_len {attrs['seq_len']} exceeds the teacher's max_position_embeddings {max_positions}")
    check_model_tokenizer(teacher, attrs["tokenizer_fingerprint"], "teacher", "corpus",
                          hint=": prepare the corpus with the teacher's tokenizer (prepare_corpus.teacher)")
    spec = CacheSpec(
        teacher=teacher,
        teacher_fingerprint=weights_fingerprint(teacher, model),
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
    if restart_on_mismatch and not overwrite and out.exists() and is_cache(out) and not matches(out, spec):
        click.echo(f"{out} was made by another capture: starting over", err=True)
        overwrite = True
    group = open_or_create(out, spec, tokenizer_json, overwrite)
    start = time.monotonic()
    written = capture(model, rows, group, spec, cfg.batch_size, device, progress=progress)
    seconds = time.monotonic() - start
    stats = cache_stats(group, out)
    new_tokens = written * spec.sequences_per_shard * spec.seq_len  # upper bound (last shard may be short)
    click.echo(
        f"cache-logits: {stats['tokens']:,} tokens ({written} shards written now, "
        f"~{min(new_tokens, stats['tokens']) / max(seconds, 1e-9):,.0f} tok/s on {device.type}); "
        f"{stats['bytes_on_disk']:,} bytes, {stats['bytes_per_token']:.1f} B/token, "
        f"{stats['ratio_to_dense_fp16']:.0f}x smaller than dense fp16; "
        f"mean captured top-{spec.k} mass {stats['captured_mass_mean']:.4f} -> {out}"
    )
