"""generate settings: the teacher answers prompts (sequence-level distillation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import require
from pipeline.settings import DEVICES, setting
from pipeline.settings.cache import DTYPES


@dataclass(frozen=True)
class GenerateConfig:
    prompts: str | None = setting(None, "the prompts: JSONL, parquet or a `datasets` directory (files, a directory, a "
                                        "glob, a URL); null in params.yaml: the DVC stage is off and prepare-corpus "
                                        "prepares prepare_corpus.source")
    teacher: str | None = setting(None, "the answerer: an HF dir or hub id (in dvc.yaml a pretrained one: the "
                                        "pipeline's own teacher is trained on the corpus these answers make)")
    max_new_tokens: int = setting(256, "tokens an answer may have; one that reaches it without ending its turn is "
                                       "truncated")
    temperature: float = setting(1.0, "sampling temperature (0: greedy, the most likely token each time)")
    top_p: float = setting(1.0, "nucleus sampling: draw from the fewest tokens that hold this much probability")
    top_k: int = setting(0, "draw from the k most likely tokens only (0: no cut; the model's own "
                            "generation_config.json is not applied)")
    n: int = setting(1, "answers per prompt")
    stop: tuple[str, ...] = setting((), "text that ends an answer as its end of turn does (cut off, not kept), e.g. a "
                                        "blank line")
    seed: int = setting(0, "a shard's answers are a function of the seed, the shard and the settings (the same on a "
                           "rerun)")
    batch_size: int = setting(8, "prompts per teacher call")
    prompts_per_shard: int = setting(64, "the unit written and resumed: one JSONL file of answers")
    keep_truncated: bool = setting(True, 'keep answers that reached max_new_tokens without ending (marked '
                                         '"truncated")')
    text_field: str = setting("prompt", "the field (JSONL) or column (parquet, datasets) holding a prompt string (or "
                                        "give `messages`)")
    chat_template: str | None = setting(None, "a Jinja file to render the prompts with, instead of the teacher's "
                                              "template")
    processes: int = setting(1, "processes on this machine (more than 1: the command starts them; they claim shards); "
                                "under torchrun, torchrun decides")
    device: Literal[DEVICES] = setting("auto", "where the teacher runs (auto: a GPU when there is one)")
    dtype: Literal[DTYPES] = setting("auto", "the teacher's compute dtype (auto: bf16 on a GPU, fp32 on the CPU)")

    # what the answers' identity leaves out: how the run is spread (every shard's answers are a function of
    # the shard alone), and the prompts' and teacher's names (the identity holds their fingerprints)
    RUN_ONLY_SETTINGS = ("prompts", "teacher", "device", "processes")

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(self.temperature >= 0, f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"top_k must be >= 0 (0: no cut), got {self.top_k}")
        # numpy's and torch's generators take seeds in [0, 2^63) (and the tail draws hash 64 bits)
        require(0 <= self.seed < 2**63, f"seed must be >= 0 and < 2^63, got {self.seed}")
        for name in ("n", "batch_size", "prompts_per_shard", "processes"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(all(self.stop), "stop: an empty string would end every answer before it starts")
        require(self.device in DEVICES, f"device must be auto|cpu|cuda, got {self.device!r}")
        require(self.dtype in DTYPES, f"dtype must be one of {'|'.join(DTYPES)}, got {self.dtype!r}")
