"""cache-logits under torchrun (gloo on the CPU): the same cache as one process, shards claimed
by whichever process is free, and a killed job (torchrun's, or one plain process's) finished by
rerunning the same command."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil  # a dependency of dvc
import pytest
import zarr

from pipeline.cache.format import CHECKSUMS, DONE
from pipeline.cache.provenance import read_provenance
from tests.conftest import plays_corpus_and_teacher

PARAMS = "cache_logits:\n  k: 8\n  batch_size: 4\n  sequences_per_chunk: 4\n  sequences_per_shard: 8\n  tail_samples: 2\n"
ARRAYS = ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob", "tail_ids", DONE, CHECKSUMS)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process, and the same for the reference


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus, teacher = plays_corpus_and_teacher(root, 12_000)  # ~110 shards: room for a kill mid-capture
    (root / "params.yaml").write_text(PARAMS)
    args = ["cache-logits", "--teacher", str(teacher), "--corpus", str(corpus), "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "pipeline", *args, "--out", str(root / "one.zarr")], cwd=root, env=ENV,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    return root, args


def torchrun(root: Path, args: list[str], out: str, env: dict | None = None, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "pipeline", *args, "--out", out]
    return subprocess.Popen(command, cwd=root, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def assert_same_cache(a: Path, b: Path) -> None:
    first, second = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert dict(first.attrs) == dict(second.attrs)
    for name in ARRAYS:
        np.testing.assert_array_equal(second[name][:], first[name][:], err_msg=name)


@pytest.mark.slow
def test_two_processes_make_the_same_cache_as_one(job):
    root, args = job
    run = torchrun(root, args, "two.zarr")
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output
    assert_same_cache(root / "one.zarr", root / "two.zarr")  # checksums equal too: byte-identical objects
    last = read_provenance(root / "two.zarr")["runs"][-1]
    assert last["processes"] == 2 and [r["rank"] for r in last["per_process"]] == [0, 1]
    assert all(r["shards_written"] > 0 for r in last["per_process"])  # both took work
    assert sum(r["shards_written"] for r in last["per_process"]) == zarr.open_group(root / "two.zarr")[DONE].size
    summary = [line for line in output.replace("\r", "\n").splitlines() if "shards written now" in line]
    assert len(summary) == 1 and "rank 0:" in summary[0] and "rank 1:" in summary[0]  # one summary, from rank 0
    # each shard records who wrote it: `inspect` reports per writer, matching the run's own count
    stats = json.loads(subprocess.run([sys.executable, "-m", "pipeline", "inspect", "two.zarr", "--json"], cwd=root,
                                      env=ENV, capture_output=True, text=True, check=True).stdout)
    by_rank = {w["rank"]: w["shards"] for w in stats["writers"]}
    assert by_rank == {r["rank"]: r["shards_written"] for r in last["per_process"]}
    assert all(w["device"] == "cpu" and w["dtype"] == "float32" and w["tokens_per_s"] > 0 for w in stats["writers"])


@pytest.mark.slow
def test_a_killed_job_is_finished_by_the_same_command(job):
    root, args = job
    out = root / "killed.zarr"
    run = torchrun(root, args, "killed.zarr")
    flags = out / DONE / "c"
    deadline = time.monotonic() + 300
    while not (flags.exists() and len(list(flags.iterdir())) >= 4) and time.monotonic() < deadline:
        time.sleep(0.01)
    launcher = psutil.Process(run.pid)
    victims = [*launcher.children(recursive=True), launcher]  # the workers (in sessions of their own) first
    for victim in victims:
        victim.kill()  # SIGKILL, mid-capture
    psutil.wait_procs(victims, timeout=30)
    run.wait()
    done = zarr.open_group(out, mode="r")[DONE][:]
    assert 0 < done.sum() < done.size, "the kill should land mid-capture"
    rerun = torchrun(root, args, "killed.zarr")
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output
    assert_same_cache(root / "one.zarr", out)
    assert json.loads(json.dumps(read_provenance(out)))["runs"][-1]["shards_written"] == done.size - done.sum()


@pytest.mark.slow
def test_a_kill_9_of_one_capture_process_then_a_rerun_equals_the_uninterrupted_cache(job):
    """Without torchrun too: `kill -9` of a plain `pipeline cache-logits` mid-capture, then the same command."""
    root, args = job
    command = [sys.executable, "-m", "pipeline", *args, "--out", "one-killed.zarr"]
    victim = subprocess.Popen(command, cwd=root, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = root / "one-killed.zarr" / DONE / "c"
    deadline = time.monotonic() + 300
    while not (flags.exists() and len(list(flags.iterdir())) >= 3) and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.kill()  # SIGKILL
    victim.wait()
    done = zarr.open_group(root / "one-killed.zarr", mode="r")[DONE][:]
    assert 0 < done.sum() < done.size, "the kill should land mid-capture"
    rerun = subprocess.run(command, cwd=root, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_same_cache(root / "one.zarr", root / "one-killed.zarr")


@pytest.mark.slow
def test_a_refusal_on_rank_0_ends_every_rank_with_its_line(job):
    """rank 0 alone creates the cache; when it refuses (here: --out is not a cache), every rank exits
    (none waits for rank 0 in a barrier), and the line is printed once, by rank 0."""
    root, args = job
    (root / "not-a-cache").mkdir(exist_ok=True)
    (root / "not-a-cache" / "notes.txt").write_text("mine")
    run = torchrun(root, args, "not-a-cache")
    output = run.communicate(timeout=300)[0]
    assert run.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error: ") and "not a logit cache" in line]
    assert len(errors) == 1, output  # rank 0's; the other rank exits quietly with the same status
    assert (root / "not-a-cache" / "notes.txt").read_text() == "mine"


def complete_shards(cache: Path) -> int:
    try:
        return int(zarr.open_group(cache, mode="r")[DONE][:].sum())
    except Exception:  # not created yet
        return 0


@pytest.mark.slow
def test_a_rank_slower_than_the_collective_timeout_still_ends_the_job_cleanly(job):
    """Rank 1 is paused (SIGSTOP) until rank 0 has had nothing to do for longer than the collective
    timeout (set to 3 s here; 30 min by default, shorter than one shard of a 70B teacher): rank 0 waits
    for it through the store, not in a collective, and the job ends with exit 0 and the same cache as
    one process."""
    root, args = job
    run = torchrun(root, args, "slow.zarr", env={**ENV, "LOGIT_CACHE_COLLECTIVE_TIMEOUT_S": "3"})
    while complete_shards(root / "slow.zarr") == 0:  # every start-up exchange is behind the workers now
        assert run.poll() is None, run.communicate()[0]
        time.sleep(0.05)
    workers = [p for p in psutil.Process(run.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(workers) == 1
    workers[0].suspend()
    try:
        idle_since, seen = time.monotonic(), complete_shards(root / "slow.zarr")
        while time.monotonic() - idle_since < 6.0 and run.poll() is None:  # rank 0: done, and waiting 6 s
            time.sleep(0.2)
            now = complete_shards(root / "slow.zarr")
            if now != seen:
                idle_since, seen = time.monotonic(), now
    finally:
        workers[0].resume()
    output = run.communicate(timeout=600)[0]
    assert run.returncode == 0, output
    assert_same_cache(root / "one.zarr", root / "slow.zarr")


def job_process(process: psutil.Process) -> bool:
    """One of the processes a `--processes N` launcher started (not, say, a DataLoader worker of one)."""
    try:
        return process.environ().get("LOGIT_CACHE_LAUNCHED") == "1" and "pipeline" in process.cmdline()
    except psutil.Error:  # gone meanwhile
        return False


def kill_the_launcher(command: list[str], root: Path, started: Callable[[], bool]) -> list[psutil.Process]:
    """Start `pipeline COMMAND --processes 2`, `kill -9` the launcher once its two processes run and
    `started()`; the processes still alive 10 s later."""
    run = subprocess.Popen([sys.executable, "-m", "pipeline", *command, "--processes", "2"], cwd=root, env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    launcher = psutil.Process(run.pid)
    workers, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        workers = [p for p in launcher.children(recursive=True) if job_process(p)]
        if len(workers) == 2 and started():
            break
        time.sleep(0.02)
    assert len(workers) == 2, "the launcher should have started its two processes"
    launcher.kill()
    run.wait()
    return psutil.wait_procs(workers, timeout=10)[1]


@pytest.mark.slow
@pytest.mark.parametrize("when", ["starting", "mid-capture"])
def test_the_processes_end_with_their_launcher(job, when):
    """`kill -9` of a `--processes 2` launcher, while its processes start or mid-capture: none of them is
    left running 10 s later (they would otherwise wait on the job's store forever)."""
    root, args = job
    out = root / f"orphaned-{when}.zarr"
    alive = kill_the_launcher([*args, "--out", str(out)], root,
                              lambda: when == "starting" or (out / DONE / "c").exists())
    assert not alive, [p.pid for p in alive]


@pytest.mark.slow
def test_a_students_processes_end_with_their_launcher(cache_path, tmp_path):
    """The same for train-student (every command's processes run `python -m pipeline`, which arranges it)."""
    alive = kill_the_launcher(["train-student", "--cache", str(cache_path), "--out", str(tmp_path / "s"),
                               "--max-steps", "10000", "--device", "cpu", "--num-workers", "0"], tmp_path,
                              lambda: True)
    assert not alive, [p.pid for p in alive]
