"""Guarding output paths: nothing already written is overwritten unless the user asks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import require


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Make `path` an empty directory, refusing to clobber a non-empty one without --overwrite."""
    if path.exists() and overwrite:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    require(not path.is_file(), f"{path} exists and is a file; choose another --out")
    require(not (path.is_dir() and any(path.iterdir())),
            f"{path} exists and is not empty; use --overwrite to replace it or choose another --out")
    path.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
