"""Describe a cache: metadata, provenance, completeness, size, and how much teacher mass the top-k captures."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from pipeline.cache import CacheSpec, complete_shards, disk_bytes, read_provenance
from pipeline.integrity import read_rows, require_intact
from pipeline.storage import Location, display

MAX_SAMPLED_POSITIONS = 1 << 22  # captured-mass statistics read at most this many tail values


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
    tails = [read_rows(group["tail_logprob"], *spec.shard_rows(s), display(path)).ravel() for s in sampled]
    mass = 1.0 - np.exp(np.concatenate(tails).astype(np.float64)) if tails else np.array([np.nan])
    provenance = read_provenance(path)
    runs = provenance.get("runs") or [{}]
    return {
        **{k: attrs[k] for k in ("vocab_size", "k", "tail_samples", "seq_len", "split", "temperatures", "format_version")},
        "teacher": provenance.get("teacher"),
        "teacher_fingerprint": attrs["teacher_fingerprint"],
        "created": provenance.get("created"),
        "last_run": runs[-1],
        "runs": len(provenance.get("runs") or []),
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
    }


def format_stats(stats: dict[str, Any]) -> str:
    run = stats["last_run"]
    last = (f"{run.get('finished', '?')} on {run.get('host', '?')} ({run.get('device', '?')}): "
            f"{run.get('shards_written', '?')} shards, {run.get('tokens_per_s', 0):,} tok/s") if run else "none recorded"
    lines = [
        f"teacher            {stats['teacher'] or '(not recorded)'}   fingerprint {stats['teacher_fingerprint']}",
        f"format             v{stats['format_version']}, created {stats['created'] or '(not recorded)'}",
        f"last run           {last}   ({stats['runs']} runs recorded)",
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
    return "\n".join(lines)
