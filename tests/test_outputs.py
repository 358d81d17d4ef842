"""Every output goes through one guard (issue 33): never an input, replaced only when complete and
made by this tool, one writer at a time however it is spelled; a crash or a full disk never stops the
rerun; a full disk is one line naming the destination (once per job); a location that cannot hold an
output is refused in one line. Full disks are real (a tmpfs, filled by a file)."""

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

from pipeline.cache.format import DONE
from pipeline.corpus.token_store import STORE_NAME, open_token_store
from pipeline.errors import UserError
from pipeline.io.locks import writer_holding, writer_lock
from pipeline.io.storage import output_problem
from tests.conftest import SEQ_LEN, VOCAB, run_cli
from tests.test_errors import assert_clean_error
from tests.test_safety import SMALL_CACHE, STUDENT_PARAMS, params, tmpfs, tree  # noqa: F401 (tmpfs: a fixture)

PAGE = resource.getpagesize()
TRAIN = ("--max-steps", 3, "--checkpoint-every", 1, "--device", "cpu", "--no-progress")


def fill(disk: Path, pages_left: int = 0) -> Path:
    """Fill the tmpfs `disk` with one file, then give back `pages_left` pages; the file (remove it to free
    the disk)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as file:
        while True:
            try:
                file.write(b"\0" * PAGE)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                break
    os.truncate(filler, max(0, filler.stat().st_size - pages_left * PAGE))
    return filler


def error_lines(output: str) -> list[str]:
    return [line for line in output.replace("\r", "\n").splitlines() if line.startswith("error: ")]


# --- what can hold an output (pipeline.io.storage.output_problem)
LOCATIONS = [
    # (case, location, a word of the problem, or None: it can)
    ("a relative path", "data/logits.zarr", None),
    ("an absolute path", "/data/corpus", None),
    ("a file URL", "file:///data/corpus", None),
    ("S3", "s3://bucket/logits.zarr", None),
    ("GCS", "gs://bucket/logits.zarr", None),
    ("Azure", "az://container/logits.zarr", None),
    ("memory", "memory://logits.zarr", "gone when the command ends"),
    ("a zip archive", "zip://logits.zarr::data.zip", "archive"),
    ("simplecache in front of S3", "simplecache::s3://bucket/logits.zarr", "chained URL"),
    ("filecache in front of S3", "filecache::s3://bucket/logits.zarr", "chained URL"),
    ("a chained URL read as a path", str(Path("simplecache::s3://bucket/x")), "chained URL"),
    ("HDFS", "hdfs://namenode/data/logits.zarr", "not supported"),
    ("HTTPS", "https://example.com/logits.zarr", "read-only"),
    ("FTP", "ftp://host/logits.zarr", "not a store this tool supports"),
]


@pytest.mark.parametrize("case, where, problem", LOCATIONS, ids=[row[0] for row in LOCATIONS])
def test_what_can_hold_an_output(case, where, problem):
    said = output_problem(where)
    assert (said is None) if problem is None else (problem in said and "s3://" in said), (case, said)


def test_a_refused_location_is_shown_without_its_credentials():
    said = output_problem("https://user:hunter22@example.com/logits.zarr")
    assert "hunter22" not in said and "example.com/logits.zarr" in said


@pytest.mark.parametrize("out", ["memory://corpus", "hdfs://namenode/corpus", "simplecache::s3://bucket/corpus",
                                 "zip://corpus::c.zip"])
def test_an_output_no_store_can_hold_is_one_line_before_anything_is_written(out, text_dir, tmp_path):
    """As a real process (the hdfs client would print its JVM's noise on the process's own stderr): one
    line, exit 2, and nothing written (not even a local directory named after the URL)."""
    work = tmp_path / "work"
    work.mkdir()
    run = subprocess.run([sys.executable, "-m", "pipeline", "prepare-corpus", "--source", str(text_dir), "--out", out,
                          "--vocab-size", "300", "--seq-len", "16", "--no-progress"], cwd=work, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2, run.stdout + run.stderr
    said = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith("settings: ")]
    assert len(said) == 1 and said[0].startswith("error: ") and "local path or an object store URL" in said[0], said
    assert not list(work.iterdir())


def test_a_capture_into_memory_is_refused(llama_teacher, corpus_dir, tmp_path):
    result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", "memory://c.zarr",
                     *SMALL_CACHE, expect=2)
    assert_clean_error(result, "memory://c.zarr", "gone when the command ends")


# --- one lock per output, however it is spelled

def test_every_spelling_of_an_output_shares_its_lock(tmp_path, monkeypatch):
    real = tmp_path / "data" / "out"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "data-link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path / "data")
    spellings = [real, tmp_path / "link", Path("out"), Path("../data/./out"), tmp_path / "data-link" / "out",
                 Path(f"{real}/")]
    for first in (real, tmp_path / "link"):
        with writer_lock(first):
            for spelling in spellings:
                assert writer_holding(spelling) == f"pid {os.getpid()}", spelling
                with pytest.raises(UserError, match="is being written by pid"):
                    with writer_lock(spelling):
                        pass
    assert not list(tmp_path.rglob("*.lock"))


def test_a_capture_through_a_symlink_is_refused_while_its_target_is_written(llama_teacher, corpus_dir, tmp_path):
    real = tmp_path / "c.zarr"
    real.mkdir()
    (tmp_path / "link.zarr").symlink_to(real)
    with writer_lock(real):
        result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out",
                         tmp_path / "link.zarr", *SMALL_CACHE, expect=2)
    assert_clean_error(result, "is being written by pid")
    assert not list(real.iterdir())


@pytest.mark.parametrize("link", ["dangling", "loop", "dangling-parent"])
def test_a_symlink_that_leads_nowhere_is_one_line(link, text_dir, tmp_path):
    if link == "loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        out = tmp_path / "a"
    else:
        (tmp_path / "link").symlink_to(tmp_path / "nowhere")
        out = tmp_path / "link" if link == "dangling" else tmp_path / "link" / "corpus"
    result = run_cli("prepare-corpus", "--source", text_dir, "--out", out, "--vocab-size", 300, "--seq-len", 16,
                     "--no-progress", expect=2)
    assert_clean_error(result, "is a symbolic link to", "which does not exist")
    assert not (tmp_path / "nowhere").exists()


# --- never write into what is not ours: --manifest, evaluate --out, --checkpoints

def test_a_manifest_never_replaces_what_is_not_one(llama_teacher, corpus_dir, tmp_path):
    corpus, teacher = (shutil.copytree(p, tmp_path / p.name) for p in (corpus_dir, llama_teacher))
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    (tmp_path / "a-directory.json").mkdir()
    out = tmp_path / "c.zarr"
    before = {p: tree(p) for p in (corpus, teacher)}
    args = ("cache-logits", "--teacher", teacher, "--corpus", corpus, "--out", out, *SMALL_CACHE, "--no-progress")
    for manifest, needle in ((corpus / "tokenizer.json", "the --corpus input"),
                             (teacher / "config.json", "the --teacher input"),
                             (tmp_path, "is (or contains, or lies inside) the --corpus input"),
                             (notes, "is not a logit-cache manifest"),
                             (tmp_path / "a-directory.json", "is not a logit-cache manifest"),
                             (out / "logits.manifest.json", "lies inside --out")):
        assert_clean_error(run_cli(*args, "--manifest", manifest, expect=2), "--manifest", needle)
    assert {p: tree(p) for p in (corpus, teacher)} == before
    assert notes.read_text() == '{"mine": true}' and not out.exists()
    manifest = tmp_path / "logits.manifest.json"
    run_cli(*args, "--manifest", manifest)
    written = manifest.read_text()
    run_cli(*args, "--manifest", manifest)  # its own manifest: replaced (here by the same)
    assert manifest.read_text() == written and not list(tmp_path.glob("*.lock"))


def test_evaluate_writes_only_into_its_own_reports(cache_path, corpus_dir, llama_teacher, tmp_path):
    students = tmp_path / "students"
    run_cli("train-student", "--cache", cache_path, "--out", students / "a", "--max-steps", 1, "--device", "cpu",
            "--no-progress", *params(tmp_path, STUDENT_PARAMS))
    mine = tmp_path / "mine"
    (mine / "curves").mkdir(parents=True)
    (mine / "curves" / "figure.png").write_bytes(b"a figure of my own")
    cache = shutil.copytree(cache_path, tmp_path / "c.zarr")
    other = shutil.copytree(students / "a", tmp_path / "other-student")
    before = {p: tree(p) for p in (mine, cache, other)}
    common = ("evaluate", "--teacher", llama_teacher, "--corpus", corpus_dir, "--students", students, "--device", "cpu",
              "--no-progress", *params(tmp_path, "evaluate: {max_sequences: 4}\n"))
    for out in (mine, cache, other):
        assert_clean_error(run_cli(*common, "--out", out, expect=2), "is not a reports directory made by this tool")
    assert {p: tree(p) for p in (mine, cache, other)} == before
    reports = tmp_path / "reports"
    run_cli(*common, "--out", reports)
    (reports / "stale.txt").write_text("from an older evaluation")
    run_cli(*common, "--out", reports)  # its own reports: replaced whole, once the new ones are complete
    assert not (reports / "stale.txt").exists()
    assert {"teacher", "students"} <= json.loads((reports / "metrics.json").read_text()).keys()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".reports")]


STUDENT_4 = ("train_student: {d_model: 32, n_layers: 1, d_ff: 64, batch_size: 4, num_workers: 0, max_steps: 4, "
             "checkpoint_every: 1}\n")


def test_a_checkpoints_directory_belongs_to_one_student(cache_path, llama_teacher, tmp_path):
    """Two students with one --checkpoints: the second never resumes, discards or replaces the first's
    checkpoint (with --restart-on-mismatch or --overwrite neither); one writer at a time; never an
    input, nor a directory of something else (a teacher); the first then resumes it."""
    from pipeline.settings.student import StudentConfig
    from stages import train_student

    cfg = StudentConfig(d_model=32, n_layers=1, d_ff=64, batch_size=4, num_workers=0, max_steps=4, checkpoint_every=1,
                        device="cpu")
    first, checkpoints = tmp_path / "a", tmp_path / "ckpt"
    train_student.main(cache_path, first, cfg, progress=False, stop_after=2, checkpoints=checkpoints)
    saved = (checkpoints / "checkpoint.pt").read_bytes()
    args = ("train-student", "--cache", cache_path, "--device", "cpu", "--no-progress", "--checkpoints", checkpoints,
            *params(tmp_path, STUDENT_4))
    for flags in ((), ("--restart-on-mismatch",), ("--overwrite",)):
        result = run_cli(*args, "--out", tmp_path / "b", *flags, expect=2)
        assert_clean_error(result, "belongs to the student", str(first.resolve()))
        assert (checkpoints / "checkpoint.pt").read_bytes() == saved, flags
    assert not (tmp_path / "b").exists()
    with writer_lock(checkpoints):
        assert_clean_error(run_cli(*args, "--out", first, expect=2), f"{checkpoints} is being written by pid")
    before = tree(cache_path)
    into_cache = run_cli("train-student", "--cache", cache_path, "--out", tmp_path / "c", "--checkpoints", cache_path,
                         "--device", "cpu", expect=2)
    assert_clean_error(into_cache, f"--checkpoints {cache_path} is (or contains, or lies inside) the --cache input")
    assert tree(cache_path) == before
    teacher = shutil.copytree(llama_teacher, tmp_path / "teacher")
    into_teacher = run_cli("train-student", "--cache", cache_path, "--out", tmp_path / "c", "--checkpoints", teacher,
                           "--device", "cpu", "--overwrite", expect=2)
    assert_clean_error(into_teacher, f"--checkpoints {teacher} exists and is not empty, and is not a checkpoint directory")
    assert tree(teacher) == tree(llama_teacher)
    resumed = run_cli(*args, "--out", first)
    assert "resuming at step 2" in resumed.output
    assert json.loads((first / "metrics.json").read_text())["steps"] == 4 and not checkpoints.exists()


@pytest.mark.parametrize("separate", [False, True], ids=["in-out", "--checkpoints"])
def test_a_checkpoint_cut_short_by_a_kill_never_stops_the_rerun(separate, cache_path, tmp_path):
    """What a kill during the first checkpoint leaves (its temporary file, cut short): the rerun starts
    cleanly, saying so, and finishes."""
    out = tmp_path / "s"
    checkpoints = tmp_path / "ckpt" if separate else out
    out.mkdir()
    checkpoints.mkdir(exist_ok=True)
    whole = tmp_path / "whole.pt"
    torch.save({"model": {"w": torch.arange(4096.0)}, "config": {}}, whole)
    (checkpoints / "checkpoint.pt.tmp").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    result = run_cli("train-student", "--cache", cache_path, "--out", out, *TRAIN, *params(tmp_path, STUDENT_PARAMS),
                     *(("--checkpoints", checkpoints) if separate else ()))
    assert "stopped writing its first checkpoint" in result.output and "starting cleanly" in result.output
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    assert not (checkpoints / "checkpoint.pt.tmp").exists()


# --- a full disk: one line naming the destination, and the rerun resumes or starts cleanly

def test_a_full_disk_during_the_first_checkpoint_then_the_rerun_finishes(cache_path, tmp_path, tmpfs):
    disk = tmpfs("size=1m")
    filler = fill(disk, pages_left=8)  # the directory and its lock fit, the first checkpoint does not
    out = disk / "s"
    args = ("train-student", "--cache", cache_path, "--out", out, *TRAIN, *params(tmp_path, STUDENT_PARAMS))
    assert_clean_error(run_cli(*args, expect=2), f"no space left on {out} ", "resumes from the last checkpoint")
    assert not (out / "checkpoint.pt.tmp").exists()
    filler.unlink()
    run_cli(*args)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def test_a_full_disk_while_training_the_teacher_then_the_rerun_trains_it(corpus_dir, tmp_path, tmpfs):
    disk = tmpfs("size=1m")
    filler = fill(disk, pages_left=4)
    out = disk / "teacher"
    args = ("train-teacher", "--corpus", corpus_dir, "--out", out, "--max-steps", 1, "--device", "cpu", "--no-progress",
            *params(tmp_path, "train_teacher: {d_model: 32, n_layers: 1, n_heads: 2, d_ff: 64}\n"))
    assert_clean_error(run_cli(*args, expect=2), f"no space left on {out} ", "trains the teacher again from the start")
    assert not out.exists() and not list(disk.glob(".teacher*"))
    filler.unlink()
    run_cli(*args)
    assert (out / "train_stats.json").is_file()


def test_a_full_disk_while_preparing_a_corpus_starts_over_and_keeps_the_old_one(text_dir, tmpfs):
    disk = tmpfs("size=2m")
    out = disk / "corpus"
    args = ("prepare-corpus", "--source", text_dir, "--out", out, "--vocab-size", 300, "--seq-len", 16, "--no-progress")
    run_cli(*args)
    before = tree(out)
    filler = fill(disk, pages_left=4)
    result = run_cli(*args, "--seq-len", 8, "--overwrite", expect=2)
    assert_clean_error(result, f"no space left on {out} ", "prepares the corpus again from the start",
                       "the previous corpus, if any, is as it was")
    assert tree(out) == before and not list(disk.glob(".corpus*"))
    filler.unlink()
    run_cli(*args, "--seq-len", 8, "--overwrite")
    assert open_token_store(out).attrs["seq_len"] == 8


def test_a_full_disk_while_appending_then_the_rerun_appends(text_dir, tmp_path, tmpfs):
    lines = [line for path in sorted(text_dir.iterdir()) for line in path.read_text().splitlines() if line.strip()]
    parts = [tmp_path / f"part-{i}.jsonl" for i in range(8)]  # many documents each: a split by document
    for i, part in enumerate(parts):
        part.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines[i::8]))
    source = tmp_path / "source"
    source.mkdir()
    for part in parts[:4]:
        shutil.copy(part, source)
    disk = tmpfs("size=2m")
    out = disk / "corpus"
    args = ("prepare-corpus", "--source", source, "--out", out, "--vocab-size", 300, "--seq-len", 16,
            "--validation-fraction", 0.25, "--no-progress", *params(tmp_path, "prepare_corpus: {}\n"))
    run_cli(*args)
    rows = open_token_store(out).attrs["counts"]["train"]["sequences"]
    for part in parts[4:]:
        shutil.copy(part, source)
    filler = fill(disk, pages_left=2)  # its lock fits, the new rows do not
    result = run_cli(*args, "--append", expect=2)
    assert_clean_error(result, f"no space left on {out} ", "keeps the rows it had before this append")
    filler.unlink()
    assert "4 new units" in run_cli(*args, "--append").output
    assert open_token_store(out).attrs["counts"]["train"]["sequences"] > rows
    assert "corpus intact" in run_cli("verify", out, "--no-progress").output


def test_a_full_disk_under_the_manifest_names_it(llama_teacher, corpus_dir, tmp_path, tmpfs):
    disk = tmpfs("size=256k")
    filler = fill(disk, pages_left=1)  # its lock fits, the manifest does not
    manifest, out = disk / "logits.manifest.json", tmp_path / "c.zarr"
    args = ("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, *SMALL_CACHE,
            "--manifest", manifest, "--no-progress")
    assert_clean_error(run_cli(*args, expect=2), f"no space left on {manifest} ")
    assert not list(disk.glob("*.tmp"))
    filler.unlink()
    assert "is already complete" in run_cli(*args).output
    assert json.loads(manifest.read_text())["shards_complete"] == zarr.open_group(out, mode="r")[DONE].size


@pytest.mark.slow
def test_a_full_disk_under_two_processes_is_said_once(llama_teacher, corpus_dir, tmpfs):
    """Both processes of a `--processes 2` capture find the disk full: one line, naming the cache."""
    disk = tmpfs("size=256k")
    out = disk / "c.zarr"
    run = subprocess.run([sys.executable, "-m", "pipeline", "cache-logits", "--teacher", str(llama_teacher), "--corpus",
                          str(corpus_dir), "--out", str(out), "--k", "16", "--device", "cpu", "--batch-size", "1",
                          "--sequences-per-shard", "4", "--sequences-per-chunk", "4", "--no-progress", "--processes",
                          "2"], cwd=disk.parent, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2, run.stdout + run.stderr
    said = error_lines(run.stdout + run.stderr)
    assert len(said) == 1 and said[0].startswith(f"error: no space left on {out} "), run.stdout + run.stderr


# --- a damaged list of units under --append

@pytest.mark.parametrize("units", [b"\x00\xffgarbage", b"[1, 2]", b"{}", b"[]"], ids=["bytes", "numbers", "object", "cut"])
def test_a_damaged_units_list_under_append_prepares_the_corpus_again(units, corpus_dir, text_dir, tmp_path):
    corpus = shutil.copytree(corpus_dir, tmp_path / "corpus")
    (corpus / "units.json").write_bytes(units)
    result = run_cli("prepare-corpus", "--source", text_dir, "--out", corpus, "--append", "--vocab-size", VOCAB,
                     "--seq-len", SEQ_LEN, "--validation-fraction", 0.25, "--no-progress",
                     *params(tmp_path, "prepare_corpus: {}\n"))  # the fixture's settings: its defaults
    note = next(line for line in result.output.splitlines() if "units.json" in line)
    assert f"{corpus / 'units.json'} is damaged" in note and "preparing the whole corpus again" in note
    assert json.loads((corpus / "units.json").read_text())  # written again, whole
    assert open_token_store(corpus).attrs["corpus_fingerprint"] == open_token_store(corpus_dir).attrs["corpus_fingerprint"]
    assert "Traceback" not in result.output and (corpus / STORE_NAME).is_dir()
