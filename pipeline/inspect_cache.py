"""Describe a cache: metadata, completeness, size, and how much teacher mass the top-k captures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.cache import complete_shards, disk_bytes

MAX_SAMPLED_POSITIONS = 1 << 22  # captured-mass statistics read at most this many tail values


def cache_stats(group: zarr.Group, path: Path) -> dict[str, Any]:
    attrs = dict(group.attrs)
    done = complete_shards(group)
    per_shard, n_seq, seq_len = attrs["sequences_per_shard"], attrs["n_sequences"], attrs["seq_len"]
    tokens = n_seq * seq_len
    complete_seqs = sum(min(per_shard, n_seq - s * per_shard) for s in np.flatnonzero(done))
    size = disk_bytes(path)

    # Sample whole shards evenly across the complete ones, up to the position budget.
    tail = group["tail_logprob"]
    shards = np.flatnonzero(done)
    budget = max(1, MAX_SAMPLED_POSITIONS // (per_shard * seq_len))
    sampled = shards[np.linspace(0, len(shards) - 1, min(budget, len(shards))).astype(int)] if len(shards) else []
    tails = [np.asarray(tail[s * per_shard : (s + 1) * per_shard]).ravel() for s in sampled]
    mass = 1.0 - np.exp(np.concatenate(tails).astype(np.float64)) if tails else np.array([np.nan])
    return {
        **{k: attrs[k] for k in ("teacher", "vocab_size", "k", "tail_samples", "seq_len", "split", "temperatures", "format_version", "created")},
        "tokens": tokens,
        "shards_complete": int(done.sum()),
        "shards_total": int(done.size),
        "complete_fraction": complete_seqs / n_seq if n_seq else 1.0,
        "bytes_on_disk": size,
        "bytes_per_token": size / max(1, complete_seqs * seq_len),
        "ratio_to_dense_fp16": (2 * attrs["vocab_size"]) / (size / max(1, complete_seqs * seq_len)),
        "captured_mass_mean": float(mass.mean()),
        "captured_mass_p5": float(np.percentile(mass, 5)),
        "captured_mass_p50": float(np.percentile(mass, 50)),
        "captured_mass_p95": float(np.percentile(mass, 95)),
        "sampled_positions": int(mass.size) if tails else 0,
    }


def format_stats(stats: dict[str, Any]) -> str:
    lines = [
        f"teacher            {stats['teacher']}",
        f"format             v{stats['format_version']}, created {stats['created']}",
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
