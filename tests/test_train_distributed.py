"""train-student under torchrun (gloo on the CPU): 2 processes x batch b train as 1 process x 2b,
DDP and FSDP2; a kill -9 after a checkpoint resumes exactly (with the same command, or on another
number of processes with the same global batch); only rank 0 writes; the held-out check is the same.
The DDP run is on chat data, whose loss masks count different numbers of positions on each process:
the same curve then needs the step's mean over all processes' positions, not a mean of means."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil  # a dependency of dvc
import pytest
import torch
from safetensors.torch import load_file

from pipeline.settings.cache import CacheConfig
from pipeline.settings.student import StudentConfig
from pipeline.train.log import read_log
from stages import cache_logits, train_student

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SETTINGS = dict(d_model=64, n_layers=2, n_heads=4, d_ff=172, max_steps=30, checkpoint_every=10, eval_every=10,
                eval_sequences=16, shuffle_window=32, num_workers=1, device="cpu", lr=3e-3, warmup_steps=5)
GLOBAL_BATCH = 8


def make_job(root: Path, teacher: Path, corpus: Path, cache: Path | None = None) -> tuple[Path, list[str]]:
    """params.yaml, train (unless given) and validation caches, and the reference: one process with the
    whole global batch."""
    (root / "params.yaml").write_text("train_student:\n" + "".join(f"  {k}: {v}\n" for k, v in SETTINGS.items()))
    for split in ("train", "validation") if cache is None else ("validation",):
        cfg = CacheConfig(k=8, split=split, sequences_per_chunk=4, sequences_per_shard=16, tail_samples=2)
        cache_logits.main(str(teacher), corpus, root / f"{split}.zarr", cfg, progress=False)
    cache, val = cache or root / "train.zarr", root / "validation.zarr"
    train_student.main(cache, root / "one", StudentConfig(**SETTINGS, batch_size=GLOBAL_BATCH), progress=False,
                       eval_cache=val)
    return root, ["train-student", "--cache", str(cache), "--eval-cache", str(val), "--params", "params.yaml"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, llama_teacher, corpus_dir, cache_path):
    return make_job(tmp_path_factory.mktemp("train-dist"), llama_teacher, corpus_dir, cache_path)


@pytest.fixture(scope="module")
def chat_job(tmp_path_factory, chat):
    return make_job(tmp_path_factory.mktemp("train-dist-chat"), chat["teacher"], chat["corpus"])


def launch(root: Path, args: list[str], out: str, batch_size: int, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tests" / "jobs" / "out_per_rank.py"), *args, "--out", out, "--batch-size", str(batch_size), *flags]
    return subprocess.Popen(command, cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after_first_checkpoint(run: subprocess.Popen, checkpoint: Path) -> None:
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0][-3000:]
        time.sleep(0.05)
    launcher = psutil.Process(run.pid)
    victims = [launcher, *launcher.children(recursive=True)]  # torchrun and both workers (in their own sessions)
    for victim in victims:
        victim.kill()  # SIGKILL, mid-run
    psutil.wait_procs(victims, timeout=30)
    run.communicate()


def assert_same_training(out: Path, reference: Path, tolerance: float = 2e-5) -> None:
    """The same curve step by step (train and held-out losses) and the same final weights."""
    log, ref = read_log(out), read_log(reference)
    assert [row["step"] for row in log] == [row["step"] for row in ref] == list(range(1, 31))
    for row, expected in zip(log, ref):
        for name in ("lr", "loss", "kd", "ce", "val_loss", "val_kd", "val_ce"):
            assert (name in row) == (name in expected)
            if name in row:
                assert abs(row[name] - expected[name]) <= tolerance, (row["step"], name, row[name], expected[name])
    a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tolerance)


@pytest.mark.slow
def test_ddp_killed_after_a_checkpoint_resumes_and_trains_as_one_process(chat_job):
    root, args = chat_job
    run = launch(root, args, "ddp", GLOBAL_BATCH // 2)
    kill_after_first_checkpoint(run, root / "ddp" / "rank0" / "checkpoint.pt")
    assert not (root / "ddp" / "rank0" / "metrics.json").exists()  # killed mid-run
    again = launch(root, args, "ddp", GLOBAL_BATCH // 2)  # the same command
    output = again.communicate(timeout=600)[0]
    assert again.returncode == 0, output[-3000:]
    assert "2 processes x batch_size 4 x grad_accum 1 = global batch 8 sequences" in output
    assert_same_training(root / "ddp" / "rank0", root / "one")
    assert not (root / "ddp" / "rank1").exists()  # rank 1 wrote nothing: no checkpoint, log or model
    assert sum(1 for line in output.splitlines() if line.startswith("student:")) == 1  # one summary


@pytest.mark.slow
def test_fsdp_killed_on_two_processes_resumes_on_one_with_the_same_global_batch(job):
    root, args = job
    run = launch(root, args, "fsdp", GLOBAL_BATCH // 2, "--parallelism", "fsdp")
    kill_after_first_checkpoint(run, root / "fsdp" / "rank0" / "checkpoint.pt")
    out = root / "fsdp" / "rank0"
    assert not (out / "metrics.json").exists() and torch.load(out / "checkpoint.pt", weights_only=False)["step"] < 30
    with pytest.raises(Exception, match="global batch of 8 sequences .* this run's is 4"):
        train_student.main(args[2], out, StudentConfig(**SETTINGS, batch_size=4), progress=False, eval_cache=args[4])
    train_student.main(args[2], out, StudentConfig(**SETTINGS, batch_size=GLOBAL_BATCH), progress=False,
                       eval_cache=args[4])  # one process now, twice the batch: the same global batch
    assert_same_training(out, root / "one")
    assert not (root / "fsdp" / "rank1").exists()
