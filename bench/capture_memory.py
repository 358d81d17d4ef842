"""Capture peak memory at a fixed batch x sequence for vocab 8k, 32k, 128k: flat beyond the weights.

    python bench/capture_memory.py [--batch-size 8] [--seq-len 256] [--tail-samples 8]

Each measurement runs in a fresh process: peak RSS (CPU) or peak allocated (CUDA) during one
batch, minus what the process held after loading the teacher. The capture path (sliced LM head +
top-k + tail draws, as the default cache) is compared with a bare forward that materialises the full logits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = r"""
import json, resource, sys, torch
from pipeline.models.devices import resolve_device
from pipeline.models.load import build_llama
from pipeline.capture.topk import teacher_topk
vocab, mode, batch, seq_len, device = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), resolve_device(sys.argv[5])
draws = int(sys.argv[6])
torch.manual_seed(0)
model = build_llama(vocab, 256, 4, 4, 688, seq_len).to(device).eval()
ids = torch.randint(0, vocab, (batch, seq_len), device=device)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.inference_mode():
    model(input_ids=ids[:, :8])  # warm up kernels with a tiny input
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else:
        base = rss()
    if mode == "capture":
        teacher_topk(model, ids, 64, tail_samples=draws)
    else:
        model(input_ids=ids).logits.float()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss()
print(json.dumps({"extra_bytes": peak - base}))
"""


def measure(vocab: int, mode: str, args) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, str(vocab), mode, str(args.batch_size), str(args.seq_len), args.device,
                          str(args.tail_samples)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_bytes"]


def main() -> None:
    from common import header

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tail-samples", type=int, default=8, help="tail draws per position in the capture")
    args = parser.parse_args()
    print(header("capture peak memory"))
    print(f"batch {args.batch_size} x {args.seq_len} tokens, k 64, {args.tail_samples} tail draws; extra memory over the loaded teacher (MiB)")
    print(f"{'vocab':>8} {'capture':>10} {'bare forward':>14} {'full fp32 logits':>18}")
    for vocab in (8192, 32768, 131072):
        capture, bare = measure(vocab, "capture", args), measure(vocab, "bare", args)
        logits = args.batch_size * args.seq_len * vocab * 4
        print(f"{vocab:>8} {capture / 2**20:>10.0f} {bare / 2**20:>14.0f} {logits / 2**20:>18.0f}")


if __name__ == "__main__":
    main()
