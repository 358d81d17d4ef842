"""Cache size and fidelity: bytes on disk per token (by array) and the encoding's KL.

    python bench/cache_size.py --cache data/logits.zarr --teacher data/teacher [--sequences 32]

Fidelity: for a sample of cached sequences the teacher is re-run, and KL(exact top-k + tail ||
what the cache decodes to) is averaged over positions (both as k+1-outcome distributions, the
decoded one renormalised), with the mean captured top-k mass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header  # noqa: E402

from pipeline.cache.store import disk_bytes, open_cache  # noqa: E402
from pipeline.models.devices import resolve_device  # noqa: E402
from pipeline.models.load import load_causal_lm, resolve_teacher  # noqa: E402
from pipeline.capture.topk import teacher_topk  # noqa: E402


def coarse(logprobs: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """(N, k+1) normalised log-probs of the top-k + tail outcomes, float64."""
    full = np.concatenate([logprobs.astype(np.float64), tail.astype(np.float64)[:, None]], axis=1)
    full = np.maximum(full, -100.0)
    return full - np.logaddexp.reduce(full, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="data/logits.zarr")
    parser.add_argument("--teacher", default="data/teacher")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    group = open_cache(args.cache)
    attrs = dict(group.attrs)
    tokens = attrs["n_sequences"] * attrs["seq_len"]
    print(header("cache size and fidelity"))
    print(f"cache {args.cache}: vocab {attrs['vocab_size']}, k {attrs['k']}, {tokens:,} tokens")
    total = disk_bytes(Path(args.cache))
    for name in sorted(p.name for p in Path(args.cache).iterdir() if p.is_dir()):
        size = disk_bytes(Path(args.cache) / name)
        print(f"  {name:<16} {size / tokens:8.2f} B/token")
    k = attrs["k"]
    print(f"total {total / tokens:.1f} B/token = {total / tokens / k:.3f} B per top-k entry; "
          f"dense fp16 logits {2 * attrs['vocab_size']:,} B/token ({2 * attrs['vocab_size'] / (total / tokens):.0f}x larger)")

    device = resolve_device(args.device)
    model = load_causal_lm(resolve_teacher(args.teacher), device)
    rows = np.asarray(group["input_ids"][: args.sequences])
    exact = teacher_topk(model, torch.from_numpy(rows.astype(np.int64)).to(device), k)
    cached_ids = np.asarray(group["topk_ids"][: args.sequences]).reshape(-1, k).astype(np.int64)
    exact_ids = exact.ids.cpu().numpy()
    same_set = np.mean([set(a) == set(b) for a, b in zip(cached_ids, exact_ids)])
    p = coarse(exact.logprobs.cpu().numpy(), exact.tail_logprob.cpu().numpy())
    # align the cached values to the exact ids' order (the cache may store another order)
    order = np.argsort(cached_ids, axis=1)
    exact_order = np.argsort(exact_ids, axis=1)
    cached_lp = np.take_along_axis(np.asarray(group["topk_logprobs"][: args.sequences]).reshape(-1, k), order, 1)
    cached_lp = np.take_along_axis(cached_lp, np.argsort(exact_order, axis=1), 1)
    q = coarse(cached_lp, np.asarray(group["tail_logprob"][: args.sequences]).reshape(-1))
    kl = (np.exp(p) * (p - q)).sum(1)
    print(f"fidelity over {rows.size:,} positions: identical top-k sets {same_set:.4f}; "
          f"mean KL(exact || decoded) {kl.mean():.2e} nats/token (max {kl.max():.2e}); "
          f"mean captured mass {np.exp(exact.logprobs.cpu().numpy().astype(np.float64)).sum(1).mean():.4f}")


if __name__ == "__main__":
    main()
