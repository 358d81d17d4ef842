"""Side by side with the peers: the same teacher outputs encoded by this cache, DistillKit's
LogprobCompressor, Megatron's offline format and plain top-k + zstd; bytes, fidelity, and the quality
of the same student trained from each encoding's decoded targets.

    python bench/peers.py --distillkit PATH [--teacher data/teacher] [--corpus data/corpus]
                          [--train-sequences 512] [--eval-sequences 64] [--steps 120] [--chart docs/peers.png]

PATH is a local checkout of arcee-ai/DistillKit (not on the package index; not vendored here):
its `distillkit.compression` is imported from there, with the configurations of its README
(recommended: k 128, 16 exact bf16 + polynomial; budget: k 50, 1 exact + polynomial) and the
recommended scheme at k 64. Megatron's offline format is reimplemented from its description: top-k
raw logits in fp16, ids as uint16 plus a packed 17th bit, the log-sum-exp in fp32, zstd. Plain: fp16
log-probs and uint32 ids, zstd. Ours: the real `pipeline cache-logits` (top-k ids + 1/16-nat
log-probs + exact tail mass, with and without 8 tail draws).

Bytes: the targets' payload per token (ids, values, tail / normaliser, draws), input ids left out
(every format needs them). Fidelity, over the first 16 training sequences against the exact teacher:
value-KL (KL of the exact top-k + tail to the decoded top-k + tail, each at its own k), full KL (the
exact full distribution to the decoded top-k with the rest spread uniformly) and the exact top-k
mass. Students: the same Llama (d 64, 2 layers), seed, batches, steps, kd_weight 0.8 and loss
(pipeline.distillation_loss: top-k + a tail bucket, tail draws where present), evaluated on held-out
sequences against the teacher's full distribution: perplexity and KL(teacher || student).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import header  # noqa: E402

from pipeline.api import distillation_loss  # noqa: E402
from pipeline.models.devices import resolve_device  # noqa: E402
from pipeline.models.load import build_llama, load_causal_lm, resolve_teacher  # noqa: E402
from pipeline.optim import lr_at, make_optimizer, set_lr  # noqa: E402
from pipeline.corpus.token_store import STORE_NAME, TOKENIZER_NAME, open_token_store  # noqa: E402
from pipeline.models.head import hidden_and_head  # noqa: E402

K_MAX = 200
FIDELITY_SEQUENCES = 16
DRAWS = 8


# --- the teacher's exact outputs ------------------------------------------------------------------

@torch.inference_mode()
def teacher_outputs(model, rows: np.ndarray, ks: list[int], device, full_rows: int = 0) -> dict:
    """Top-K_MAX raw logits and ids, the log-sum-exp, the exact log-mass outside each k in `ks`, and
    (for the first `full_rows` sequences) the full log-probs."""
    out = {"ids": [], "logits": [], "lse": [], "tail": {k: [] for k in ks}, "full": []}
    for lo in range(0, len(rows), 8):
        ids = torch.from_numpy(rows[lo : lo + 8].astype(np.int64)).to(device)
        hidden, head = hidden_and_head(model, input_ids=ids)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for s in range(0, hidden.shape[0], 1024):
            logits = head.logits(hidden[s : s + 1024])  # (n, V) fp32
            lse = torch.logsumexp(logits, -1)
            values, top = logits.topk(K_MAX, dim=-1)
            out["ids"].append(top.cpu()), out["logits"].append(values.cpu()), out["lse"].append(lse.cpu())
            for k in ks:
                rest = logits.scatter(-1, top[:, :k], -math.inf)
                out["tail"][k].append((torch.logsumexp(rest, -1) - lse).cpu())
            if lo < full_rows:
                out["full"].append((logits - lse[:, None]).cpu())
    return {"ids": torch.cat(out["ids"]), "logits": torch.cat(out["logits"]), "lse": torch.cat(out["lse"]),
            "tail": {k: torch.cat(v) for k, v in out["tail"].items()},
            "full": torch.cat(out["full"])[: full_rows * rows.shape[1]] if out["full"] else None}


# --- the encodings: each returns (payload bytes, decoded targets {topk_ids, topk_logprobs, tail_logprob[, tail_ids]}) ---

def _implied_tail(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum p) of decoded top-k log-probs (the mass a format without a stored tail implies)."""
    mass = logprobs.double().exp().sum(-1).clamp(max=1 - 1e-6)
    return torch.log1p(-mass).float()


def _zstd(*arrays: np.ndarray, level: int = 3) -> int:
    import zstandard

    compressor = zstandard.ZstdCompressor(level=level)
    return sum(len(compressor.compress(np.ascontiguousarray(a).tobytes())) for a in arrays)


def megatron(exact: dict, k: int) -> tuple[int, dict]:
    ids = exact["ids"][:, :k].numpy()
    low, high = (ids & 0xFFFF).astype(np.uint16), np.packbits((ids >> 16).astype(np.uint8) & 1, axis=-1)
    values = exact["logits"][:, :k].numpy().astype(np.float16)
    lse = exact["lse"].numpy().astype(np.float32)
    size = sum(_zstd(a[i : i + 4096]) for a in (low, high, values, lse) for i in range(0, len(a), 4096))
    decoded = torch.from_numpy(values.astype(np.float32)) - torch.from_numpy(lse)[:, None]
    return size, {"topk_ids": torch.from_numpy(ids.astype(np.int64)), "topk_logprobs": decoded,
                  "tail_logprob": _implied_tail(decoded)}


def plain(exact: dict, k: int) -> tuple[int, dict]:
    ids = exact["ids"][:, :k].numpy().astype(np.uint32)
    logprobs = (exact["logits"][:, :k] - exact["lse"][:, None]).numpy().astype(np.float16)
    size = sum(_zstd(a[i : i + 4096]) for a in (ids, logprobs) for i in range(0, len(a), 4096))
    decoded = torch.from_numpy(logprobs.astype(np.float32))
    return size, {"topk_ids": torch.from_numpy(ids.astype(np.int64)), "topk_logprobs": decoded,
                  "tail_logprob": _implied_tail(decoded)}


DISTILLKIT = {  # its README's configurations (and the recommended scheme at k = 64)
    "DistillKit recommended": dict(k=128, exact_k=16, polynomial_terms=[0, 1, 2, 3, 4, "sqrt"]),
    "DistillKit budget": dict(k=50, exact_k=1, polynomial_terms=[0, 1, "sqrt"]),
    "DistillKit recommended @ k 64": dict(k=64, exact_k=16, polynomial_terms=[0, 1, 2, 3, 4, "sqrt"]),
}


def distillkit(exact: dict, settings: dict, vocab: int) -> tuple[int, dict]:
    from distillkit.compression.compressor import LogprobCompressor
    from distillkit.compression.config import DistributionQuantizationConfig

    config = DistributionQuantizationConfig(d=vocab, exact_dtype="bfloat16", term_dtype="float32", residual_bins=[],
                                            delta_encoding=False, error_diffusion=False, **settings)
    compressor = LogprobCompressor(config)
    k = settings["k"]
    ids, logprobs = exact["ids"][:, :k], exact["logits"][:, :k] - exact["lse"][:, None]
    size, decoded_ids, decoded = 0, [], []
    for i in range(0, len(ids), 4096):
        packed = compressor.compress_from_sparse(ids[i : i + 4096], logprobs[i : i + 4096])
        size += sum(int(v.numel()) for v in packed.values())  # uint8 payloads
        got_ids, got = compressor.decompress_to_sparse(packed)
        decoded_ids.append(got_ids.long()), decoded.append(got.float())
    decoded = torch.cat(decoded)
    return size, {"topk_ids": torch.cat(decoded_ids), "topk_logprobs": decoded, "tail_logprob": _implied_tail(decoded)}


def ours(corpus: Path, teacher: str, k: int, draws: int, scratch: Path) -> tuple[int, dict, float, float]:
    """A real capture (pipeline cache-logits): its targets' bytes and arrays, and the seconds its codecs
    take to encode (the arrays written again with the same codecs) and to decode them."""
    out = scratch / f"ours-k{k}-d{draws}.zarr"
    params = scratch / f"ours-k{k}-d{draws}.yaml"
    params.write_text(json.dumps({"cache_logits": {"k": k, "tail_samples": draws, "sequences_per_shard": 64}}))
    command = [sys.executable, "-m", "pipeline", "cache-logits", "--teacher", teacher, "--corpus", str(corpus),
               "--out", str(out), "--params", str(params)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(result.stdout[-2000:] + result.stderr[-2000:])
    group = zarr.open_group(out, mode="r")
    names = ["topk_ids", "topk_logprobs", "tail_logprob"] + (["tail_ids"] if draws else [])
    size = sum(_disk_bytes(out / name) for name in names)
    start = time.perf_counter()
    arrays = {name: np.asarray(group[name][:]) for name in names}
    decode_s = time.perf_counter() - start
    again = zarr.open_group(scratch / f"again-k{k}-d{draws}.zarr", mode="w", zarr_format=3)
    start = time.perf_counter()
    for name, values in arrays.items():
        src = group[name]
        again.create_array(name, shape=src.shape, dtype=src.dtype, chunks=src.chunks, shards=src.shards,
                           filters=src.filters, compressors=src.compressors, serializer=src.serializer,
                           fill_value=src.fill_value)[:] = values
    encode_s = time.perf_counter() - start
    n = arrays["topk_ids"].shape[0] * arrays["topk_ids"].shape[1]
    targets = {name: torch.from_numpy(a.reshape(n, *a.shape[2:]).astype(np.int64 if a.dtype.kind == "u" else np.float32))
               for name, a in arrays.items()}
    return size, targets, encode_s, decode_s


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- fidelity ------------------------------------------------------------------------------------

def fidelity(exact: dict, targets: dict, k: int, n: int) -> dict[str, float]:
    ids, decoded, tail = targets["topk_ids"][:n], targets["topk_logprobs"][:n].double(), targets["tail_logprob"][:n].double()
    full = exact["full"][:n].double()  # (n, V)
    true_top = full.gather(-1, ids)
    true_tail = torch.log1p(-true_top.exp().sum(-1).clamp(max=1 - 1e-12))
    p = torch.cat([true_top, true_tail[:, None]], -1)
    q = torch.log_softmax(torch.cat([decoded, tail[:, None]], -1), -1)  # renormalised, as the loss does
    value_kl = (p.exp() * (p - q.clamp(min=-60))).sum(-1)
    vocab = full.shape[1]
    spread = q[:, -1] - math.log(vocab - k)  # the rest spread uniformly
    dense = spread[:, None].expand(-1, vocab).clone().scatter(-1, ids, q[:, :-1])
    full_kl = (full.exp() * (full - dense.clamp(min=-60))).sum(-1)
    mass = exact["full"][:n].topk(k, dim=-1).values.double().exp().sum(-1)
    return {"value_kl": float(value_kl.mean()), "full_kl": float(full_kl.mean()), "topk_mass": float(mass.mean())}


# --- students --------------------------------------------------------------------------------------

def train_student(rows: np.ndarray, targets: dict | None, vocab: int, seq_len: int, steps: int, batch: int,
                  kd_weight: float, device) -> torch.nn.Module:
    torch.manual_seed(0)
    student = build_llama(vocab, d_model=64, n_layers=2, n_heads=4, d_ff=172, max_seq_len=seq_len).to(device)
    optimizer = make_optimizer(student, 2e-3, 0.1)
    order = np.random.default_rng(0)
    sequence = np.concatenate([order.permutation(len(rows)) for _ in range(steps * batch // len(rows) + 1)])
    student.train()
    for step in range(steps):
        set_lr(optimizer, lr_at(step, steps, 20, 2e-3))
        pick = sequence[step * batch : (step + 1) * batch]
        input_ids = torch.from_numpy(rows[pick].astype(np.int64)).to(device)
        if targets is None:  # the hard-label baseline: the loss needs some targets; kd_weight 0 ignores them
            positions = np.zeros(len(pick) * seq_len, dtype=np.int64)
            chosen = {"topk_ids": torch.zeros(len(positions), 1, dtype=torch.long),
                      "topk_logprobs": torch.zeros(len(positions), 1), "tail_logprob": torch.full((len(positions),), -60.0)}
        else:
            positions = (pick[:, None] * seq_len + np.arange(seq_len)).ravel()
            chosen = {name: values[positions] for name, values in targets.items()}
        b = {name: values.reshape(len(pick), seq_len, *values.shape[1:]).to(device) for name, values in chosen.items()}
        logits = student(input_ids=input_ids).logits
        loss = distillation_loss(logits, {"input_ids": input_ids, **b}, kd_weight=kd_weight).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return student.eval()


@torch.inference_mode()
def evaluate(student, teacher, rows: np.ndarray, device) -> dict[str, float]:
    ce, kl, n = 0.0, 0.0, 0
    for lo in range(0, len(rows), 8):
        ids = torch.from_numpy(rows[lo : lo + 8].astype(np.int64)).to(device)
        s = torch.log_softmax(student(input_ids=ids).logits.float(), -1)
        t = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
        ce += float(-s[:, :-1].gather(-1, ids[:, 1:, None]).sum())
        kl += float((t.exp() * (t - s)).sum())
        n += ids.numel()
    positions = len(rows) * (rows.shape[1] - 1)
    return {"perplexity": math.exp(ce / positions), "kl_to_teacher": kl / n}


# --- the run ---------------------------------------------------------------------------------------

def bench_corpus(corpus: Path, train_rows: np.ndarray, eval_rows: np.ndarray, out: Path) -> Path:
    """A corpus directory whose train split is exactly the benchmark's rows (what `cache-logits` reads)."""
    source = open_token_store(corpus)
    out.mkdir(parents=True)
    (out / TOKENIZER_NAME).write_text((corpus / TOKENIZER_NAME).read_text())
    group = zarr.open_group(out / STORE_NAME, mode="w", zarr_format=3)
    for name, rows in (("train", train_rows), ("validation", eval_rows)):
        group.create_array(name, data=rows, chunks=(256, rows.shape[1]))
    group.attrs.update({**dict(source.attrs), "corpus_fingerprint": f"peers-{len(train_rows)}"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distillkit", required=True, help="a local checkout of arcee-ai/DistillKit")
    parser.add_argument("--teacher", default="data/teacher")
    parser.add_argument("--corpus", default="data/corpus")
    parser.add_argument("--train-sequences", type=int, default=512)
    parser.add_argument("--eval-sequences", type=int, default=64)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--ours-k", default="32,64,128,200")
    parser.add_argument("--chart", default=None, help="write the chart (perplexity against bytes/token) here")
    parser.add_argument("--json", default=None, help="write every result here")
    parser.add_argument("--device", default="auto")
    opts = parser.parse_args()
    sys.path.insert(0, str(Path(opts.distillkit).resolve()))
    device = resolve_device(opts.device)
    teacher_dir = resolve_teacher(opts.teacher)
    teacher = load_causal_lm(teacher_dir, device).eval()
    store = open_token_store(opts.corpus)
    vocab, seq_len = store.attrs["vocab_size"], store.attrs["seq_len"]
    train = np.asarray(store["train"][:])
    train_rows = train[:: max(1, len(train) // opts.train_sequences)][: opts.train_sequences]  # spread over the plays
    eval_rows = np.asarray(store["validation"][: opts.eval_sequences])
    n_fid = FIDELITY_SEQUENCES * seq_len
    ks = sorted({8, 16, 32, 50, 64, 128, K_MAX, *map(int, opts.ours_k.split(","))})

    start = time.perf_counter()
    exact = teacher_outputs(teacher, train_rows, ks, device, full_rows=FIDELITY_SEQUENCES)
    print(f"teacher over {len(train_rows)} x {seq_len} positions: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    n = len(train_rows) * seq_len
    results = []

    def record(method: str, label: str, k: int, size: int, targets: dict, seconds: float) -> None:
        """`seconds`: the codec's encode + decode of all n positions (the teacher's forward not included)."""
        row = {"method": method, "encoding": label, "k": k, "bytes_per_token": size / n, **fidelity(exact, targets, k, n_fid),
               "codec_positions_per_s": n / seconds}
        started = time.perf_counter()
        student = train_student(train_rows, targets, vocab, seq_len, opts.steps, 16, 0.8, device)
        row.update(evaluate(student, teacher, eval_rows, device), train_seconds=time.perf_counter() - started)
        results.append(row)
        print(json.dumps(row), file=sys.stderr)

    def timed(fn, *args):
        began = time.perf_counter()
        size, targets = fn(*args)
        return size, targets, time.perf_counter() - began

    with tempfile.TemporaryDirectory() as scratch:
        corpus = bench_corpus(Path(opts.corpus), train_rows, eval_rows, Path(scratch) / "corpus")
        for k in map(int, opts.ours_k.split(",")):
            for draws in ((0, DRAWS) if k == 64 else (DRAWS,)):
                size, targets, encode_s, decode_s = ours(corpus, str(teacher_dir), k, draws, Path(scratch))
                label = f"ours k {k}" + (f" + {draws} draws" if draws else " (no draws)")
                record("ours", label, k, size, targets, encode_s + decode_s)
    for k in (64, 128):
        size, targets, seconds = timed(megatron, exact, k)
        record("Megatron (fp16 logits, 17-bit ids, zstd)", f"Megatron k {k}", k, size, targets, seconds)
    for k in (64, 128):
        size, targets, seconds = timed(plain, exact, k)
        record("plain top-k (fp16 + uint32 ids, zstd)", f"plain k {k}", k, size, targets, seconds)
    for label, settings in DISTILLKIT.items():
        size, targets, seconds = timed(distillkit, exact, settings, vocab)
        record("DistillKit LogprobCompressor", label, settings["k"], size, targets, seconds)
    baseline = evaluate(train_student(train_rows, None, vocab, seq_len, opts.steps, 16, 0.0, device), teacher, eval_rows, device)

    print(header(f"peers on the same teacher outputs: {teacher_dir}, vocab {vocab:,}"))
    print(f"# {len(train_rows)} training sequences x {seq_len}, {opts.steps} steps of batch 16, kd_weight 0.8; "
          f"held out: {len(eval_rows)} validation sequences; hard-label baseline perplexity {baseline['perplexity']:.2f}, "
          f"KL {baseline['kl_to_teacher']:.3f}")
    print("| encoding | B/token | value-KL | full KL | top-k mass | student perplexity | KL(teacher‖student) | encode + decode, positions/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(results, key=lambda r: (r["method"], r["bytes_per_token"])):
        codec = f"{r['codec_positions_per_s']:,.0f}"
        print(f"| {r['encoding']} | {r['bytes_per_token']:.1f} | {r['value_kl']:.2e} | {r['full_kl']:.3f} | "
              f"{r['topk_mass']:.3f} | {r['perplexity']:.2f} | {r['kl_to_teacher']:.3f} | {codec} |")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"baseline": baseline, "results": results, "vocab": vocab}, indent=1))
    if opts.chart:
        chart(results, baseline, vocab, Path(opts.chart))


def chart(results: list[dict], baseline: dict, vocab: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method in sorted({r["method"] for r in results}):
        points = sorted((r for r in results if r["method"] == method and "no draws" not in r["encoding"]),
                        key=lambda r: r["bytes_per_token"])
        ax.plot([r["bytes_per_token"] for r in points], [r["perplexity"] for r in points], marker="o", label=method)
        for r in points:
            ax.annotate(f"k {r['k']}", (r["bytes_per_token"], r["perplexity"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for r in results:
        if "no draws" in r["encoding"]:
            ax.plot([r["bytes_per_token"]], [r["perplexity"]], marker="x", color="black", linestyle="none",
                    label="ours k 64, no tail draws")
    ax.axhline(baseline["perplexity"], color="gray", linestyle=":", label="hard labels only")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per token (targets' payload)")
    ax.set_ylabel("student held-out perplexity (lower is better)")
    ax.set_title(f"The same student from each encoding of the same teacher outputs (vocab {vocab:,})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
