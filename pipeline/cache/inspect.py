"""Describe a cache: metadata, provenance, completeness, size, and how much teacher mass the top-k captures."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from pipeline.cache.format import CacheSpec
from pipeline.cache.provenance import read_provenance, read_shard_records
from pipeline.cache.store import complete_shards, disk_bytes, open_cache
from pipeline.corpus.loss_mask import learned_positions
from pipeline.cache.integrity import open_checked, read_rows, require_checksums, require_intact
from pipeline.cache.manifest import check, follow
from pipeline.io.storage import Location, display

MAX_SAMPLED_POSITIONS = 1 << 22  # captured-mass statistics read at most this many tail values
MAX_SHARD_RECORDS = 2048  # per-shard provenance records read (evenly spread over the complete shards)


def writers(group: zarr.Group, shards: np.ndarray) -> list[dict[str, Any]]:
    """Who wrote the cache's shards: per (host, rank, device, dtype), how many and how fast."""
    picked = shards[np.linspace(0, len(shards) - 1, min(MAX_SHARD_RECORDS, len(shards))).astype(int)] if len(shards) else []
    by_writer: dict[tuple, list[dict[str, Any]]] = {}
    for record in read_shard_records(group, [int(s) for s in np.unique(picked)]):
        key = tuple(record.get(k) for k in ("host", "rank", "device", "dtype"))
        by_writer.setdefault(key, []).append(record)
    return [{"host": host, "rank": rank, "device": device, "dtype": dtype, "shards": len(records),
             "seconds": round(sum(r.get("seconds", 0) for r in records), 3),
             "tokens_per_s": round(float(np.median([r.get("tokens_per_s", 0) for r in records])))}
            for (host, rank, device, dtype), records in sorted(by_writer.items(), key=lambda item: str(item[0]))]


def cache_stats(group: zarr.Group, path: Location) -> dict[str, Any]:
    """Statistics of a cache; refuses (UserError) a cache with missing or corrupted shard objects."""
    attrs = dict(group.attrs)
    spec = CacheSpec.from_attrs(attrs)
    require_intact(group, spec, display(path))
    done = complete_shards(group)
    tokens = spec.n_sequences * spec.seq_len
    complete_seqs = sum(hi - lo for lo, hi in map(spec.shard_rows, np.flatnonzero(done)))
    size = disk_bytes(path)

    # Sample whole shards evenly across the complete ones, up to the position budget.
    shards = np.flatnonzero(done)
    budget = max(1, MAX_SAMPLED_POSITIONS // (spec.sequences_per_shard * spec.seq_len))
    sampled = shards[np.linspace(0, len(shards) - 1, min(budget, len(shards))).astype(int)] if len(shards) else []
    read = ["tail_logprob", *(["loss_mask"] if spec.loss_mask else [])]
    require_checksums(group, spec, [int(s) for s in sampled], read, display(path))  # what is read is what was written
    checked = open_checked(path, spec)  # ... and the shard written there (not another's object of equal checksum)
    tails = [read_rows(checked["tail_logprob"], *spec.shard_rows(s), display(path)) for s in sampled]
    if spec.loss_mask:  # chat data: the positions the loss counts (the others may hold no targets)
        masks = [learned_positions(read_rows(checked["loss_mask"], *spec.shard_rows(s), display(path))) for s in sampled]
        tails = [tail[mask] for tail, mask in zip(tails, masks)]
    tails = [tail.ravel() for tail in tails]
    tails = [tail for tail in tails if tail.size]
    mass = 1.0 - np.exp(np.concatenate(tails).astype(np.float64)) if tails else np.array([np.nan])
    provenance = read_provenance(path)
    runs = provenance.get("runs") or [{}]
    return {
        **{k: attrs[k] for k in ("vocab_size", "k", "tail_samples", "seq_len", "split", "temperatures", "format_version",
                                 "loss_mask", "masked_targets")},
        "teacher": provenance.get("teacher"),
        "teacher_fingerprint": attrs["teacher_fingerprint"],
        "created": provenance.get("created"),
        "last_run": runs[-1],
        "runs": len(provenance.get("runs") or []),
        "history": provenance.get("runs") or [],
        "tokens": tokens,
        "shards_complete": int(done.sum()),
        "shards_total": int(done.size),
        "complete_fraction": complete_seqs / spec.n_sequences if spec.n_sequences else 1.0,
        "bytes_on_disk": size,
        "bytes_per_token": size / max(1, complete_seqs * spec.seq_len),
        "ratio_to_dense_fp16": (2 * spec.vocab_size) / (size / max(1, complete_seqs * spec.seq_len)),
        "captured_mass_mean": float(mass.mean()),
        "captured_mass_p5": float(np.percentile(mass, 5)),
        "captured_mass_p50": float(np.percentile(mass, 50)),
        "captured_mass_p95": float(np.percentile(mass, 95)),
        "sampled_positions": int(mass.size) if tails else 0,
        # what inspect checked: every complete shard has each array's object (one listing per array); the
        # sampled shards' objects it reads match their checksums; every other byte only `verify` checks
        "checksummed_shards": len(sampled),
        "checksummed_arrays": read,
        "writers": writers(group, shards),
        "writer_records_sampled": min(MAX_SHARD_RECORDS, len(shards)),
    }


def describe_cache(where: Location) -> dict[str, Any]:
    """`pipeline inspect`: the statistics of a cache given by its path, URL or manifest."""
    location, manifest = follow(where)
    group = open_cache(location)
    check(group, manifest, where)
    return cache_stats(group, location)


def run_lines(history: list[dict[str, Any]]) -> list[str]:
    """One line per capture run, finished or not (a run records itself when it starts)."""
    lines = []
    for run in history:
        what = (f"{run.get('shards_written', '?')} shards written, {run.get('tokens_per_s', 0):,} tok/s"
                if run.get("status", "finished") == "finished" else "did not finish (killed, or still running)")
        processes = run.get("processes", 1)
        lines.append(f"  {run.get('started', '?')} on {run.get('host', '?')} ({run.get('device', '?')}, "
                     f"{processes} process{'es' if processes > 1 else ''}): {what}")
    return lines


def format_stats(stats: dict[str, Any]) -> str:
    lines = [
        f"teacher            {stats['teacher'] or '(not recorded)'}   fingerprint {stats['teacher_fingerprint']}",
        f"format             v{stats['format_version']}, created {stats['created'] or '(not recorded)'}",
        f"runs               {stats['runs']} recorded" + (", the last ten:" if stats["runs"] > 10 else ":" if stats["runs"] else ""),
        *run_lines(stats.get("history", [])[-10:]),
        f"split / seq_len    {stats['split']} / {stats['seq_len']}",
        f"vocab / k          {stats['vocab_size']} / {stats['k']}   tail draws {stats['tail_samples']}   "
        f"temperatures {stats['temperatures']}",
        f"tokens             {stats['tokens']:,}",
        f"complete           {stats['shards_complete']}/{stats['shards_total']} shards ({stats['complete_fraction']:.1%} of tokens)",
        f"on disk            {stats['bytes_on_disk']:,} bytes, {stats['bytes_per_token']:.1f} B/token "
        f"({stats['ratio_to_dense_fp16']:.0f}x smaller than dense fp16 logits)",
        f"captured mass      mean {stats['captured_mass_mean']:.4f}, p5 {stats['captured_mass_p5']:.4f}, "
        f"p50 {stats['captured_mass_p50']:.4f}, p95 {stats['captured_mass_p95']:.4f} "
        f"({stats['sampled_positions']:,} positions)",
    ]
    lines.append(f"checked            every complete shard has all its objects; checksums of "
                 f"{'/'.join(stats['checksummed_arrays'])} in the {stats['checksummed_shards']} sampled shards; "
                 "the rest only by `pipeline verify`")
    sampled = stats["writer_records_sampled"] < stats["shards_complete"]
    lines.append("written by         " + ("(no per-shard records)" if not stats["writers"] else
                 f"{len(stats['writers'])} writer(s)" + (f", from {stats['writer_records_sampled']} sampled shards" if sampled else "")))
    for w in stats["writers"]:
        lines.append(f"  {w['host']} rank {w['rank']} {w['device']} {w['dtype']}: {w['shards']} shards, "
                     f"median {w['tokens_per_s']:,} tok/s, {w['seconds']:.1f} s")
    return "\n".join(lines)
