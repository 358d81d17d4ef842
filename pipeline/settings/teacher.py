"""train-teacher settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import require
from pipeline.settings import DEVICES, setting


@dataclass(frozen=True)
class TeacherConfig:
    pretrained: str | None = setting(None, "HF dir or hub id: train nothing, use this teacher")
    d_model: int = setting(256, "hidden size of the default teacher (a Llama)")
    n_layers: int = setting(4, "decoder layers")
    n_heads: int = setting(4, "attention heads")
    d_ff: int = setting(688, "SwiGLU hidden size, ~8/3 d_model")
    max_steps: int = setting(220, "4-7 min on a 2-core CPU; the step count, not the clock, makes runs reproducible")
    max_minutes: float = setting(15.0, "safety cap only (220 steps take 4-7 min on 2 CPU cores): the step count "
                                       "decides")
    batch_size: int = setting(16, "sequences per step")
    lr: float = setting(3e-3, "peak learning rate (linear warmup, then cosine decay)")
    warmup_steps: int = setting(30, "steps of linear warmup")
    weight_decay: float = setting(0.1, "AdamW weight decay (on matrices only)")
    grad_clip: float = setting(1.0, "the gradient norm is clipped to this")
    seed: int = setting(0, "seeds the weights and the batches")
    device: Literal[DEVICES] = setting("auto", "where it trains (auto: a GPU when there is one)")

    def __post_init__(self) -> None:
        require(self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads")
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_steps", "batch_size"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.max_minutes > 0, f"max_minutes must be > 0, got {self.max_minutes}")
        require(self.lr > 0 and self.grad_clip > 0, "lr and grad_clip must be > 0")
        require(self.warmup_steps >= 0 and self.weight_decay >= 0, "warmup_steps and weight_decay must be >= 0")
        require(self.device in DEVICES, f"device must be auto|cpu|cuda, got {self.device!r}")
