"""One writer at a time on an output: a second one is refused at once, naming the holder.

On local disk an exclusive lock on a file beside the output (released on exit or death); in an
object store a renewed lease object beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from typing import IO, Iterator

from pipeline.errors import UserError, require
from pipeline.io import storage
from pipeline.io.storage import Location, display, locate

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
