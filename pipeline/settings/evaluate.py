"""evaluate settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import require
from pipeline.settings import DEVICES, setting


@dataclass(frozen=True)
class EvalConfig:
    max_sequences: int = setting(192, "validation rows evaluated; 0 = all")
    batch_size: int = setting(8, "sequences per forward")
    device: Literal[DEVICES] = setting("auto", "where the models run (auto: a GPU when there is one)")

    def __post_init__(self) -> None:
        require(self.max_sequences >= 0, "max_sequences must be >= 0 (0 = all)")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.device in DEVICES, f"device must be auto|cpu|cuda, got {self.device!r}")
