"""A student's loss at real sizes: peak memory above the inputs, and the time of a forward + backward.

    python bench/student_memory.py [--hidden 256 2048 4096] [--positions 1024 4096 8192] [--dtypes bf16 fp32]
                                   [--vocab 151936] [--methods fused logits hf] [--repeats 1]
    python bench/student_memory.py --per-sequence [--code-of DIR]

`--layers L`: a student step instead: the hidden states from a Llama of L layers (d, its weights fp32
with their gradients allocated), then the loss: `fused` (`hidden_and_head` + the fused loss), `logits`
(the model's logits, then the loss) or `hf` (the model's own loss).

One fresh process per figure (vocabulary V, hidden size d, N positions, dtype, method), measured as
issue 31 states it: the head's weight (V, d) fp32 with its `.grad` already allocated, hidden states
(1, N, d) fp32 (their `.grad` allocated too), cached targets of the default cache (top-64 + tail mass +
8 tail draws, random: the cost does not depend on the values), forward + backward under
`torch.autocast(bfloat16)` (`bf16`: fp32 master weights, bf16 matmuls, as mixed-precision training runs)
or without it (`fp32`). Methods, all through the public API:

- `fused`: `pipeline.linear_distillation_loss(hidden, LogitHead(weight), batch)`: what train-student runs;
- `logits`: `F.linear(hidden, weight)`, then `pipeline.distillation_loss(logits, batch)`;
- `hf`: `F.linear(hidden, weight)`, then Hugging Face's own causal-LM loss (`ForCausalLMLoss`, hard
  labels only), the common baseline;
- `liger` / `cce`: Liger-Kernel's or Cut Cross-Entropy's fused linear cross-entropy (hard labels), where
  installed and runnable (both need Triton, so a GPU): otherwise the row says why not.

Memory: on the CPU the process's peak RSS (VmHWM, reset just before the step) minus its RSS before it,
inputs and gradients already built; on a GPU the peak allocated bytes minus those before. Time: the
median of --repeats further steps (the first is the memory step and the warm-up).

`--per-sequence`: through `pipeline train-student` itself at V = 151,936 (a corpus of the plays
tokenized for a teacher whose head is padded to 151,936 ids, as Qwen's is; its cache of 64
sequences; a 2-layer d-256 student, 3 steps): the peak RSS of the whole command at micro-batch 1 and
8, and (peak at 8 - peak at 1) / 7, the memory each sequence of the micro-batch costs. `--code-of
DIR` runs another checkout's code instead (e.g. a worktree of an earlier commit), for a before/after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header  # noqa: E402

CHILD = r"""
import json, sys, time, torch
import torch.nn.functional as F
from pathlib import Path
from pipeline import LogitHead, distillation_loss, linear_distillation_loss

vocab, d, n, dtype, method, repeats, layers = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                               sys.argv[5], int(sys.argv[6]), int(sys.argv[7]))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
g = torch.Generator(device=device).manual_seed(0)
k, draws = 64, 8
weight = (torch.randn(vocab, d, device=device, generator=g) * 0.02).requires_grad_()
hidden = torch.randn(1, n, d, device=device, generator=g).requires_grad_()
weight.grad, hidden.grad = torch.zeros_like(weight), torch.zeros_like(hidden)
ids = torch.randint(0, vocab, (1, n), device=device, generator=g)
if layers:  # a student step: a Llama of `layers` layers (d / 128 heads, 4 key-value heads), untied head
    from pipeline.models.head import hidden_and_head
    from pipeline.models.load import build_llama
    del weight, hidden
    model = build_llama(vocab, d, layers, max(1, d // 128), int(d * 8 / 3 + 127) // 128 * 128, n,
                        n_kv_heads=min(4, max(1, d // 128)), tie_embeddings=False).to(device).train()
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
         "topk_ids": torch.randint(0, vocab, (1, n, k), device=device, generator=g),
         "topk_logprobs": torch.log_softmax(torch.randn(1, n, k + 1, device=device, generator=g), -1)[..., :k],
         "tail_logprob": torch.full((1, n), -1.0, device=device),
         "tail_ids": torch.randint(0, vocab, (1, n, draws), device=device, generator=g)}
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

def step():
    with autocast:
        if layers and method == "fused":
            states, head = hidden_and_head(model, input_ids=ids)
            loss = linear_distillation_loss(states, head, batch).loss
        elif layers and method == "logits":
            loss = distillation_loss(model(input_ids=ids).logits, batch).loss
        elif layers and method == "hf":
            loss = model(input_ids=ids, labels=ids).loss
        elif layers:
            raise ImportError(f"{method}: measured on the head alone (--layers 0)")
        elif method == "fused":
            loss = linear_distillation_loss(hidden, LogitHead(weight), batch).loss
        elif method == "logits":
            loss = distillation_loss(F.linear(hidden, weight), batch).loss
        elif method == "hf":
            from transformers.loss.loss_utils import ForCausalLMLoss
            loss = ForCausalLMLoss(F.linear(hidden, weight), ids, vocab)
        elif method == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            loss = LigerFusedLinearCrossEntropyLoss()(weight, hidden[0, :-1], ids[0, 1:])
        elif method == "cce":
            from cut_cross_entropy import linear_cross_entropy
            loss = linear_cross_entropy(hidden, weight, ids, shift=1)
    loss.backward()

def status(name):  # VmRSS (now) or VmHWM (the peak since the last reset), in bytes
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(name + ":"))
    return int(line.split()[1]) * 1024

try:
    if device.type == "cuda":
        torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
        step(); torch.cuda.synchronize(); extra = torch.cuda.max_memory_allocated() - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
        base = status("VmRSS")
        step()
        extra = status("VmHWM") - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(json.dumps({"extra_bytes": extra, "seconds": sorted(times)[len(times) // 2] if times else None}))
except (ImportError, RuntimeError) as error:  # a method that cannot run here (no Triton, no GPU)
    print(json.dumps({"skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"}))
"""

METHODS = ("fused", "logits", "hf", "liger", "cce")


def measure(vocab: int, d: int, n: int, dtype: str, method: str, repeats: int, layers: int = 0) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(vocab), str(d), str(n), dtype, method, str(repeats),
                           str(layers)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"skipped": f"exit {done.returncode}" + (" (out of memory?)" if done.returncode in (-9, 137) else "")
                           + f" {done.stderr.strip().splitlines()[-1][:100] if done.stderr.strip() else ''}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_sequence(code: Path | None, work: Path) -> None:
    """Peak RSS of `pipeline train-student` at micro-batch 1 and 8, V = 151,936 (module docstring)."""
    import os

    import torch

    from pipeline.models.load import build_llama

    root = code or Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}  # and each command runs in `root`: `python -m` looks there first
    cli = [sys.executable, "-m", "pipeline"]
    teacher, corpus, cache = work / "teacher", work / "corpus", work / "logits.zarr"
    if not cache.exists():
        subprocess.run([*cli, "prepare-corpus", "--out", str(work / "bpe"), "--no-progress"], env=env, check=True,
                       capture_output=True, cwd=root)
        torch.manual_seed(0)
        model = build_llama(151_936, 64, 1, 4, 172, 256)  # a small teacher with Qwen's padded head
        model.save_pretrained(teacher)
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_file=str(work / "bpe" / "tokenizer.json"),
                                eos_token="<|endoftext|>").save_pretrained(teacher)
        subprocess.run([*cli, "prepare-corpus", "--out", str(corpus), "--teacher", str(teacher), "--no-progress"],
                       env=env, check=True, capture_output=True, cwd=root)
        subprocess.run([*cli, "cache-logits", "--teacher", str(teacher), "--corpus", str(corpus), "--out", str(cache),
                        "--max-sequences", "64", "--sequences-per-shard", "64", "--no-progress"],
                       env=env, check=True, capture_output=True, cwd=root)
    peaks = {}
    for batch in (1, 8):
        out = work / f"student-{batch}"
        command = [*cli, "train-student", "--cache", str(cache), "--out", str(out), "--overwrite", "--d-model", "256",
                   "--n-layers", "2", "--d-ff", "688", "--batch-size", str(batch), "--max-steps", "3",
                   "--num-workers", "0", "--checkpoint-every", "1000", "--no-progress"]
        wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
        done = subprocess.run([sys.executable, "-c", wrapper, *command], env=env, capture_output=True, text=True,
                              check=True, cwd=root)
        peaks[batch] = int(done.stdout.split()[-1])
    print(f"train-student at V = 151,936, T = 256 ({code or 'this checkout'}): peak RSS {peaks[1] / 1e6:,.0f} MB at "
          f"micro-batch 1, {peaks[8] / 1e6:,.0f} MB at 8: {(peaks[8] - peaks[1]) / 7 / 1e6:,.0f} MB per sequence")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 2048, 4096], help="hidden sizes d")
    parser.add_argument("--positions", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--methods", nargs="+", default=["fused", "logits", "hf"], choices=METHODS)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps after the memory step")
    parser.add_argument("--layers", type=int, default=0,
                        help="a student step: the hidden states from a Llama of this many layers (0: the head alone)")
    parser.add_argument("--per-sequence", action="store_true", help="through `pipeline train-student` (docstring)")
    parser.add_argument("--code-of", type=Path, default=None, help="with --per-sequence: another checkout's code")
    parser.add_argument("--work", type=Path, default=Path("/tmp/student-memory"), help="scratch directory")
    args = parser.parse_args()
    if args.per_sequence:
        args.work.mkdir(parents=True, exist_ok=True)
        print(header("train-student: memory per sequence of the micro-batch"))
        per_sequence(args.code_of, args.work)
        return
    what = f"a {args.layers}-layer Llama student's step" if args.layers else "a student's loss"
    print(header(f"{what} at V = {args.vocab:,}: memory above the inputs (MB) and seconds per step"))
    print("| dtype | d | positions | method | memory MB | / logits | seconds | / logits |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for dtype in args.dtypes:
        for d in args.hidden:
            for n in args.positions:
                results = {method: measure(args.vocab, d, n, dtype, method, args.repeats, args.layers)
                           for method in args.methods}
                logits = results.get("logits", {})
                for method, result in results.items():
                    if "skipped" in result:
                        print(f"| {dtype} | {d:,} | {n:,} | {method} | – | – | – | – |  {result['skipped']}", flush=True)
                        continue
                    memory = (f"{result['extra_bytes'] / logits['extra_bytes']:.2f}"
                              if logits.get("extra_bytes") else "–")
                    seconds = f"{result['seconds']:.2f}" if result.get("seconds") else "–"
                    speed = (f"{result['seconds'] / logits['seconds']:.2f}"
                             if result.get("seconds") and logits.get("seconds") else "–")
                    print(f"| {dtype} | {d:,} | {n:,} | {method} | {result['extra_bytes'] / 1e6:,.0f} | {memory} | "
                          f"{seconds} | {speed} |", flush=True)


if __name__ == "__main__":
    main()
