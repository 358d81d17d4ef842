"""Nothing already written is lost: safe --overwrite, identity by content, crashed creation, the
writer lock, a full or read-only disk, mismatches refused (issue 9, cases 3-8)."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zarr

from pipeline.cache.format import FORMAT_VERSION
from pipeline.cache.format import CREATING, DONE
from pipeline.io.locks import writer_lock
from pipeline.corpus.token_store import open_token_store
from tests.conftest import VOCAB, run_cli, save_with_tokenizer, tiny_llama
from tests.test_errors import assert_clean_error

SMALL_CACHE = ("--k", 4, "--tail-samples", 0, "--device", "cpu")


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def params(tmp_path: Path, text: str) -> tuple[str, Path]:
    (tmp_path / "p.yaml").write_text(text)
    return ("--params", tmp_path / "p.yaml")


@pytest.fixture
def tmpfs(tmp_path):
    """A real tiny filesystem (tmpfs) for full-disk and read-only cases; needs root and mount."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()

    def mount(options: str) -> Path:
        action = ["mount", "-o", f"remount,{options}", str(mount_point)] if os.path.ismount(mount_point) else \
                 ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)]
        if os.geteuid() != 0 or subprocess.run(action, capture_output=True).returncode != 0:
            pytest.skip("needs root and mount (tmpfs)")
        return mount_point

    yield mount
    if os.path.ismount(mount_point):
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# --- case 3: --overwrite deletes only this tool's outputs, never an input, and only after every check

def test_overwrite_never_deletes_an_input(llama_teacher, corpus_dir, cache_path, tmp_path):
    corpus, teacher, cache = (shutil.copytree(p, tmp_path / p.name) for p in (corpus_dir, llama_teacher, cache_path))
    before = {p: tree(p) for p in (corpus, teacher, cache)}
    for out in (corpus, teacher, corpus / "inside.zarr", tmp_path):
        result = run_cli("cache-logits", "--teacher", teacher, "--corpus", corpus, "--out", out, "--overwrite",
                         *SMALL_CACHE, expect=2)
        assert_clean_error(result, "is (or contains, or lies inside) the")
    assert_clean_error(run_cli("train-student", "--cache", cache, "--out", cache, "--overwrite", expect=2), "--cache input")
    assert_clean_error(run_cli("train-teacher", "--corpus", corpus, "--out", corpus, "--overwrite", expect=2), "--corpus input")
    for path, files in before.items():
        assert tree(path) == files, path


def test_overwrite_refuses_what_this_tool_did_not_make(corpus_dir, llama_teacher, text_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for args in (("prepare-corpus", "--source", text_dir), ("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir,
                                                            *SMALL_CACHE)):
        result = run_cli(*args, "--out", mine, "--overwrite", expect=2)
        assert_clean_error(result, "not a")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_prepare_corpus_overwrite_keeps_the_old_corpus_when_the_new_one_fails(text_dir, tmp_path):
    out = tmp_path / "corpus"
    run_cli("prepare-corpus", "--source", text_dir, "--out", out, "--vocab-size", 300, "--seq-len", 16)
    before = tree(out)
    result = run_cli("prepare-corpus", "--source", text_dir, "--out", out, "--vocab-size", 300, "--seq-len", 100_000,
                     "--overwrite", expect=2)
    assert_clean_error(result, "makes 0 rows of seq_len=100000 tokens", "--seq-len")
    assert tree(out) == before
    assert not any(p.name.startswith(".corpus") for p in tmp_path.iterdir())  # no staging left behind
    run_cli("prepare-corpus", "--source", text_dir, "--out", out, "--vocab-size", 300, "--seq-len", 32, "--overwrite")
    assert open_token_store(out).attrs["seq_len"] == 32


# --- case 4: identity by content, not by how a path is spelled

def test_the_same_teacher_spelled_differently_resumes(llama_teacher, corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "c.zarr"
    run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, *SMALL_CACHE)
    data = {k: v for k, v in tree(out).items() if not k.startswith("provenance")}
    link = tmp_path / "link"
    link.symlink_to(llama_teacher)
    monkeypatch.chdir(llama_teacher.parent)
    for spelling in (llama_teacher.name, f"./{llama_teacher.name}/", str(llama_teacher) + "/", link):
        result = run_cli("cache-logits", "--teacher", spelling, "--corpus", corpus_dir, "--out", out, *SMALL_CACHE,
                         "--restart-on-mismatch")
        assert "is already complete" in result.output, (spelling, result.output)
        assert {k: v for k, v in tree(out).items() if not k.startswith("provenance")} == data


# --- case 5: a crash while the cache is being created does not block the next run

def test_a_crash_during_creation_is_recreated(llama_teacher, corpus_dir, tmp_path):
    out = tmp_path / "c.zarr"
    group = zarr.open_group(out, mode="w", zarr_format=3, attributes={CREATING: True})
    group.create_array("input_ids", shape=(3,), dtype="u2")  # died after the first array
    assert_clean_error(run_cli("inspect", out, expect=2), "died while creating")
    result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, *SMALL_CACHE)
    assert "creating it again" in result.output
    assert zarr.open_group(out, mode="r")[DONE][:].all()


def test_full_disk_is_one_line_and_the_rerun_finishes(llama_teacher, corpus_dir, tmpfs):
    """A real full disk (a 256 KiB tmpfs) mid-capture, then the same command on a grown disk."""
    disk = tmpfs("size=256k")
    out = disk / "c.zarr"
    args = ("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, "--k", 16, "--device", "cpu")
    assert_clean_error(run_cli(*args, expect=2), f"no space left on {out} ", "the complete shards are kept")
    tmpfs("size=64m")
    run_cli(*args)
    assert zarr.open_group(out, mode="r")[DONE][:].all()
    assert "intact" in run_cli("verify", out, "--no-progress").output


@pytest.mark.parametrize("command", ["prepare-corpus", "train-teacher", "cache-logits", "train-student", "evaluate"])
def test_read_only_output_is_one_line(command, text_dir, corpus_dir, llama_teacher, cache_path, tmp_path, tmpfs):
    disk = tmpfs("size=1m,ro")
    args = {
        "prepare-corpus": ("--source", text_dir, "--vocab-size", 300, "--seq-len", 16),
        "train-teacher": ("--corpus", corpus_dir, "--max-steps", 1, "--device", "cpu"),
        "cache-logits": ("--teacher", llama_teacher, "--corpus", corpus_dir, *SMALL_CACHE),
        "train-student": ("--cache", cache_path, "--max-steps", 1, "--device", "cpu"),
        "evaluate": ("--teacher", llama_teacher, "--corpus", corpus_dir, "--students", tmp_path / "students",
                     "--device", "cpu", *params(tmp_path, "evaluate: {max_sequences: 4}\n")),
    }[command]
    if command == "evaluate":
        run_cli("train-student", "--cache", cache_path, "--out", tmp_path / "students" / "s", "--max-steps", 1,
                "--device", "cpu", *params(tmp_path, "train_student: {d_model: 32, n_layers: 1, d_ff: 64, num_workers: 0}\n"))
        (tmp_path / "p.yaml").write_text("evaluate: {max_sequences: 4}\n")
    result = run_cli(command, *args, "--out", disk / "out", expect=2)
    assert_clean_error(result, "cannot write or read", str(disk))


# --- case 6: every check, everywhere

def other_tokenizer_teacher(corpus_dir, text_dir, tmp_path) -> Path:
    from transformers import PreTrainedTokenizerFast

    from pipeline.corpus.tokenize import read_documents
    from pipeline.corpus.tokenizer import train_bpe

    other = train_bpe((d.text[::-1] for d in read_documents(str(text_dir))), VOCAB)
    teacher = tmp_path / "other-teacher"
    tiny_llama(open_token_store(corpus_dir).attrs["vocab_size"]).save_pretrained(teacher)
    PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<|endoftext|>").save_pretrained(teacher)
    return teacher


def test_online_teacher_and_evaluate_check_the_tokenizer(corpus_dir, text_dir, cache_path, tmp_path):
    other = other_tokenizer_teacher(corpus_dir, text_dir, tmp_path)
    result = run_cli("train-student", "--cache", cache_path, "--out", tmp_path / "s", "--online-teacher", other,
                     "--device", "cpu", expect=2)
    assert_clean_error(result, "online teacher tokenizer", "!= cache tokenizer")
    assert not (tmp_path / "s").exists()
    run_cli("train-student", "--cache", cache_path, "--out", tmp_path / "students" / "a", "--max-steps", 1, "--device", "cpu",
            *params(tmp_path, "train_student: {d_model: 32, n_layers: 1, d_ff: 64, num_workers: 0}\n"))
    result = run_cli("evaluate", "--teacher", other, "--corpus", corpus_dir, "--students", tmp_path / "students",
                     "--out", tmp_path / "reports", "--device", "cpu", *params(tmp_path, "evaluate: {}\n"), expect=2)
    assert_clean_error(result, "teacher tokenizer", "!= corpus tokenizer")


def test_checkpoint_refuses_another_cache(llama_teacher, corpus_dir, cache_path, tmp_path):
    from pipeline.settings.student import StudentConfig
    from stages import train_student

    cfg = StudentConfig(d_model=32, n_layers=1, d_ff=64, batch_size=4, num_workers=0, max_steps=4, checkpoint_every=1,
                        device="cpu")
    train_student.main(cache_path, tmp_path / "s", cfg, progress=False, stop_after=2)
    other = tmp_path / "k4.zarr"
    run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", other, *SMALL_CACHE)
    checkpoint = (tmp_path / "s" / "checkpoint.pt").read_bytes()
    (tmp_path / "p.yaml").write_text("train_student: {d_model: 32, n_layers: 1, d_ff: 64, batch_size: 4, num_workers: 0, "
                                     "max_steps: 4, checkpoint_every: 1}\n")
    result = run_cli("train-student", "--cache", other, "--out", tmp_path / "s", "--device", "cpu",
                     "--params", tmp_path / "p.yaml", expect=2)
    assert_clean_error(result, "was trained on another cache")
    assert (tmp_path / "s" / "checkpoint.pt").read_bytes() == checkpoint

    # other settings: refused naming them; --restart-on-mismatch (what dvc.yaml passes) starts over instead,
    # from a separate --checkpoints directory too, and trains what a fresh run trains
    (tmp_path / "p.yaml").write_text("train_student: {d_model: 32, n_layers: 1, d_ff: 64, batch_size: 4, num_workers: 0, "
                                     "max_steps: 4, checkpoint_every: 1, lr: 0.01}\n")
    args = ["train-student", "--cache", cache_path, "--device", "cpu", "--params", tmp_path / "p.yaml"]
    assert_clean_error(run_cli(*args, "--out", tmp_path / "s", expect=2), "was made with other settings (lr)")
    # --overwrite towards an --out that must be refused (the cache itself): the checkpoint is kept
    refused = run_cli(*args, "--out", cache_path, "--checkpoints", tmp_path / "s", "--overwrite", expect=2)
    assert_clean_error(refused, "--cache input")
    assert (tmp_path / "s" / "checkpoint.pt").read_bytes() == checkpoint
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "s" / "checkpoint.pt").rename(tmp_path / "ckpt" / "checkpoint.pt")
    restarted = run_cli(*args, "--out", tmp_path / "s", "--checkpoints", tmp_path / "ckpt", "--restart-on-mismatch")
    assert "note: starting over" in restarted.output and "other settings (lr)" in restarted.output
    run_cli(*args, "--out", tmp_path / "fresh")
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "fresh" / "model.safetensors").read_bytes()
    assert not (tmp_path / "ckpt").exists()  # the finished run leaves no checkpoint behind


def test_misspelled_params_section_is_an_error(llama_teacher, corpus_dir, tmp_path):
    result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", tmp_path / "c.zarr",
                     *params(tmp_path, "cache_logit:\n  k: 4\n"), expect=2)
    assert_clean_error(result, "unknown section 'cache_logit'", "did you mean 'cache_logits'")
    assert not (tmp_path / "c.zarr").exists()


# --- case 7: one writer at a time

def test_a_second_writer_is_refused_at_once(llama_teacher, corpus_dir, tmp_path):
    out = tmp_path / "c.zarr"
    with writer_lock(out):
        result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, *SMALL_CACHE,
                         expect=2)
    assert_clean_error(result, "is being written by pid", "wait for it")
    assert not out.exists()
    run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, *SMALL_CACHE)  # lock released


STUDENT_PARAMS = "train_student: {d_model: 32, n_layers: 1, d_ff: 64, num_workers: 0}\n"


def test_every_output_has_one_writer_at_a_time(text_dir, corpus_dir, cache_path, llama_teacher, tmp_path):
    """Not only caches: a second train-student (with or without --overwrite), train-teacher, prepare-corpus
    or evaluate on an output being written is refused at once, and the first one's work (its output,
    its work in progress) is left exactly as it was."""
    student = ("train-student", "--cache", cache_path, "--max-steps", 1, "--device", "cpu", "--no-progress",
               *params(tmp_path, STUDENT_PARAMS))
    commands = {
        "student": student,
        "student-overwrite": (*student, "--overwrite"),
        "teacher": ("train-teacher", "--corpus", corpus_dir, "--max-steps", 1, "--device", "cpu", "--no-progress"),
        "corpus": ("prepare-corpus", "--source", text_dir, "--vocab-size", 300, "--seq-len", 16, "--no-progress"),
        "evaluate": ("evaluate", "--teacher", llama_teacher, "--corpus", corpus_dir, "--students", tmp_path / "none",
                     "--device", "cpu", "--no-progress"),
    }
    for name, command in commands.items():
        out = tmp_path / name
        if name not in ("teacher", "corpus"):  # staged outputs appear only when complete; the others in place
            out.mkdir()
            (out / "train_log.tsv").write_text("the first writer's\n")
        partial = tmp_path / f".{name}.partial"  # the first writer's work in progress (a staged output)
        partial.mkdir()
        (partial / "weights").write_text("in progress")
        with writer_lock(out):
            before = tree(tmp_path)
            result = run_cli(*command, "--out", out, expect=2)
            assert_clean_error(result, f"{out} is being written by pid {os.getpid()}", "wait for it")
            assert tree(tmp_path) == before, name
        shutil.rmtree(partial)


def test_no_lock_file_outlives_its_writer(llama_teacher, corpus_dir, text_dir, tmp_path):
    """A finished (or refused) command leaves no lock file beside its output; read-only commands make none."""
    run_cli("prepare-corpus", "--source", text_dir, "--out", tmp_path / "corpus", "--vocab-size", 300, "--seq-len", 16,
            "--no-progress")
    run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", tmp_path / "c.zarr",
            *SMALL_CACHE, "--no-progress")
    run_cli("train-student", "--cache", tmp_path / "c.zarr", "--out", tmp_path / "s", "--max-steps", 1, "--device", "cpu",
            "--no-progress", *params(tmp_path, STUDENT_PARAMS))
    run_cli("inspect", tmp_path / "c.zarr")
    run_cli("verify", tmp_path / "c.zarr", "--no-progress")
    run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", tmp_path / "nope", "--out", tmp_path / "d.zarr", expect=2)
    assert not [p.name for p in tmp_path.rglob("*.lock")]
    assert not (tmp_path / "d.zarr").exists()


@pytest.mark.parametrize("command", ["train-student", "evaluate"])
def test_a_full_disk_while_training_or_evaluating_names_it_and_the_rerun_resumes(command, cache_path, corpus_dir,
                                                                                 llama_teacher, tmp_path, tmpfs):
    """A real full disk (tmpfs) under the output: one line naming the output (not an input), exit 2;
    then the same command on a grown disk resumes (past the stale temporary file) and finishes."""
    train = ("train-student", "--cache", cache_path, "--max-steps", 3, "--device", "cpu", "--checkpoint-every", 1,
             "--no-progress", *params(tmp_path, STUDENT_PARAMS))
    if command == "train-student":
        disk = tmpfs("size=300k")  # the first checkpoint fits, the second does not
        args = (*train, "--out", disk / "s")
        out = disk / "s"
    else:
        run_cli(*train, "--out", tmp_path / "students" / "s")
        disk = tmpfs("size=64k")  # the charts do not fit
        out = disk / "reports"
        args = ("evaluate", "--teacher", llama_teacher, "--corpus", corpus_dir, "--students", tmp_path / "students",
                "--out", out, "--device", "cpu", "--no-progress")
    assert_clean_error(run_cli(*args, expect=2), f"no space left on {out}")
    tmpfs("size=64m")
    result = run_cli(*args)
    if command == "train-student":
        assert "resuming at step 1" in result.output
        assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    else:
        assert (out / "report.md").is_file() and (out / "metrics.json").is_file()


def _raised(error: BaseException, during: BaseException | None = None, cause: BaseException | None = None):
    """`error` as raised: while handling `during` (its __context__), or `from cause`."""
    try:
        try:
            if during is not None:
                raise during
        except BaseException:
            raise error
        raise error from cause
    except BaseException as raised:
        return raised


def _safetensors_full_disk():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize(("error", "full"), [
    pytest.param(lambda: OSError(errno.ENOSPC, "No space left on device"), True, id="ENOSPC"),
    pytest.param(lambda: OSError(errno.EDQUOT, "Disk quota exceeded"), True, id="EDQUOT"),
    pytest.param(lambda: _raised(RuntimeError("unexpected pos 704 vs 598"), during=OSError(errno.ENOSPC, "full")),
                 True, id="raised-while-handling-ENOSPC"),
    pytest.param(lambda: _raised(ValueError("zarr could not write"), cause=OSError(errno.EDQUOT, "quota")),
                 True, id="raised-from-EDQUOT"),
    pytest.param(lambda: _raised(KeyError("x"), cause=_raised(RuntimeError("y"), during=OSError(errno.ENOSPC, "z"))),
                 True, id="ENOSPC-two-links-down"),
    pytest.param(_safetensors_full_disk, True, id="rust-os-error-28"),
    pytest.param(lambda: RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False, id="CUDA-OOM"),
    pytest.param(lambda: OSError(errno.EIO, "Input/output error"), False, id="EIO"),
    pytest.param(lambda: _raised(RuntimeError("unexpected pos"), during=OSError(errno.EIO, "Input/output error")),
                 False, id="raised-while-handling-EIO"),
    pytest.param(lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
                 False, id="no-errno-anywhere"),
])
def test_only_a_no_space_or_quota_error_is_a_full_disk(error, full):
    """The decision is the error's errno (ENOSPC, EDQUOT), itself or anywhere in its causes, never the
    free space: a CUDA out-of-memory error is not a full disk."""
    from pipeline.io.outputs import full_disk_error

    found = full_disk_error(error())
    assert (found is not None) == full
    assert found is None or found.errno in (errno.ENOSPC, errno.EDQUOT)


@pytest.mark.parametrize(("error", "line"), [
    (OSError(errno.ENOSPC, "No space left on device", "/d/x"), "no space left on the device: /d/x; free space"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/d/x"), "no space left on the device: /d/x (disk quota exceeded)"),
    (OSError(errno.EIO, "Input/output error", "/d/x"), "Input/output error: /d/x"),
])
def test_an_os_error_reaching_the_command_says_a_full_disk_only_for_no_space_or_quota(error, line):
    from pipeline.cli import _os_error_line

    assert _os_error_line(error).startswith(line)


def test_a_full_disk_names_the_destination_that_holds_the_file_written(tmp_path):
    from pipeline.errors import UserError
    from pipeline.io.outputs import full_disk_named

    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    with pytest.raises(UserError, match=re.escape(f"no space left on {checkpoints} ")):
        with full_disk_named(out, checkpoints):
            raise OSError(errno.ENOSPC, "No space left on device", str(checkpoints / "checkpoint.pt.tmp"))


def test_on_a_nearly_full_disk_only_a_no_space_error_is_called_a_full_disk(tmpfs):
    """A real full tmpfs: an out-of-memory error raised there passes through as itself; a write that
    fails for want of space is one line naming the destination."""
    from pipeline.errors import UserError
    from pipeline.io.outputs import full_disk_named

    out = tmpfs("size=256k") / "out"
    out.mkdir()
    with pytest.raises(OSError) as filled, open(out.parent / "filler", "wb") as filler:
        while True:
            filler.write(b"x" * 65536)
            filler.flush()
    assert filled.value.errno == errno.ENOSPC
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with full_disk_named(out):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(UserError, match=re.escape(f"no space left on {out} ")):
        with full_disk_named(out):
            with open(out / "metrics.json", "wb") as file:
                file.write(b"x" * 65536)
                file.flush()


@pytest.mark.slow
def test_two_concurrent_captures_never_both_write(llama_teacher, corpus_dir, tmp_path):
    out = tmp_path / "c.zarr"
    command = [sys.executable, "-m", "pipeline.cli", "cache-logits", "--teacher", str(llama_teacher), "--corpus",
               str(corpus_dir), "--out", str(out), "--k", "4", "--device", "cpu", "--batch-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outputs = [(run.wait(), run.stdout.read()) for run in runs]
    codes = sorted(code for code, _ in outputs)
    assert codes == [0, 2], outputs
    loser = next(text for code, text in outputs if code == 2)
    assert "is being written by" in loser and "Traceback" not in loser
    assert "intact" in run_cli("verify", out, "--no-progress").output


# --- case 8: one line, no traceback

def test_more_bad_inputs_are_one_line(llama_teacher, corpus_dir, cache_path, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    assert_clean_error(run_cli("prepare-corpus", "--source", tmp_path / "ints.parquet", "--out", tmp_path / "c", expect=2),
                       "column 'text' holds int64")
    for text, needle in (("cache_logits:\n  k: !!binary aGVsbG8=\n", "expected an integer"),
                         ("cache_logits:\n  temperatures: [1.0, .nan]\n", "expected a finite number"),
                         ("cache_logits:\n  sequences_per_shard: 0\n", "sequences_per_shard must be >= 1")):
        result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", tmp_path / "x.zarr",
                         *params(tmp_path, text), expect=2)
        assert_clean_error(result, needle)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    assert_clean_error(run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", tmp_path / "x.zarr",
                               "--params", tmp_path / "bin.yaml", expect=2), "not UTF-8")
    result = run_cli("train-teacher", "--corpus", corpus_dir, "--out", tmp_path / "t", "--max-minutes", -1, expect=2)
    assert_clean_error(result, "max_minutes must be > 0")
    assert not (tmp_path / "t").exists()

    truncated = shutil.copytree(llama_teacher, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_clean_error(run_cli("cache-logits", "--teacher", truncated, "--corpus", corpus_dir, "--out", tmp_path / "x.zarr",
                               expect=2), "cannot load a causal LM")

    student = tmp_path / "s"
    student.mkdir()
    (student / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert_clean_error(run_cli("train-student", "--cache", cache_path, "--out", student, "--device", "cpu", expect=2),
                       "is not a readable checkpoint")


@pytest.mark.parametrize("damage, needle", [
    (lambda c: shutil.rmtree(c / "topk_ids"), "array topk_ids is missing"),
    (lambda c: (c / "tail_logprob" / "zarr.json").write_text('{"shape": [1'), "array tail_logprob is missing or its zarr.json"),
    (lambda c: (c / "zarr.json").write_text(json.dumps({**json.loads((c / "zarr.json").read_text()),
                                                        "attributes": {"format_version": FORMAT_VERSION}})), "attributes missing"),
])
def test_damaged_cache_metadata_is_one_line(cache_path, tmp_path, damage, needle):
    cache = shutil.copytree(cache_path, tmp_path / "c.zarr")
    damage(cache)
    for args in (("inspect", cache), ("verify", cache), ("train-student", "--cache", cache, "--out", tmp_path / "s")):
        assert_clean_error(run_cli(*args, expect=2), needle)
    assert not (tmp_path / "s").exists()


def test_evaluate_mismatches_are_one_line(corpus_dir, corpus_vocab, cache_path, llama_teacher, tmp_path):
    small = save_with_tokenizer(tiny_llama(corpus_vocab - 10), corpus_dir, tmp_path / "small")
    run_cli("train-student", "--cache", cache_path, "--out", tmp_path / "students" / "a", "--max-steps", 1, "--device", "cpu",
            *params(tmp_path, "train_student: {d_model: 32, n_layers: 1, d_ff: 64, num_workers: 0}\n"))
    common = ("--corpus", corpus_dir, "--students", tmp_path / "students", "--device", "cpu",
              *params(tmp_path, "evaluate: {}\n"))
    assert_clean_error(run_cli("evaluate", "--teacher", small, *common, "--out", tmp_path / "r", expect=2), "teacher vocab")
    (tmp_path / "file").write_text("x")
    assert_clean_error(run_cli("evaluate", "--teacher", llama_teacher, *common, "--out", tmp_path / "file", expect=2),
                       "is a file")
    assert (tmp_path / "file").read_text() == "x"


def test_evaluate_evaluates_what_is_in_the_students_directory(cache_path, corpus_dir, llama_teacher, tmp_path):
    """`--students DIR`: every trained student in DIR (whatever params.yaml lists), skipping, with a note,
    one still training and a directory that is not a student; or DIR itself when it is one student;
    one not trained yet is refused."""
    students = tmp_path / "students"
    (tmp_path / "params.yaml").write_text("students:\n  listed: {d_model: 32}\n")  # names none of these
    for name, steps in (("a", 1), ("b", 2)):
        run_cli("train-student", "--cache", cache_path, "--out", students / name, "--max-steps", steps, "--device", "cpu",
                "--no-progress", *params(tmp_path, STUDENT_PARAMS))
    (students / "training").mkdir()
    (students / "training" / "train_log.tsv").write_text("step\n")
    (students / "notes").mkdir()
    common = ("evaluate", "--teacher", llama_teacher, "--corpus", corpus_dir, "--device", "cpu", "--no-progress",
              *params(tmp_path, "evaluate: {max_sequences: 4}\n"))
    result = run_cli(*common, "--students", students, "--out", tmp_path / "r1")
    assert set(json.loads((tmp_path / "r1" / "metrics.json").read_text())["students"]) == {"a", "b"}
    assert "skipping training (not trained yet: no metrics.json)" in result.output
    assert "skipping notes (not a student directory)" in result.output
    run_cli(*common, "--students", students / "a", "--out", tmp_path / "r2")
    assert set(json.loads((tmp_path / "r2" / "metrics.json").read_text())["students"]) == {"a"}
    assert_clean_error(run_cli(*common, "--students", students / "training", "--out", tmp_path / "r3", expect=2),
                       "is a student that is not trained yet")
    assert_clean_error(run_cli(*common, "--students", students / "notes", "--out", tmp_path / "r4", expect=2),
                       "no trained students in")
