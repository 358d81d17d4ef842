"""train-student settings (shared by every variant; each `students:` entry overrides some)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import require
from pipeline.settings import DEVICES, setting

LOSS_KINDS = ("forward_kl", "reverse_kl", "jsd")
PARALLELISMS = ("ddp", "fsdp")
# settings a resumed run may change: how it runs, not what it learns (the global batch is checked instead)
RUN_ONLY_SETTINGS = frozenset({"batch_size", "grad_accum", "num_workers", "checkpoint_every", "device", "processes",
                               "parallelism", "eval_every", "eval_sequences"})


@dataclass(frozen=True)
class StudentConfig:
    init_from: str | None = setting(None, "HF dir or hub id to start from; else a Llama built from the sizes below")
    d_model: int = setting(128, "hidden size of a student built here (a Llama)")
    n_layers: int = setting(4, "decoder layers")
    n_heads: int = setting(4, "attention heads")
    d_ff: int = setting(344, "SwiGLU hidden size")
    kd_weight: float = setting(0.8, "loss = kd_weight * KD + (1 - kd_weight) * hard-label CE; 0 = baseline")
    temperature: float = setting(1.0, "applied to teacher and student; KD scaled by T^2")
    loss: Literal[LOSS_KINDS] = setting("forward_kl", "the divergence to the teacher's targets")
    use_tail_samples: bool = setting(True, "use the cache's sampled tail ids when it has them (forward KL at T = 1)")
    max_steps: int = setting(100, "optimizer steps")
    batch_size: int = setting(16, "sequences per micro-batch of one process")
    grad_accum: int = setting(1, "micro-batches per optimizer step: global batch = processes x batch_size x "
                                 "grad_accum")
    lr: float = setting(2e-3, "peak learning rate (linear warmup, then cosine decay)")
    warmup_steps: int = setting(20, "steps of linear warmup")
    weight_decay: float = setting(0.1, "AdamW weight decay (on matrices only)")
    grad_clip: float = setting(1.0, "the gradient norm is clipped to this")
    shuffle_window: int = setting(1024, "sequences shuffled together (whole chunks, in a seeded order)")
    num_workers: int = setting(1, "DataLoader worker processes decoding the cache")
    checkpoint_every: int = setting(50, "steps between resumable checkpoints")
    eval_every: int = setting(25, "steps between held-out checks on --eval-cache (validation loss, KL to its targets)")
    eval_sequences: int = setting(64, "validation sequences per held-out check (the first ones of --eval-cache)")
    processes: int = setting(1, "processes on this machine: more than 1 and the command starts them itself (as "
                                "torchrun --standalone --nproc-per-node would); under torchrun, torchrun decides")
    parallelism: Literal[PARALLELISMS] = setting("ddp", "under torchrun: ddp (a copy per process) or fsdp (FSDP2: "
                                                        "parameters sharded)")
    seed: int = setting(0, "seeds a student built here and the order of the sequences")
    device: Literal[DEVICES] = setting("auto", "where it trains (auto: a GPU when there is one)")
    online_teacher: str | None = setting(None, "reference: run this teacher in the loop, full-vocabulary targets")

    def __post_init__(self) -> None:
        require(0.0 <= self.kd_weight <= 1.0, f"kd_weight must be in [0, 1], got {self.kd_weight}")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(self.loss in LOSS_KINDS, f"loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss!r}")
        require(self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads")
        for name in ("d_model", "n_layers", "n_heads", "d_ff", "max_steps", "batch_size", "grad_accum",
                     "shuffle_window", "checkpoint_every", "eval_every", "eval_sequences", "processes"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.lr > 0 and self.grad_clip > 0, "lr and grad_clip must be > 0")
        require(self.warmup_steps >= 0 and self.weight_decay >= 0, "warmup_steps and weight_decay must be >= 0")
        require(self.num_workers >= 0, "num_workers must be >= 0")
        # numpy's and torch's generators take seeds in [0, 2^63) (and the tail draws hash 64 bits)
        require(0 <= self.seed < 2**63, f"seed must be >= 0 and < 2^63, got {self.seed}")
        require(self.parallelism in PARALLELISMS,
                f"parallelism must be one of {', '.join(PARALLELISMS)}, got {self.parallelism!r}")
        require(self.device in DEVICES, f"device must be auto|cpu|cuda, got {self.device!r}")
