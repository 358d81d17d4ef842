"""Guarding outputs: nothing already written is lost, overwritten or deleted unless the user asks,
and then only something this tool made, never an input of the same command.

- `check_output` refuses an --out that is (or holds, or lies inside) one of the command's inputs,
  and an existing output that this tool did not make.
- `staged_output` builds a directory aside and swaps it in only when it is complete, so a failure
  (bad setting, crash, full disk) leaves the previous output as it was.
- `writer_lock` lets one writer at a time work on an output; a second one is refused at once
  (a file lock on local disk, a renewed lease object in an object store).
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
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from pipeline import storage
from pipeline.errors import UserError, require
from pipeline.storage import Location, display, is_url, locate

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
    """Yield a fresh local directory; on success it replaces `out` (call check_output first).

    Locally it lies beside `out` and is swapped in by renames; for a URL it is a temporary
    directory uploaded once complete."""
    out = locate(out)
    if isinstance(out, str):
        with tempfile.TemporaryDirectory(prefix="logit-cache-") as scratch:
            yield Path(scratch)
            storage.upload(Path(scratch), out)
        return
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


def _refuse(out: Location, holder: str) -> UserError:
    return UserError(f"{display(out)} is being written by {holder}; wait for it to finish (or stop it) and rerun")


@contextlib.contextmanager
def writer_lock(out: Location) -> Iterator[None]:
    """One writer at a time on `out`, refused at once: an exclusive lock on a file beside it (released
    on exit or death), or for a URL a lease object beside it (see `_object_lock`)."""
    out = locate(out)
    if isinstance(out, str):
        with _object_lock(out):
            yield
        return
    lock_path = out.parent / f".{out.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refuse(out, _lock_holder(handle)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


LEASE_RENEW_S = 30.0  # how often a holder rewrites its lease object
LEASE_EXPIRY_S = 300.0  # a lease not renewed for this long belongs to a dead writer


@contextlib.contextmanager
def _object_lock(out: str) -> Iterator[None]:
    """A lease in an object store: `.NAME.lock` beside `out`, created with an atomic If-None-Match PUT
    and renewed by a thread while held. A holder killed without releasing it leaves a lease that
    expires after LEASE_EXPIRY_S (or at once when it was a dead process on this host)."""
    parent, name = storage.parent_and_name(out)
    lock = storage.child(parent, f".{name}.lock")
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    body = json.dumps({"holder": holder, "host": socket.gethostname(), "pid": os.getpid()}).encode()
    if not storage.create_exclusive(lock, body):
        if not _lease_is_dead(lock):
            try:
                shown = json.loads(storage.read_text(lock)).get("holder", "another process")
            except (OSError, ValueError):
                shown = "another process"
            raise _refuse(out, shown)
        storage.remove(lock)
        require(storage.create_exclusive(lock, body), f"{display(out)}: another writer took the lock just now; rerun later")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_RENEW_S):
            with contextlib.suppress(Exception):  # a missed renewal only shortens the lease
                storage.write_bytes(lock, body)

    renewer = threading.Thread(target=renew, name="lease-renewal", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(Exception):
            storage.remove(lock)


def _lease_is_dead(lock: str) -> bool:
    age = storage.modified_age_s(lock)
    if age is None:
        return True
    try:
        record = json.loads(storage.read_text(lock))
    except (OSError, ValueError):
        record = {}
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return age > LEASE_EXPIRY_S


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
