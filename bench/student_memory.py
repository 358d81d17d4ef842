"""A student's training step at real vocabularies: peak memory above the model, and step time.

    python bench/student_memory.py [--vocab 8192 32768 151936] [--shapes 4x512 8x1024] [--repeats 2]
    python bench/student_memory.py --per-sequence [--code-of DIR]

`--per-sequence`: through `pipeline train-student` itself at V = 151,936 (a corpus of the plays
tokenized for a teacher whose head is padded to 151,936 ids, as Qwen's is; its cache of 64
sequences; a 2-layer d-256 student, 3 steps): the peak RSS of the whole command at micro-batch 1 and
8, and (peak at 8 - peak at 1) / 7, the memory each sequence of the micro-batch costs. `--code-of
DIR` runs another checkout's code instead (e.g. a worktree of an earlier commit), for a before/after.

One fresh process per (vocabulary, batch x length, method), each one forward + backward of a 2-layer,
d-256 Llama student (tied embeddings, as `train-student` builds them) on a batch of cached targets
(top-64 + tail mass + 8 tail draws, random: the cost does not depend on the values). Methods:

- `logits`: today's logits-based loss (`distillation_loss`: the model's (B, T, V) logits, then the
  loss fused over them);
- `fused`: the fused linear loss (`hidden_and_head` + `linear_distillation_loss`): no (B, T, V) tensor;
- `hf`: Hugging Face's own hard-label loss (`model(input_ids, labels=...)`), the common baseline;
- `trunk`: the model without its loss (the hidden states' sum), the floor any loss adds to;
- `liger` / `cce`: Liger-Kernel's or Cut Cross-Entropy's fused linear cross-entropy (hard labels), when
  installed and runnable here (both need Triton, so a GPU): otherwise the row says why not.

Memory: on the CPU the process's peak RSS (VmHWM, reset just before the step) minus its RSS before
it, the model and the batch already built; on a GPU the peak allocated bytes minus those before.
Step time: the median of --repeats steps after one warm-up step.
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
from pathlib import Path
from pipeline.models import build_llama, hidden_and_head
from pipeline.distill.batch import distillation_loss, linear_distillation_loss

vocab, batch_size, seq_len, method, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
model = build_llama(vocab, 256, 2, 4, 688, seq_len).to(device).train()
k, draws = 64, 8
ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
         "topk_ids": torch.randint(0, vocab, (batch_size, seq_len, k), device=device),
         "topk_logprobs": torch.log_softmax(torch.randn(batch_size, seq_len, k + 1, device=device), -1)[..., :k],
         "tail_logprob": torch.full((batch_size, seq_len), -1.0, device=device),
         "tail_ids": torch.randint(0, vocab, (batch_size, seq_len, draws), device=device)}
autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

def step():
    with autocast:
        if method == "logits":
            loss = distillation_loss(model(input_ids=ids).logits, batch).loss
        elif method == "fused":
            hidden, head = hidden_and_head(model, input_ids=ids)
            loss = linear_distillation_loss(hidden, head, batch).loss
        elif method == "hf":
            loss = model(input_ids=ids, labels=ids).loss
        elif method == "trunk":
            hidden, head = hidden_and_head(model, input_ids=ids)
            loss = hidden.float().sum()
        elif method == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            hidden, head = hidden_and_head(model, input_ids=ids)
            loss = LigerFusedLinearCrossEntropyLoss()(head.weight, hidden[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
        elif method == "cce":
            from cut_cross_entropy import linear_cross_entropy
            hidden, head = hidden_and_head(model, input_ids=ids)
            loss = linear_cross_entropy(hidden, head.weight, ids, shift=1)
    loss.backward()
    model.zero_grad(set_to_none=True)

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
    print(json.dumps({"extra_bytes": extra, "seconds": sorted(times)[len(times) // 2]}))
except (ImportError, RuntimeError) as error:  # a method that cannot run here (no Triton, no GPU)
    print(json.dumps({"skipped": f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"}))
"""

METHODS = ("trunk", "logits", "fused", "hf", "liger", "cce")


def measure(vocab: int, batch: int, seq_len: int, method: str, repeats: int) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(vocab), str(batch), str(seq_len), method, str(repeats)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"skipped": f"exit {done.returncode}" + (" (out of memory?)" if done.returncode in (-9, 137) else "")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_sequence(code: Path | None, work: Path) -> None:
    """Peak RSS of `pipeline train-student` at micro-batch 1 and 8, V = 151,936 (module docstring)."""
    import os

    import torch

    from pipeline.models import build_llama

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
    parser.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768, 151936])
    parser.add_argument("--shapes", nargs="+", default=["4x512", "8x1024"], help="batch x sequence length")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--per-sequence", action="store_true", help="through `pipeline train-student` (docstring)")
    parser.add_argument("--code-of", type=Path, default=None, help="with --per-sequence: another checkout's code")
    parser.add_argument("--work", type=Path, default=Path("/tmp/student-memory"), help="scratch directory")
    args = parser.parse_args()
    if args.per_sequence:
        args.work.mkdir(parents=True, exist_ok=True)
        print(header("train-student: memory per sequence of the micro-batch"))
        per_sequence(args.code_of, args.work)
        return
    print(header("student training step: peak memory above the model (MB) and seconds per step"))
    print("| V | B x T | method | memory MB | / logits | seconds | / logits |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for vocab in args.vocab:
        for shape in args.shapes:
            batch, seq_len = map(int, shape.split("x"))
            results = {method: measure(vocab, batch, seq_len, method, args.repeats) for method in args.methods}
            today = results.get("logits", {})
            for method, result in results.items():
                if "skipped" in result:
                    print(f"| {vocab:,} | {shape} | {method} | – | – | – | – |  {result['skipped']}")
                    continue
                ratio_memory = (f"{result['extra_bytes'] / today['extra_bytes']:.2f}"
                                if today.get("extra_bytes") else "–")
                ratio_time = f"{result['seconds'] / today['seconds']:.2f}" if today.get("seconds") else "–"
                print(f"| {vocab:,} | {shape} | {method} | {result['extra_bytes'] / 1e6:,.0f} | {ratio_memory} | "
                      f"{result['seconds']:.2f} | {ratio_time} |", flush=True)


if __name__ == "__main__":
    main()
