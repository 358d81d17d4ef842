"""The student model: from --init-from, or a Llama of the configured size; checked against the cache."""

from __future__ import annotations

import torch

from pipeline.corpus.tokenizer import check_model_tokenizer
from pipeline.errors import require
from pipeline.models.load import build_llama, load_causal_lm, output_vocab_size
from pipeline.settings.student import StudentConfig


def build_student(cfg: StudentConfig, attrs: dict, device: torch.device):
    """The student for a cache with these attributes: its vocabulary must be the cache's and its
    positions must hold the cache's rows. Seeded, so every process builds the same weights."""
    if cfg.init_from:
        model = load_causal_lm(cfg.init_from, device, role="init_from").float()
        check_model_tokenizer(cfg.init_from, attrs["tokenizer_fingerprint"], "student", "cache",
                              vocab_size=attrs["vocab_size"], eos_id=attrs["eos_id"])
    else:
        torch.manual_seed(cfg.seed)
        model = build_llama(attrs["vocab_size"], cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, attrs["seq_len"],
                            eos_id=attrs["eos_id"]).to(device)
    vocab = output_vocab_size(model)
    require(vocab == attrs["vocab_size"], f"student vocab {vocab} != cache vocab {attrs['vocab_size']}")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    require(max_positions is None or attrs["seq_len"] <= max_positions,
            f"cache seq_len {attrs['seq_len']} exceeds the student's max_position_embeddings {max_positions}")
    return model
