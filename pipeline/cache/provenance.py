"""Provenance: when, where and how a cache was written. Not part of its identity: kept in the
`provenance` sub-group, which DVC does not hash (.dvcignore), so a rerun that writes the same content
leaves every stage downstream alone."""

from __future__ import annotations

import datetime
import json
import socket
from typing import Any

import zarr

import pipeline
from pipeline.cache.format import PROVENANCE
from pipeline.io import storage
from pipeline.io.storage import Location, display

def read_provenance(path: Location) -> dict[str, Any]:
    try:
        return dict(storage.open_group(storage.child(path, PROVENANCE), mode="r").attrs)
    except Exception:
        return {}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_run(path: Location, teacher: str, run: dict[str, Any]) -> None:
    """Record one capture run in the cache's provenance: at its start (`status: running`, so a run that
    is killed stays in the history as one that did not finish), then again at its end (the same entry,
    by its `id`, replaced with `status: finished` and its timing). Runs that found
    a cache already complete are recorded too."""
    record = read_provenance(path)
    now = utc_now()
    record.setdefault("created", run.get("started", now))
    record["teacher"] = teacher  # as given on the command line: where it came from, not what it is
    record["location"] = display(path)  # where it lives, never how to get in
    record["package_version"] = pipeline.__version__
    entry = {"host": socket.gethostname(), **run}
    if run.get("status") == "finished":
        entry["finished"] = now
    runs = [r for r in record.get("runs", []) if r.get("id") is None or r.get("id") != entry.get("id")]
    record["runs"] = [*runs, entry][-100:]
    storage.open_group(storage.child(path, PROVENANCE), mode="a", zarr_format=3).attrs.put(record)


def _shard_record_key(shard: int) -> str:
    return f"{PROVENANCE}/shards/{shard:07d}.json"


def record_shard(group: zarr.Group, shard: int, record: dict[str, Any]) -> None:
    """Who wrote shard `shard`, where, how and how fast: one small object per shard, so writers never
    touch each other's records (kept out of the cache's identity and DVC hash, like all provenance)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    payload = json.dumps({"shard": shard, **record}, sort_keys=True).encode()
    sync(group.store.set(_shard_record_key(shard), default_buffer_prototype().buffer.from_bytes(payload)))


def read_shard_records(group: zarr.Group, shards: list[int]) -> list[dict[str, Any]]:
    """The records of these shards that exist (a shard written before format 4's records has none)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def fetch_all() -> list:
        import asyncio

        keys = [_shard_record_key(s) for s in shards]
        return await asyncio.gather(*(group.store.get(k, prototype=default_buffer_prototype()) for k in keys))

    records = []
    for buffer in sync(fetch_all()):
        if buffer is not None:
            try:
                records.append(json.loads(buffer.to_bytes()))
            except ValueError:
                continue  # a damaged record says nothing; the data's own checksums still hold
    return records
