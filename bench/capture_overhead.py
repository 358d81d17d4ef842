"""Capture overhead: cache-logits throughput / bare teacher forward throughput, same model, same batches.

    python bench/capture_overhead.py [--teacher data/teacher] [--sequences 64] [--device auto]

The bare forward is `model(input_ids).logits` (what any inference costs); the capture is the real
path: forward to hidden states, sliced LM head + top-k + tail on the device, copy to host, and
compressed Zarr writes in the background thread. Both are timed alternately in one run and the
ratio of medians is reported (these machines are noisy; absolute numbers are not comparable).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, sync  # noqa: E402

from pipeline.cache.format import CacheSpec  # noqa: E402
from pipeline.cache.store import create_cache
from pipeline.capture.shards import capture  # noqa: E402
from pipeline.corpus.token_store import SplitRows  # noqa: E402
from pipeline.models.devices import resolve_device  # noqa: E402
from pipeline.models.load import build_llama, load_causal_lm, output_vocab_size  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="HF model dir; default: the default teacher's architecture, random weights")
    parser.add_argument("--vocab", type=int, default=8192, help="vocab of the random teacher")
    parser.add_argument("--d-model", type=int, default=256, help="width of the random teacher (default: the default teacher's)")
    parser.add_argument("--layers", type=int, default=4, help="depth of the random teacher")
    parser.add_argument("--d-ff", type=int, default=None, help="its MLP width (default 8/3 d)")
    parser.add_argument("--heads", type=int, default=None, help="its attention heads (default d / 64)")
    parser.add_argument("--kv-heads", type=int, default=None, help="its key-value heads (default: as many as heads)")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--tail-samples", type=int, default=0, help="tail draws per position (cache-logits --tail-samples)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.teacher:
        model = load_causal_lm(args.teacher, device)
    else:
        d_ff = args.d_ff or int(args.d_model * 8 / 3 + 7) // 8 * 8
        model = build_llama(args.vocab, args.d_model, args.layers, args.heads or max(1, args.d_model // 64), d_ff,
                            args.seq_len, n_kv_heads=args.kv_heads, tie_embeddings=False).to(device).eval()
        if device.type == "cuda":
            model = model.to(torch.bfloat16)
    vocab = output_vocab_size(model)
    rows = np.random.default_rng(0).integers(0, vocab, (args.sequences, args.seq_len)).astype(np.uint32 if vocab > 65536 else np.uint16)
    tokens = rows.size

    @torch.inference_mode()
    def bare_forward() -> None:
        for lo in range(0, len(rows), args.batch_size):
            batch = torch.from_numpy(rows[lo : lo + args.batch_size].astype(np.int64)).to(device)
            model(input_ids=batch).logits
        sync(device)

    def cached() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            spec = CacheSpec("w", "t", "c", "train", vocab, args.k, args.seq_len, len(rows),
                             args.batch_size * 2, min(16, args.batch_size), (1.0,), 0, tail_samples=args.tail_samples)
            group = create_cache(Path(tmp) / "c.zarr", spec, "{}")
            capture(model, SplitRows.of(rows), group, spec, args.batch_size, device, progress=False)
            sync(device)

    bare_forward(), cached()  # warm-up
    bare, cap = [], []
    for _ in range(args.repeats):
        for fn, times in ((bare_forward, bare), (cached, cap)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    bare_tps, cap_tps = tokens / float(np.median(bare)), tokens / float(np.median(cap))
    print(header("capture overhead"))
    arch = f"random Llama d={args.d_model} L={args.layers}"
    print(f"teacher: {args.teacher or arch}, vocab {vocab}, k {args.k}, tail draws {args.tail_samples}, "
          f"{args.sequences}x{args.seq_len} tokens, batch {args.batch_size}, device {device}")
    print(f"bare forward     {bare_tps:>12,.0f} tok/s")
    print(f"cache-logits     {cap_tps:>12,.0f} tok/s")
    print(f"ratio capture/bare = {cap_tps / bare_tps:.3f}")


if __name__ == "__main__":
    main()
