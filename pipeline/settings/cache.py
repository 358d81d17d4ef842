"""cache-logits settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.errors import require
from pipeline.settings import DEVICES, setting

DTYPES = ("auto", "float32", "bfloat16", "float16")
SPLITS = ("train", "validation")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's ways to split a model over GPUs


@dataclass(frozen=True)
class CacheConfig:
    k: int = setting(64, "top-k entries kept per position")
    batch_size: int = setting(32, "sequences per teacher forward")
    sequences_per_chunk: int = setting(16, "the unit a reader decodes")
    sequences_per_shard: int = setting(256, "the unit written, resumed and owned by one writer (one file)")
    temperatures: tuple[float, ...] = setting((1.0,), "temperatures whose exact normaliser and tail are stored "
                                                      "(repeat the option)")
    tail_samples: int = setting(8, "ids per position drawn from the teacher's tail: teaches its shape; 0 = none")
    seed: int = setting(0, "of the tail draws: each position's are a function of (seed, sequence, position) only")
    max_sequences: int | None = setting(None, "capture only the split's first N sequences (unset: all); raising it "
                                              "later keeps the shards already written")
    split: Literal[SPLITS] = setting("train", "the corpus split to capture (validation: for train-student "
                                              "--eval-cache)")
    device: Literal[DEVICES] = setting("auto", "where the teacher runs (auto: a GPU when there is one)")
    dtype: Literal[DTYPES] = setting("auto", "the teacher's compute dtype (auto: bf16 on a GPU, fp32 on the CPU)")
    device_map: Literal[DEVICE_MAPS] | None = setting(None, "spread one teacher over every GPU of the node "
                                                            "(accelerate); one process per node")
    processes: int = setting(1, "processes on this machine: more than 1 and the command starts them itself (as "
                                "torchrun --standalone --nproc-per-node would); under torchrun, torchrun decides")
    masked_targets: bool = setting(False, "chat corpora: also store targets where the loss mask excludes them "
                                          "(prompts)")

    def __post_init__(self) -> None:
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.sequences_per_chunk >= 1, f"sequences_per_chunk must be >= 1, got {self.sequences_per_chunk}")
        require(self.sequences_per_shard >= 1, f"sequences_per_shard must be >= 1, got {self.sequences_per_shard}")
        require(self.sequences_per_shard % self.sequences_per_chunk == 0,
                "sequences_per_shard must be a multiple of sequences_per_chunk")
        require(all(t > 0 for t in self.temperatures), "temperatures must be > 0")
        require(1.0 in self.temperatures, "temperatures must include 1.0")
        require(len(set(self.temperatures)) == len(self.temperatures), "temperatures must not repeat")
        require(self.tail_samples >= 0, f"tail_samples must be >= 0, got {self.tail_samples}")
        # numpy's and torch's generators take seeds in [0, 2^63) (and the tail draws hash 64 bits)
        require(0 <= self.seed < 2**63, f"seed must be >= 0 and < 2^63, got {self.seed}")
        require(self.max_sequences is None or self.max_sequences >= 1,
                f"max_sequences must be >= 1 (or unset: all), got {self.max_sequences}")
        require(self.split in SPLITS, f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        require(self.device in DEVICES, f"device must be auto|cpu|cuda, got {self.device!r}")
        require(self.device_map is None or self.device_map in DEVICE_MAPS,
                f"device_map must be one of {'|'.join(DEVICE_MAPS)} (or unset), got {self.device_map!r}")
        require(self.processes >= 1, f"processes must be >= 1, got {self.processes}")
        require(self.dtype in DTYPES, f"dtype must be one of {'|'.join(DTYPES)}, got {self.dtype!r}")
