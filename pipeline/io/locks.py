"""One writer at a time on an output: a second one is refused at once, naming the holder.

On local disk an exclusive lock on a file beside the output (released on exit or death); in an
object store a fenced lease object beside it: taken, renewed and released with conditional writes,
aged in the store's own clock, and checked before every shard commit (its fencing token), so a
writer that lost it stops before it writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
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
def writer_lock(out: Location) -> Iterator[Lease | None]:
    """One writer at a time on `out`, refused at once: an exclusive lock on a file beside it (released
    on exit or death; yields None), or for a URL a fenced lease object beside it (yields the Lease)."""
    out = locate(out)
    if isinstance(out, str):
        with _object_lock(out) as lease:
            yield lease
        return
    lock_path = out.parent / f".{out.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = _lock_file(out, lock_path)
    try:
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still locked: no lock file outlives its writer
        handle.close()


def _lock_file(out: Path, lock_path: Path) -> IO[str]:
    """The lock file, opened and exclusively locked by this process, or a refusal naming its holder.

    A holder removes the file before it unlocks it, so a writer that opened the file just before it
    was removed holds a lock nobody else can see: it checks that the path still names the file it
    locked, and otherwise takes the new one."""
    while True:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            handle.close()
            raise _refuse(out, holder) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                handle.seek(0)
                handle.truncate()
                return handle
        handle.close()


def writer_holding(out: Location) -> str | None:
    """Who is writing `out` now ("pid N", "pid N on HOST"), or None: asked without taking the lock and
    without creating anything."""
    out = locate(out)
    if isinstance(out, str):
        parent, name = storage.parent_and_name(out)
        found = storage.read_versioned(storage.child(parent, f".{name}.lock"))
        if found is None:
            return None
        record = _parse(found[0])
        return None if record.get("released") or _lease_is_dead(record, found[2]) else record.get("holder", "another process")
    lock_path = out.parent / f".{out.name}.lock"
    try:
        handle = open(lock_path, "r")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_holder(handle)
        return None


# how often a holder renews its lease, and how long an unrenewed one lasts (its holder is then dead or
# paused, and another writer may take over); the environment may shorten both (tests)
LEASE_RENEW_S = float(os.environ.get("LOGIT_CACHE_LEASE_RENEW_S", 30))
LEASE_EXPIRY_S = float(os.environ.get("LOGIT_CACHE_LEASE_EXPIRY_S", 300))


@dataclass
class Lease:
    """A writer's lease on an output in an object store: its lock object, its fencing token (one more
    than the previous holder's) and the object's version it last wrote."""

    lock: str
    token: int
    version: str
    lost: threading.Event = field(default_factory=threading.Event)


def _lease_record(token: int, released: bool = False) -> bytes:
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    return json.dumps({"holder": holder, "host": socket.gethostname(), "pid": os.getpid(), "token": token,
                       "released": released}).encode()


@contextlib.contextmanager
def _object_lock(out: str) -> Iterator[Lease]:
    """A lease in an object store: `.NAME.lock` beside `out`. Taken with a conditional write (If-None-Match
    when there is none; If-Match on the version read when the one there is released or dead), so of two
    writers that both find it free one wins; renewed by a thread with If-Match on the version it last
    wrote, so a holder that was paused past LEASE_EXPIRY_S and taken over fails to renew instead of
    overwriting the new holder's; released with If-Match too (marked released, keeping its token, so
    tokens grow across holders). Every shard commit checks the token first (`check_lease`)."""
    parent, name = storage.parent_and_name(out)
    lock = storage.child(parent, f".{name}.lock")
    found = storage.read_versioned(lock)
    token, version = 1, None
    if found is not None:
        record = _parse(found[0])
        if not (record.get("released") or _lease_is_dead(record, found[2])):
            raise _refuse(out, record.get("holder", "another process"))
        token, version = int(record.get("token", 0)) + 1, found[1]
    written = storage.write_if(lock, _lease_record(token), version)
    require(written is not None, f"{display(out)}: another writer took the lock just now; rerun later")
    lease = Lease(lock, token, written)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_RENEW_S):
            try:
                renewed = storage.write_if(lock, _lease_record(token), lease.version)
            except Exception:  # a missed renewal only shortens the lease
                continue
            if renewed is None:  # taken over while this holder was paused: never write again
                lease.lost.set()
                return
            lease.version = renewed

    renewer = threading.Thread(target=renew, name="lease-renewal", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        if not lease.lost.is_set():
            with contextlib.suppress(Exception):
                storage.write_if(lock, _lease_record(token, released=True), lease.version)


def check_lease(out: Location, token: int | None) -> None:
    """Refuse to write into `out` unless the lease beside it is still the one with `token` (the fencing
    check before every shard commit: a writer whose lease another took over stops before it writes).
    None (a local output, held by a file lock the kernel releases only with its holder): nothing to check."""
    if token is None:
        return
    parent, name = storage.parent_and_name(out)
    found = storage.read_versioned(storage.child(parent, f".{name}.lock"))
    record = _parse(found[0]) if found is not None else {}
    if record.get("token") != token or record.get("released"):
        raise UserError(f"{display(out)}: this writer lost its lease (now {record.get('holder', 'nobody')}'s, token "
                        f"{record.get('token')}; this writer's was {token}): stopped before writing; what it wrote "
                        "before is kept, the other writer goes on")


def _parse(content: bytes) -> dict:
    try:
        record = json.loads(content)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _lease_is_dead(record: dict, age_s: float) -> bool:
    """Not renewed for LEASE_EXPIRY_S (in the store's clock), or its holder a dead process on this host."""
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return age_s > LEASE_EXPIRY_S
