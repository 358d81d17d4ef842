"""Guarding outputs: nothing already written is lost, overwritten or deleted unless the user asks,
and then only something this tool made, never an input of the same command.

- `check_output` refuses an --out that is (or holds, or lies inside) one of the command's inputs,
  and an existing output that this tool did not make.
- `staged_output` builds a directory aside and swaps it in only when it is complete, so a failure
  (bad setting, crash, full disk) leaves the previous output as it was.
- `PROVENANCE_FILE` holds what is run-specific (when, where, how long): .dvcignore keeps it out of
  the output's DVC hash, so a rerun that writes the same content leaves downstream stages alone.

One writer at a time on an output: `pipeline.io.locks` (held by `staged_output`; the stages that
write in place take it themselves).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import UserError, require
from pipeline.io import storage
from pipeline.io.locks import check_lease, writer_lock
from pipeline.io.storage import Location, display, is_url, locate

PROVENANCE_FILE = "provenance.json"


def _resolved(where: Location) -> Location:
    where = locate(where)
    return where if isinstance(where, str) else Path(os.path.abspath(where.expanduser())).resolve()


def _inside(inner: Location, outer: Location) -> bool:
    if isinstance(inner, str) or isinstance(outer, str):
        return isinstance(inner, str) and isinstance(outer, str) and (inner == outer or inner.startswith(outer + "/"))
    return inner.is_relative_to(outer)


def check_not_an_input(out: Location, inputs: dict[str, Location | None]) -> None:
    """--out must not be an input of the same command, hold one, or lie inside one."""
    target = _resolved(out)
    for flag, where in inputs.items():
        if where is None or (not is_url(str(where)) and not Path(where).exists()):
            continue  # a hub id, or an input that is checked elsewhere
        source = _resolved(str(where))
        require(not (_inside(source, target) or _inside(target, source)),
                f"--out {display(out)} is (or contains, or lies inside) the {flag} input {display(where)}; choose another --out")


def check_output(out: Location, overwrite: bool, made_by_us: Callable[[Location], bool], what: str,
                 inputs: dict[str, Location | None] | None = None) -> None:
    """Refuse an --out that an existing, non-empty output occupies unless --overwrite is given and it
    is something this tool made (a `what`). Touches nothing."""
    check_not_an_input(out, inputs or {})
    if storage.is_vacant(out):
        return
    shown = display(out)
    require(not storage.is_file(out) or overwrite, f"{shown} exists and is a file; choose another --out")
    require(overwrite, f"{shown} exists and is not empty; use --overwrite to replace it or choose another --out")
    require(not storage.is_file(out) and made_by_us(out),
            f"{shown} exists and is not a {what}; --overwrite only replaces a {what} made by this tool (remove it yourself)")


def replace_dir(out: Path) -> None:
    """Delete an output that check_output allowed to be replaced, so the directory is empty."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def staged_output(out: Location) -> Iterator[Path]:
    """Yield a fresh local directory; on success it replaces `out` (call check_output first). The
    writer lock on `out` is held throughout: a second writer is refused, and never removes this
    one's work in progress.

    Locally it lies beside `out` and is swapped in by renames; for a URL it is a temporary
    directory uploaded once complete."""
    out = locate(out)
    with writer_lock(out) as lease:
        yield from _staged(out, None if lease is None else lease.token)


def _staged(out: Location, token: int | None) -> Iterator[Path]:
    if isinstance(out, str):
        with tempfile.TemporaryDirectory(prefix="logit-cache-") as scratch:
            yield Path(scratch)
            check_lease(out, token)  # uploaded only while this writer still holds the lease
            storage.upload(Path(scratch), out)
        return
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():  # left by a crashed run of this tool (the lock is ours): its own scratch space
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


FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # no space left; the user's disk quota exhausted
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's I/O errors carry the errno (safetensors, tokenizers)


def full_disk_error(error: BaseException) -> OSError | None:
    """The OSError saying a disk is full (ENOSPC) or a quota is exhausted (EDQUOT) that is `error` or
    caused it, or None. Libraries wrap it (zarr, fsspec; torch.save into an open file raises "unexpected
    pos" from it), so the chain of causes and contexts is searched; a library written in Rust gives the
    errno only in its message ("... (os error 28)"). Nothing else is a full disk, whatever the free space:
    a CUDA out-of-memory error on a nearly full disk is still an out-of-memory error."""
    pending, seen = [error], set()
    while pending:
        link = pending.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno in FULL_DISK_ERRNOS:
            return link
        rust = None if isinstance(link, OSError) else RUST_OS_ERROR.search(str(link))
        if rust and int(rust.group(1)) in FULL_DISK_ERRNOS:
            return OSError(int(rust.group(1)), os.strerror(int(rust.group(1))))
        pending += [link.__context__, link.__cause__]
    return None


def _free_bytes(where: Location) -> float:
    if is_url(str(where)):
        return math.inf  # an object store does not fill up like a disk
    path = Path(where).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _full_destination(full: OSError, destinations: list[Location]) -> str:
    """Which destination filled up: the one holding the file the error names (or that file, when none
    holds it); when it names no file (a write through an open file does not), the local destination
    with the least free space now."""
    if isinstance(full.filename, (str, bytes, os.PathLike)):
        written = _resolved(os.fsdecode(full.filename))
        holding = [d for d in destinations if _inside(written, _resolved(d))]
        return display(holding[0] if holding else os.fsdecode(full.filename))
    local = [d for d in destinations if not is_url(str(d))]
    return display(min(local, key=_free_bytes)) if local else "the local disk"


@contextlib.contextmanager
def full_disk_named(*destinations: Location) -> Iterator[None]:
    """A write that fails because a disk filled up (see `full_disk_error`) becomes one line naming the
    destination that did; any other error passes through as it is."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        full = full_disk_error(error)
        if full is None:
            raise
        named = _full_destination(full, [d for d in destinations if d is not None])
        quota = " (disk quota exceeded)" if full.errno == errno.EDQUOT else ""
        raise UserError(f"no space left on {named}{quota} (while writing: {type(error).__name__}); free space and "
                        "rerun: it resumes from the last checkpoint, and what is complete is kept") from None


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
