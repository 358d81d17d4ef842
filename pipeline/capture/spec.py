"""What a capture makes: the cache's spec, from the settings, the corpus and the teacher, checked
against each other before anything is written."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from pipeline.cache.format import CacheSpec
from pipeline.corpus.tokenizer import check_model_tokenizer
from pipeline.errors import require
from pipeline.models.load import output_vocab_size
from pipeline.settings.cache import CacheConfig


def capture_spec(cfg: CacheConfig, corpus: dict, n_sequences: int, model: PreTrainedModel, source: str,
                 teacher_fingerprint: str, dtype: torch.dtype, device: torch.device, chat: bool) -> CacheSpec:
    """The spec of the cache `model` (loaded from `source`, identified by `teacher_fingerprint`, see
    `weights_fingerprint`) makes of a corpus split of `n_sequences` rows (`corpus`: the token store's
    attributes; `chat`: the split has a loss mask). Refuses a teacher the corpus was not tokenized for,
    or settings it cannot serve."""
    vocab = output_vocab_size(model)
    require(vocab >= corpus["vocab_size"],
            f"teacher vocab {vocab} < corpus tokenizer vocab {corpus['vocab_size']}: the corpus was not tokenized for this teacher")
    require(cfg.k <= vocab, f"k={cfg.k} is larger than the teacher vocab {vocab}")
    require(cfg.tail_samples == 0 or cfg.k < vocab, f"tail_samples needs a tail: k={cfg.k} covers the whole vocab")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    require(max_positions is None or corpus["seq_len"] <= max_positions,
            f"seq_len {corpus['seq_len']} exceeds the teacher's max_position_embeddings {max_positions}")
    check_model_tokenizer(source, corpus["tokenizer_fingerprint"], "teacher", "corpus",
                          hint=": prepare the corpus with the teacher's tokenizer (prepare_corpus.teacher)",
                          vocab_size=corpus["vocab_size"], eos_id=corpus["eos_id"])
    return CacheSpec(
        teacher_fingerprint=teacher_fingerprint,
        tokenizer_fingerprint=corpus["tokenizer_fingerprint"],
        corpus_fingerprint=corpus["corpus_fingerprint"],
        split=cfg.split,
        vocab_size=vocab,
        k=cfg.k,
        seq_len=corpus["seq_len"],
        n_sequences=n_sequences,
        sequences_per_shard=cfg.sequences_per_shard,
        sequences_per_chunk=cfg.sequences_per_chunk,
        temperatures=tuple(sorted(cfg.temperatures)),
        eos_id=corpus["eos_id"],
        tail_samples=cfg.tail_samples,
        seed=cfg.seed,
        teacher_dtype=str(dtype).removeprefix("torch."),
        device_type=device.type,
        loss_mask=chat,
        masked_targets=cfg.masked_targets if chat else False,
    )
