"""`pipeline verify`: check a whole cache against its checksums, and optionally mark bad shards for recapture."""

from __future__ import annotations

import contextlib
from typing import Callable

from tqdm import tqdm

from pipeline.cache.format import CacheSpec
from pipeline.cache.store import complete_shards, open_cache
from pipeline.cache.integrity import clear_shards, verify
from pipeline.cache.manifest import check, follow
from pipeline.errors import list_problems
from pipeline.io.locks import check_lease, writer_lock
from pipeline.io.storage import Location, display, open_group



def verify_cache(where: Location, repair: bool, progress: bool, echo: Callable[..., None]) -> int:
    """0 when every complete shard is intact, else 1 (after clearing the bad shards with `repair`).

    Without `repair` it only reads: no lock, no file created (a read-only cache, or one in a corpus
    directory DVC hashes, stays as it is); a shard a capture completes meanwhile may be left out of
    the count. With `repair` it takes the writer lock first: no capture writes while it clears flags."""
    where, manifest = follow(given := where)
    path = display(where)
    with writer_lock(where) if repair else contextlib.nullcontext() as lease:
        group = open_cache(where)
        check(group, manifest, given)
        spec = CacheSpec.from_attrs(dict(group.attrs))
        with tqdm(total=int(complete_shards(group).sum()), desc="verify", unit="shard", disable=not progress) as bar:
            problems = verify(group, spec, on_shard=bar.update)
        incomplete = spec.n_shards - int(complete_shards(group).sum())
        bad = sorted({p.shard for p in problems})
        list_problems(echo, path, problems)
        note = f"; {incomplete} shards not written yet" if incomplete else ""
        if not problems:
            echo(f"{path}: all {spec.n_shards - incomplete} complete shards intact{note}")
            return 0
        if not repair:
            echo(f"error: {len(bad)} of {spec.n_shards} shards fail verification{note}; "
                 f"`pipeline verify {path} --repair` marks them for recapture by `pipeline cache-logits`", err=True)
            return 1
        check_lease(where, None if lease is None else lease.token)  # cleared only while the lease is still ours
        clear_shards(open_group(where, mode="r+"), spec, bad)
        echo(f"error: {len(bad)} of {spec.n_shards} shards failed and are now marked as not written; "
             "rerun `pipeline cache-logits` with the same settings to recapture them", err=True)
        return 1
