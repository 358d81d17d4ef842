"""Online KD reference: a student distilled from the cached top-k vs one distilled online from the
teacher's full distribution (same loss code, same batches, same steps); and the cost of three
students each way (one capture + three cached trainings vs three online trainings).

    python bench/online_vs_cached.py --corpus data/corpus --teacher data/teacher [--steps 200]
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

from pipeline.capture import CacheConfig  # noqa: E402
from pipeline.evaluate import evaluate_models  # noqa: E402
from pipeline.models import load_causal_lm, resolve_device  # noqa: E402
from pipeline.student import StudentConfig  # noqa: E402
from pipeline.token_store import open_token_store  # noqa: E402
from stages import cache_logits, train_student  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/corpus")
    parser.add_argument("--teacher", default="data/teacher")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kd-weight", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=64, help="top-k of the cache")
    parser.add_argument("--eval-sequences", type=int, default=192)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        cache_logits.main(args.teacher, Path(args.corpus), tmp / "cache.zarr", CacheConfig(k=args.k, device=args.device), progress=False)
        capture_s = time.perf_counter() - start

        student = dict(d_model=128, n_layers=4, n_heads=4, d_ff=344, max_steps=args.steps, kd_weight=args.kd_weight,
                       checkpoint_every=10**6, device=args.device)
        seconds = {}
        cached = f"cached top-{args.k}"
        for name, extra in ((cached, {}), ("online full-vocab", {"online_teacher": args.teacher})):
            start = time.perf_counter()
            train_student.main(tmp / "cache.zarr", tmp / name, StudentConfig(**student, **extra), progress=False)
            seconds[name] = time.perf_counter() - start

        rows = np.asarray(open_token_store(Path(args.corpus))["validation"][: args.eval_sequences])
        teacher = load_causal_lm(args.teacher, device)
        students = {name: load_causal_lm(str(tmp / name), device) for name in seconds}
        results = evaluate_models(teacher, students, rows, 8, device, progress=False)

    print(header("online KD reference"))
    print(f"medium student (1.84M), {args.steps} steps, kd_weight {args.kd_weight}, {rows.size:,} validation tokens")
    for name in seconds:
        r = results[name]
        print(f"{name:<18} val perplexity {r['perplexity']:8.2f}  KL to teacher {r['kl_to_teacher']:.4f}  train {seconds[name]:6.1f} s")
    ratio = results[cached]["perplexity"] / results["online full-vocab"]["perplexity"]
    print(f"perplexity cached / online = {ratio:.3f} (target <= 1.01)")
    offline = capture_s + 3 * seconds[cached]
    online = 3 * seconds["online full-vocab"]
    print(f"three students: one capture ({capture_s:.0f} s) + three cached trainings = {offline:.0f} s; "
          f"three online trainings = {online:.0f} s; offline / online = {offline / online:.2f}")


if __name__ == "__main__":
    main()
