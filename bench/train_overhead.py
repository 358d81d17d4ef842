"""Training overhead: KD-from-cache step time / hard-label step time, same student, same batches;
and loader throughput / the student's consumption.

    python bench/train_overhead.py --cache data/logits.zarr [--steps 10] [--device auto]

Hard-label training is the plain transformers path (`model(input_ids, labels=...)`, F.cross_entropy);
KD is `kd_ce_from_logits` as train-student runs it (fused forward KL + CE), and, for reference,
the unfused autograd version. Steps alternate between the variants within one run; medians.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, sync  # noqa: E402

from pipeline.cache.store import open_cache  # noqa: E402
from pipeline.distill.losses import SparseTargets  # noqa: E402
from pipeline.train.loader import StreamSpec, make_loader, move  # noqa: E402
from pipeline.distill.losses import kd_ce_from_logits  # noqa: E402
from pipeline.models.devices import resolve_device  # noqa: E402
from pipeline.models.load import build_llama  # noqa: E402
from pipeline.optim import make_optimizer  # noqa: E402


def to_device(batch, device):
    batch = move(batch, device)
    input_ids = batch["input_ids"].long()
    return input_ids, SparseTargets.from_batch(batch), torch.ones_like(input_ids, dtype=torch.bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="data/logits.zarr")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    attrs = dict(open_cache(args.cache).attrs)
    # as train-student reads it: with the tail draws when the cache has them
    spec = StreamSpec(args.cache, args.batch_size, seed=0, shuffle_window=1024, tail_ids=attrs["tail_samples"] > 0)
    batches = [to_device(b, device) for b in itertools.islice(make_loader(spec, 0), 4)]  # (input_ids, targets, mask)

    torch.manual_seed(0)
    model = build_llama(attrs["vocab_size"], args.d_model, args.n_layers, 4, int(args.d_model * 8 / 3 + 1) // 2 * 2,
                        attrs["seq_len"]).to(device)
    optimizer = make_optimizer(model, 1e-4, 0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def hard_label(batch):
        input_ids = batch[0]
        with autocast:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        return loss

    def kd(batch, fused=True):
        input_ids, targets, mask = batch
        with autocast:
            logits = model(input_ids=input_ids).logits
        return kd_ce_from_logits(logits, input_ids, targets, mask, 0.8, 1.0, fused=fused)["loss"]

    variants = {"hard-label (HF CE)": hard_label, "KD from cache (fused)": kd, "KD from cache (unfused)": lambda b: kd(b, False)}
    times = {name: [] for name in variants}
    for step in range(args.steps + 1):
        for name, loss_fn in variants.items():
            batch = batches[step % len(batches)]
            sync(device)
            start = time.perf_counter()
            loss_fn(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if step:  # the first round is warm-up
                times[name].append(time.perf_counter() - start)
    step_s = {name: float(np.median(t)) for name, t in times.items()}

    loader = iter(make_loader(spec, args.num_workers))
    next(loader)  # start-up of the worker processes is not throughput
    n_batches = 40
    start = time.perf_counter()
    for _ in range(n_batches):
        next(loader)
    loader_batches_per_s = n_batches / (time.perf_counter() - start)

    print(header("training overhead"))
    print(f"cache {args.cache} (vocab {attrs['vocab_size']}, k {attrs['k']}, tail draws {attrs['tail_samples']}, "
          f"seq_len {attrs['seq_len']}); "
          f"student d={args.d_model} L={args.n_layers}, batch {args.batch_size}, device {device}")
    base = step_s["hard-label (HF CE)"]
    for name, seconds in step_s.items():
        print(f"{name:<26} {seconds * 1000:8.1f} ms/step   ratio to hard-label {seconds / base:.3f}")
    consume = 1 / step_s["KD from cache (fused)"]
    print(f"loader ({args.num_workers} worker) {loader_batches_per_s:8.1f} batches/s; student consumes {consume:.2f} batches/s; "
          f"ratio {loader_batches_per_s / consume:.1f}x")


if __name__ == "__main__":
    main()
