"""One writer at a time on an output: a second one is refused at once, naming the holder.

On local disk an exclusive lock on a file beside the output (the kernel releases it on exit or
death). In an object store a lease object beside it, on a store found at the start to enforce
conditional writes: taken, renewed (each renewal changes the record, and so its version) and
released with conditional writes, aged in the store's own clock, its holder judged dead by its pid
only from the same pid namespace, and carrying a fencing token one more than the previous holder's.
A writer that lost its lease stops at its next `check_lease`, which a capture runs before each
shard's objects and before each shard's completion flag: before its next shard or flag, not before
its next byte (see `check_lease`).
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


def output_location(out: Location) -> Location:
    """The output `out` names, however it is spelled: a URL as it is (without a trailing slash); a local
    path absolute, its symbolic links, `..` and `.` resolved, so that every spelling of one output (a
    symlink to it, a relative path) is one output with one lock. Refused in one line: a location that
    cannot hold an output (`storage.output_problem`: memory://, hdfs://, a chained URL, ...) and a path
    through a symbolic link that leads nowhere (a dangling one, or a loop)."""
    out = locate(out, output=True)
    if isinstance(out, str):
        return out
    path = out.absolute()  # not expanduser: the lock lies where the writer writes, and "~" is a name to it
    for step in (*reversed(path.parents), path):
        if step.is_symlink() and not step.exists():
            raise UserError(f"{display(out)}: {step} is a symbolic link to {os.readlink(step)}, which does not exist "
                            "(or is a loop of links): create what it points to, remove the link, or choose another path")
    return path.resolve()


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def writer_lock(out: Location) -> Iterator[Lease | None]:
    """One writer at a time on `out`, however it is spelled (`output_location`), refused at once: an
    exclusive lock on a file beside it (released on exit or death; yields None), or for a URL a
    lease object beside it (yields the Lease)."""
    target = output_location(out)
    if isinstance(target, str):
        with _object_lock(target) as lease:
            yield lease
        return
    lock_path = _lock_path(target)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = _lock_file(locate(out), lock_path)
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
    try:
        lock_path = _lock_path(out.absolute().resolve())  # where the writer's lock lies
        handle = open(lock_path, "r")
    except (OSError, RuntimeError):  # no lock file; or a loop of symbolic links, which no writer can lock
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

NO_CONDITIONAL_WRITES = ("{where}: this store does not enforce conditional writes (it accepted a write whose If-Match "
                         "could not match), so two writers on it could not be kept apart; write to a store that "
                         "enforces If-Match / If-None-Match on PUT, or to local disk")


@dataclass
class Lease:
    """A writer's lease on an output in an object store: its lock object, its fencing token (one more
    than the previous holder's), the object's version it last wrote, and how many times it renewed it
    (written in the record, so that every renewal changes the object and therefore its version)."""

    lock: str
    token: int
    version: str
    renewals: int = 0
    lost: threading.Event = field(default_factory=threading.Event)


def pid_namespace() -> str | None:
    """Where this process's pid means something: its pid namespace as the kernel names it
    ("pid:[4026531836]") and the kernel's boot id (a namespace's number is unique only within one
    running kernel: the first one has the same number on every Linux host). None without Linux's /proc."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{os.readlink('/proc/self/ns/pid')} boot {boot}"
    except OSError:
        return None


def _lease_record(token: int, renewals: int = 0, released: bool = False) -> bytes:
    host = socket.gethostname()
    return json.dumps({"holder": f"pid {os.getpid()} on {host}", "host": host, "pid": os.getpid(),
                       "pid_namespace": pid_namespace(), "token": token, "renewals": renewals,
                       "released": released}).encode()


@contextlib.contextmanager
def _object_lock(out: str) -> Iterator[Lease]:
    """A lease in an object store: `.NAME.lock` beside `out`. First one request tells whether the store
    enforces conditional writes (a PUT with an If-Match that cannot match, on `.NAME.lock.probe`, must be
    refused; a store that accepts it is refused in one line: nothing there would keep two writers
    apart). Then it is taken (`take_lease`), renewed every LEASE_RENEW_S by a thread (`renew_lease`),
    and released on exit with If-Match on the version it last wrote (marked released, keeping its
    token, so tokens grow across holders). A holder that finds another's version at a renewal has lost
    the lease: it never writes the lock again, and its next `check_lease` stops it.

    In a store without conditional requests (fsspec's gcs, azure, ...: not S3) there is nothing to
    probe and every step is `write_if`'s check-then-write: it refuses a second writer that comes while
    the first holds the lease, but two that take it at the same moment can both go on."""
    parent, name = storage.parent_and_name(out)
    lock = storage.child(parent, f".{name}.lock")
    enforced = storage.enforces_conditional_writes(storage.child(parent, f".{name}.lock.probe"))
    require(enforced is not False, NO_CONDITIONAL_WRITES.format(where=display(out)))
    lease = take_lease(out, lock, storage.read_versioned(lock))
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_RENEW_S):
            try:
                if not renew_lease(lease):
                    return  # taken over while this holder was paused: never write the lock again
            except Exception:  # a missed renewal only shortens the lease
                continue

    renewer = threading.Thread(target=renew, name="lease-renewal", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join()
        if not lease.lost.is_set():
            with contextlib.suppress(Exception):
                storage.write_if(lock, _lease_record(lease.token, lease.renewals, released=True), lease.version)


def take_lease(out: str, lock: str, seen: tuple[bytes, str, float] | None) -> Lease:
    """Take the lease on `out` from what was read of its lock object (`seen`: content, version, age in
    the store's clock; None: there is none): with If-None-Match when there is none, else, when its holder
    released it or is dead (`_lease_is_dead`), with If-Match on the version read, and the next fencing
    token. So of two writers that both found it free exactly one wins, and a writer whose read predates
    the holder's latest renewal loses (the renewal changed the version). A live holder: refused, named."""
    token, version = 1, None
    if seen is not None:
        record = _parse(seen[0])
        if not (record.get("released") or _lease_is_dead(record, seen[2])):
            raise _refuse(out, record.get("holder", "another process"))
        token, version = int(record.get("token", 0)) + 1, seen[1]
    written = storage.write_if(lock, _lease_record(token), version)
    require(written is not None, f"{display(out)}: another writer took the lock just now (or its holder renewed it "
                                 "since it was read); rerun later")
    return Lease(lock, token, written)


def renew_lease(lease: Lease) -> bool:
    """One renewal: the record rewritten with one more renewal (so the object, and its version, change:
    a taker that read it before now fails its If-Match), with If-Match on the version this holder last
    wrote. False, and `lease.lost` set, when that is no longer the object's version (another writer took
    the lease over): the holder must not write the lock again."""
    renewed = storage.write_if(lease.lock, _lease_record(lease.token, lease.renewals + 1), lease.version)
    if renewed is None:
        lease.lost.set()
        return False
    lease.version, lease.renewals = renewed, lease.renewals + 1
    return True


def check_lease(out: Location, token: int | None) -> None:
    """Refuse to go on writing into `out` unless its lease still carries `token` and is not released: the
    fencing check, one read of the lock object. It stops a writer whose lease was taken over at its next
    check, not at once: a capture checks before each shard's objects and again before that shard's
    checksums, row digest and completion flag (`capture.shards.write_shard`), so it stops before its
    next shard or flag. What is already past a check still lands: the objects of a shard being written
    when the lease was taken over, or a flag written just after its check passed. The new holder
    rewrites every shard that was not complete when it started (from nothing), and `pipeline verify`
    checks each complete shard's objects against the checksums written with its flag.
    `token` None (a local output, held by a file lock the kernel releases only with its holder): nothing
    to check."""
    if token is None:
        return
    parent, name = storage.parent_and_name(out)
    found = storage.read_versioned(storage.child(parent, f".{name}.lock"))
    record = _parse(found[0]) if found is not None else {}
    if record.get("token") != token or record.get("released"):
        raise UserError(f"{display(out)}: this writer lost its lease (now {record.get('holder', 'nobody')}'s, token "
                        f"{record.get('token')}; this writer's was {token}): stopped before its next shard or flag; "
                        "what it completed before is kept, the other writer goes on")


def _parse(content: bytes) -> dict:
    try:
        record = json.loads(content)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def pid_in_our_namespace(record: dict, host: str, namespace: str | None) -> bool:
    """Whether a lease record's pid names a process this one can ask the kernel about: written on this
    host (`host`) in this pid namespace of this kernel (`namespace`, as `pid_namespace` gives it), both
    recorded. A container that shares the hostname but not the pid namespace, a record of an older
    version (no namespace), or a process without /proc: no, and only the lease's expiry can free it."""
    return (isinstance(record.get("pid"), int) and namespace is not None and record.get("host") == host
            and record.get("pid_namespace") == namespace)


def _lease_is_dead(record: dict, age_s: float) -> bool:
    """Not renewed for LEASE_EXPIRY_S (in the store's clock), or its holder a process of our pid
    namespace that no longer exists."""
    if age_s > LEASE_EXPIRY_S:
        return True
    if not pid_in_our_namespace(record, socket.gethostname(), pid_namespace()):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, another user's
        pass
    return False
