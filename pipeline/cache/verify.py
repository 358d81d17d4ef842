"""`pipeline verify`: check a whole cache against its checksums (its data and its bookkeeping), and optionally
repair it: rewrite what can be recomputed, mark bad shards for recapture."""

from __future__ import annotations

import contextlib
from typing import Callable

from tqdm import tqdm

from pipeline.cache.format import CacheSpec
from pipeline.cache.store import complete_shards, open_cache
from pipeline.cache.integrity import RECAPTURE, RECAPTURE_RUN, RECOMPUTE, clear_shards, repair_in_place, verify
from pipeline.cache.manifest import check, follow
from pipeline.errors import list_problems
from pipeline.io.locks import check_lease, writer_lock
from pipeline.io.storage import Location, display, open_group



def verify_cache(where: Location, repair: bool, progress: bool, echo: Callable[..., None]) -> int:
    """0 when every complete shard and the bookkeeping are intact (or `repair` rewrote what was not: row
    digests from their rows, an unreadable provenance record), else 1: shards to recapture (cleared with
    `repair`), or a stored tokenizer that `cache-logits` rewrites from the corpus.

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
            problems = verify(group, spec, dict(group.attrs).get("tokenizer_fingerprint"), on_shard=bar.update)
        incomplete = spec.n_shards - int(complete_shards(group).sum())
        list_problems(echo, path, problems)
        note = f"; {incomplete} shards not written yet" if incomplete else ""
        if not problems:
            echo(f"{path}: all {spec.n_shards - incomplete} complete shards intact{note}")
            return 0
        bad = sorted({p.shard for p in problems if p.repair == RECAPTURE})
        recomputed = [p for p in problems if p.repair == RECOMPUTE and p.shard not in bad]
        tokenizer = any(p.repair == RECAPTURE_RUN for p in problems)
        found = (([f"{len(bad)} of {spec.n_shards} shards fail verification{note}"] if bad else [])
                 + ([f"{len(recomputed)} bookkeeping entries are damaged"] if recomputed else [])
                 + (["the stored tokenizer is damaged"] if tokenizer else []))
        rewrite = "`pipeline cache-logits` with the same settings rewrites the stored tokenizer from the corpus"
        if not repair:
            steps = ([f"`pipeline verify {path} --repair` " + " and ".join(
                (["rewrites the damaged entries from the intact data"] if recomputed else [])
                + (["marks the bad shards for recapture by `pipeline cache-logits`"] if bad else []))]
                if bad or recomputed else []) + ([rewrite] if tokenizer else [])
            echo(f"error: {'; '.join(found)}: {'; then '.join(steps)}", err=True)
            return 1
        check_lease(where, None if lease is None else lease.token)  # repaired only while the lease is still ours
        writable = open_group(where, mode="r+")
        repair_in_place(writable, spec, recomputed)
        clear_shards(writable, spec, bad)
        done = ([f"{len(bad)} of {spec.n_shards} shards failed and are now marked as not written"] if bad else []) + (
            [f"{len(recomputed)} bookkeeping entries rewritten from the intact data"] if recomputed else [])
        if not bad and not tokenizer:
            echo(f"{path}: {done[0]}; all {spec.n_shards - incomplete} complete shards intact now{note}")
            return 0
        steps = (["rerun `pipeline cache-logits` with the same settings to recapture them"] if bad else []) + (
            [rewrite] if tokenizer else [])
        echo(f"error: {'; '.join(done + steps)}", err=True)
        return 1
