"""Guarding outputs: nothing already written is lost, overwritten or deleted unless the user asks,
and then only something this tool made, never an input of the same command. Every output of every
command goes through here (a cache, a corpus, a teacher, a student and its --checkpoints, generate's
answers, evaluate's reports, a --manifest).

- `check_not_an_input` refuses an output that is (or holds, or lies inside) one of the command's inputs;
  `check_ours` an existing one that this tool did not make (whatever the flags: it is never written
  into); `check_output` both, and an output of ours that only --overwrite may replace.
- `staged_output` takes the writer lock, checks, builds a directory aside and swaps it in only when
  it is complete, so a failure (bad setting, crash, full disk) leaves the previous output as it was.
- `full_disk_named` turns a full disk into one line naming the destination, said once per job.
- `PROVENANCE_FILE` holds what is run-specific (when, where, how long): .dvcignore keeps it out of
  the output's DVC hash, so a rerun that writes the same content leaves downstream stages alone.

One writer at a time on an output, however it is spelled: `pipeline.io.locks` (held by
`staged_output`; the stages that write in place take it themselves).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import SaidByAnother, UserError, require
from pipeline.io import storage
from pipeline.io.locks import check_lease, output_location, writer_lock
from pipeline.io.storage import Location, display, is_url, locate

PROVENANCE_FILE = "provenance.json"


def _resolved(where: Location) -> Location:
    """An input or output as compared: a URL as located, a path absolute with its links resolved."""
    where = locate(where)
    return where if isinstance(where, str) else where.expanduser().absolute().resolve()


def _inside(inner: Location, outer: Location) -> bool:
    if isinstance(inner, str) or isinstance(outer, str):
        return isinstance(inner, str) and isinstance(outer, str) and (inner == outer or inner.startswith(outer + "/"))
    return inner.is_relative_to(outer)


def check_not_an_input(out: Location, inputs: dict[str, Location | None], flag: str = "--out") -> None:
    """The output `flag` names must not be an input of the same command, hold one, or lie inside one;
    nor be a location that cannot hold an output (`locks.output_location`)."""
    target = output_location(out)
    for name, where in inputs.items():
        if where is None or (not is_url(str(where)) and not Path(where).exists()):
            continue  # a hub id, or an input that is checked elsewhere
        source = _resolved(str(where))
        require(not (_inside(source, target) or _inside(target, source)),
                f"{flag} {display(out)} is (or contains, or lies inside) the {name} input {display(where)}; "
                f"choose another {flag}")


def check_ours(out: Location, made_by_us: Callable[[Location], bool], what: str, flag: str = "--out",
               overwrite: bool = True) -> None:
    """Refuse an existing, non-empty output that is not a `what` this tool made (`made_by_us`), or a file
    where a directory goes: this tool never writes into it, whatever the flags (`overwrite`: whether
    this command was given --overwrite, for the words only). Touches nothing."""
    if storage.is_vacant(out):
        return
    shown = display(out)
    require(not storage.is_file(out), f"{flag} {shown} exists and is a file; choose another {flag}")
    require(made_by_us(out), f"{flag} {shown} exists and is not empty, and is not a {what} made by this tool: choose "
                             f"another {flag} (this tool never writes into what it did not make"
                             f"{'' if overwrite else ', --overwrite included'})")


def check_output(out: Location, overwrite: bool, made_by_us: Callable[[Location], bool], what: str,
                 inputs: dict[str, Location | None] | None = None, flag: str = "--out") -> None:
    """Refuse an output that is an input (`check_not_an_input`) or not ours (`check_ours`), and one of ours
    that is not empty unless --overwrite is given (`overwrite`). Touches nothing; call it with the
    writer lock held."""
    check_not_an_input(out, inputs or {}, flag)
    check_ours(out, made_by_us, what, flag, overwrite)
    require(overwrite or storage.is_vacant(out),
            f"{flag} {display(out)} exists and is not empty; use --overwrite to replace it or choose another {flag}")


def replace_dir(out: Path) -> None:
    """Delete an output that check_output allowed to be replaced, so the directory is empty."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def staged_output(out: Location, overwrite: bool, made_by_us: Callable[[Location], bool], what: str,
                  inputs: dict[str, Location | None] | None = None, flag: str = "--out") -> Iterator[Path]:
    """Yield a fresh local directory; on success it replaces `out`. First `out` is checked not to be an
    input, then its writer lock is taken (held throughout: a second writer is refused, and never removes
    this one's work in progress), then what is there is checked (`check_output`).

    Locally it lies beside `out` (beside what a symbolic link `out` points to) and is swapped in by
    renames; for a URL it is a temporary directory uploaded once complete."""
    check_not_an_input(out, inputs or {}, flag)
    with writer_lock(out) as lease:
        check_output(out, overwrite, made_by_us, what, None, flag)
        yield from _staged(output_location(out), None if lease is None else lease.token)


def staging_dir(out: Path) -> Path:
    """Where `staged_output` builds a local output before swapping it in."""
    return out.parent / f".{out.name}.partial"


def _staged(out: Location, token: int | None) -> Iterator[Path]:
    if isinstance(out, str):
        with tempfile.TemporaryDirectory(prefix="logit-cache-") as scratch:
            yield Path(scratch)
            check_lease(out, token)  # uploaded only while this writer still holds the lease
            storage.upload(Path(scratch), out)
        return
    staging = staging_dir(out)
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


def _holds(destination: Location, written: Location) -> bool:
    """Whether the file `written` is part of `destination`: in it, in its staging directory
    (`.NAME.partial`), or a temporary file of it beside it (`NAME.tmp`, `.NAME.*`)."""
    place = _resolved(destination)
    if isinstance(place, str) or isinstance(written, str):
        return _inside(written, place)
    beside = written.parent == place.parent and (written.name.startswith(f"{place.name}.")
                                                 or written.name.startswith(f".{place.name}."))
    return _inside(written, place) or _inside(written, staging_dir(place)) or beside


def _full_destination(full: OSError, destinations: list[Location]) -> str:
    """Which destination filled up: the one holding the file the error names (or that file, when none
    holds it); when it names no file (a write through an open file does not), the local destination
    with the least free space now."""
    if isinstance(full.filename, (str, bytes, os.PathLike)):
        written = _resolved(os.fsdecode(full.filename))
        holding = [d for d in destinations if _holds(d, written)]
        return display(holding[0] if holding else os.fsdecode(full.filename))
    local = [d for d in destinations if not is_url(str(d))]
    return display(min(local, key=_free_bytes)) if local else "the local disk"


FULL_DISK_SAID = "logit-cache/full-disk-said"  # the job's key: how many of its processes found the disk full


def _first_in_job_to_say() -> bool:
    """Whether this process is the first of its job to report a full disk (alone: yes). Every process of
    a job writing to one disk finds it full, at about the same time; the first to count itself in the
    job's key-value store (torch.distributed's, when this process joined one) says so, the others keep
    quiet. Not "rank 0 says it": rank 0 may not be writing, and is stopped once another process exits.
    When the store cannot be asked, say it: twice is better than never."""
    dist = sys.modules.get("torch.distributed")  # never imported here: only a process that joined a job has one
    try:
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            return True
        return int(dist.distributed_c10d._get_default_store().add(FULL_DISK_SAID, 1)) == 1
    except Exception:
        return True


RESUMES = "what is complete is kept, and the same command resumes from it"


@contextlib.contextmanager
def full_disk_named(*destinations: Location, rerun: str = RESUMES) -> Iterator[None]:
    """A write that fails because a disk filled up (see `full_disk_error`) becomes one line naming the
    destination that did (in full, as given) and what a rerun does (`rerun`), said by one process of a
    job (`_first_in_job_to_say`: the others end quietly, with the same status); any other error passes
    through as it is."""
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
        line = f"no space left on {named}{quota} (while writing: {type(error).__name__}); free space and rerun: {rerun}"
        raise (UserError(line) if _first_in_job_to_say() else SaidByAnother(line)) from None


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
    """`payload` as JSON at `path`, whole or not at all: written aside, then renamed over it (a failure,
    a full disk say, leaves the previous file as it was and no temporary file behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(_finite(payload), indent=2, sort_keys=False, allow_nan=False) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
