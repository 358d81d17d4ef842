"""Online KD reference: a student distilled from the cached top-k vs one distilled online from the
teacher's full distribution (same loss code, same batches, same steps); and the cost of three
students each way (one capture + three cached trainings vs three online trainings).

    python bench/online_vs_cached.py --corpus data/corpus --teacher data/teacher [--steps 200] [--tail-samples 16 64]

With --tail-samples, a cache is captured per value and a student trained from each (draws from the
teacher's tail in the loss), besides the one-bucket tail of the first cache.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header  # noqa: E402

from pipeline.cache.store import open_cache  # noqa: E402
from pipeline.settings.cache import CacheConfig  # noqa: E402
from pipeline.evaluate.scores import evaluate_models  # noqa: E402
from pipeline.cache.inspect import cache_stats  # noqa: E402
from pipeline.models.devices import resolve_device  # noqa: E402
from pipeline.models.load import load_causal_lm  # noqa: E402
from pipeline.settings.student import StudentConfig  # noqa: E402
from pipeline.corpus.token_store import open_token_store  # noqa: E402
from stages import cache_logits, train_student  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/corpus")
    parser.add_argument("--teacher", default="data/teacher")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=64, help="top-k of the cache")
    parser.add_argument("--tail-samples", type=int, nargs="*", default=[], help="tail draws per position to compare")
    parser.add_argument("--eval-sequences", type=int, default=192)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        capture_s = {}
        for draws in sorted({0, *args.tail_samples}):
            start = time.perf_counter()
            cache_logits.main(args.teacher, Path(args.corpus), tmp / f"cache-{draws}.zarr",
                              CacheConfig(k=args.k, tail_samples=draws, device=args.device), progress=False)
            capture_s[draws] = time.perf_counter() - start

        student = dict(d_model=128, n_layers=4, n_heads=4, d_ff=344, max_steps=args.steps, kd_weight=args.kd_weight,
                       checkpoint_every=10**6, device=args.device)
        cached = f"cached top-{args.k}"
        runs = {cached: (0, {})}
        runs |= {f"top-{args.k} + {d} draws": (d, {}) for d in args.tail_samples}
        runs["online full-vocab"] = (0, {"online_teacher": args.teacher})
        seconds = {}
        for name, (draws, extra) in runs.items():
            start = time.perf_counter()
            train_student.main(tmp / f"cache-{draws}.zarr", tmp / name, StudentConfig(**student, **extra), progress=False)
            seconds[name] = time.perf_counter() - start
        sizes = {d: cache_stats(open_cache(path), path)["bytes_per_token"] for d in capture_s
                 for path in [tmp / f"cache-{d}.zarr"]}

        rows = np.asarray(open_token_store(Path(args.corpus))["validation"][: args.eval_sequences])
        teacher = load_causal_lm(args.teacher, device)
        students = {name: load_causal_lm(str(tmp / name), device) for name in seconds}
        results = evaluate_models(teacher, students, rows, 8, device, progress=False)

    print(header("online KD reference"))
    print(f"medium student (1.84M), {args.steps} steps, kd_weight {args.kd_weight}, {rows.size:,} validation tokens")
    online = results["online full-vocab"]["perplexity"]
    for name in seconds:
        r = results[name]
        draws = runs[name][0] if name != "online full-vocab" else None
        size = f"  cache {sizes[draws]:6.1f} B/token" if draws is not None else ""
        print(f"{name:<24} val perplexity {r['perplexity']:8.2f} ({r['perplexity'] / online:.3f}x online)  "
              f"KL to teacher {r['kl_to_teacher']:.4f}  train {seconds[name]:6.1f} s{size}")
    ratio = results[cached]["perplexity"] / online
    print(f"perplexity cached / online = {ratio:.3f} (target <= 1.01)")
    offline = capture_s[0] + 3 * seconds[cached]
    online_cost = 3 * seconds["online full-vocab"]
    print(f"three students: one capture ({capture_s[0]:.0f} s) + three cached trainings = {offline:.0f} s; "
          f"three online trainings = {online_cost:.0f} s; offline / online = {offline / online_cost:.2f}")
    for draws in args.tail_samples:
        name = f"top-{args.k} + {draws} draws"
        offline = capture_s[draws] + 3 * seconds[name]
        print(f"  with {draws} draws: capture {capture_s[draws]:.0f} s; offline / online = {offline / online_cost:.2f}")


if __name__ == "__main__":
    main()
