"""Building the one typed, frozen config object of a stage.

Settings flow: code defaults (the dataclass fields in pipeline/settings/) <- the stage's section of
params.yaml <- CLI flags. Unknown sections, unknown keys and ill-typed values are rejected with a
message that names them. Each stage's config class has a torch-free module of its own
(pipeline/settings/), so `--help` can show the defaults and dvc.yaml can depend on exactly the
settings a stage reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from pipeline.errors import UserError, require

C = TypeVar("C")

DEFAULT_PARAMS = Path("params.yaml")
LAUNCHED_ENV = "LOGIT_CACHE_LAUNCHED"  # set in the processes a command starts itself (`processes` > 1)
SECTIONS = ("generate", "prepare_corpus", "train_teacher", "cache_logits", "train_student", "students", "evaluate")


def read_params(path: Path | None) -> dict[str, Any]:
    """The whole params file as a dict; {} when the default file is absent."""
    if path is None:
        path = DEFAULT_PARAMS
        if not path.exists():
            return {}
    require(path.is_file(), f"params file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text("utf-8")) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}".splitlines()[0]) from None
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path} is not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    require(isinstance(params, dict), f"{path}: expected a mapping of sections at the top level")
    for name, body in params.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(str(name), SECTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(SECTIONS)})"
            raise UserError(f"{path}: unknown section {name!r}{hint}")
        require(body is None or isinstance(body, dict), f"{path}: section {name!r} must be a mapping, got {body!r}")
    for variant, body in (params.get("students") or {}).items():
        require(isinstance(variant, str), f"{path}: student variant names must be strings, got {variant!r}")
        require(body is None or isinstance(body, dict), f"{path}: students.{variant} must be a mapping, got {body!r}")
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
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        require(ok, f"{where}: expected a finite number, got {value!r}")
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
            if not isinstance(key, str) or key not in names:
                raise UserError(f"{source}: unknown key {key!r} (known: {', '.join(names)})")
            if value is None and source.startswith("--"):
                continue
            values[key] = _coerce(value, hints[key], f"{source}.{key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise UserError(f"{cls.__name__}: {error}") from None


def section(params: Mapping[str, Any], name: str, file: str = "params.yaml") -> tuple[str, Mapping[str, Any] | None]:
    return (f"{file} [{name}]", params.get(name))


def variant_layer(params: Mapping[str, Any], variant: str, file: str = "params.yaml") -> tuple[str, Mapping[str, Any]]:
    """A student variant's settings (`students: NAME:` in params), laid over train_student's."""
    students = params.get("students") or {}
    require(variant in students, f"no student variant {variant!r} in {file} (have: {', '.join(students) or 'none'})")
    return (f"{file} [students.{variant}]", students[variant])


def stage_config(cls: type[C], name: str, params_path: Path | None, flags: Mapping[str, Any],
                 variant: str | None = None) -> C:
    """A stage's settings as it runs: the code's defaults, then the stage's section of the params file
    (and a student variant's), then the flags given on the command line."""
    params = read_params(params_path)
    file = str(params_path or DEFAULT_PARAMS)
    layers = [section(params, name, file)]
    if variant is not None:
        layers.append(variant_layer(params, variant, file))
    return build_config(cls, *layers, cli_layer(**flags))


def cli_layer(**flags: Any) -> tuple[str, dict[str, Any]]:
    return ("--flags", {k: v for k, v in flags.items() if v is not None})


def as_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
