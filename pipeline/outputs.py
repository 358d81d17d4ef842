"""Guarding outputs: nothing already written is lost, overwritten or deleted unless the user asks,
and then only something this tool made, never an input of the same command.

- `check_output` refuses an --out that is (or holds, or lies inside) one of the command's inputs,
  and an existing output that this tool did not make.
- `staged_output` builds a directory aside and swaps it in only when it is complete, so a failure
  (bad setting, crash, full disk) leaves the previous output as it was.
- `writer_lock` lets one writer at a time work on an output; a second one is refused at once.
- `PROVENANCE_FILE` holds what is run-specific (when, where, how long): .dvcignore keeps it out of
  the output's DVC hash, so a rerun that writes the same content leaves downstream stages alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from pipeline.errors import UserError, require

PROVENANCE_FILE = "provenance.json"


def _resolved(path: Path | str) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def check_not_an_input(out: Path, inputs: dict[str, Path | str | None]) -> None:
    """--out must not be an input of the same command, hold one, or lie inside one."""
    target = _resolved(out)
    for flag, path in inputs.items():
        if path is None or not Path(path).exists():
            continue  # a hub id, or an input that is checked elsewhere
        source = _resolved(path)
        clash = target == source or source.is_relative_to(target) or target.is_relative_to(source)
        require(not clash, f"--out {out} is (or contains, or lies inside) the {flag} input {path}; choose another --out")


def check_output(out: Path, overwrite: bool, made_by_us: Callable[[Path], bool], what: str,
                 inputs: dict[str, Path | str | None] | None = None) -> None:
    """Refuse an --out that an existing, non-empty output occupies unless --overwrite is given and it
    is something this tool made (a `what`). Touches nothing."""
    check_not_an_input(out, inputs or {})
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    require(not out.is_file() or overwrite, f"{out} exists and is a file; choose another --out")
    require(overwrite, f"{out} exists and is not empty; use --overwrite to replace it or choose another --out")
    require(out.is_dir() and made_by_us(out),
            f"{out} exists and is not a {what}; --overwrite only replaces a {what} made by this tool (remove it yourself)")


def replace_dir(out: Path) -> None:
    """Delete an output that check_output allowed to be replaced, so the directory is empty."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a fresh directory beside `out`; on success it replaces `out` (call check_output first)."""
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():  # left by a crashed run of this tool: its own scratch space
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _lock_holder(handle: IO[str], wait_s: float = 2.0) -> str:
    """Who holds the lock, as they wrote it ("pid N"); the holder writes it just after locking, so wait briefly."""
    deadline = time.monotonic() + wait_s
    while True:
        handle.seek(0)
        holder = handle.read().strip()
        if holder or time.monotonic() > deadline:
            return holder or "another process"
        time.sleep(0.05)


@contextlib.contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """One writer at a time on `out`: an exclusive lock on a file beside it (released on exit or death)."""
    lock_path = out.parent / f".{out.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            raise UserError(f"{out} is being written by {holder}; wait for it to finish (or stop it) and rerun") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


def _finite(payload: Any) -> Any:
    """JSON has no NaN/inf: they become null (a metrics reader would choke on a bare NaN)."""
    if isinstance(payload, float) and not math.isfinite(payload):
        return None
    if isinstance(payload, dict):
        return {k: _finite(v) for k, v in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [_finite(v) for v in payload]
    return payload


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
