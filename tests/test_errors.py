"""User mistakes give one clear line, exit code 2, no traceback, and nothing already written is lost."""

import os
from pathlib import Path

import pytest

from tests.conftest import run_cli


def assert_clean_error(result, *needles):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_missing_corpus_source(tmp_path):
    result = run_cli("prepare-corpus", "--source", tmp_path / "nope", "--out", tmp_path / "c", expect=2)
    assert_clean_error(result, "corpus source not found")
    assert not (tmp_path / "c").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("   \n")
    result = run_cli("prepare-corpus", "--source", tmp_path / "src", "--out", tmp_path / "c", expect=2)
    assert_clean_error(result, "empty")


def test_unreadable_and_malformed_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json}\n')
    assert_clean_error(run_cli("prepare-corpus", "--source", tmp_path / "bad.jsonl", "--out", tmp_path / "c", expect=2),
                       "bad.jsonl:2")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x9c" * 10)
    assert_clean_error(run_cli("prepare-corpus", "--source", tmp_path / "bin.txt", "--out", tmp_path / "c", expect=2),
                       "not UTF-8")
    if os.geteuid() != 0:  # root reads through permissions
        locked = tmp_path / "locked.txt"
        locked.write_text("x")
        locked.chmod(0)
        assert_clean_error(run_cli("prepare-corpus", "--source", locked, "--out", tmp_path / "c", expect=2))


def test_existing_output_is_not_overwritten(text_dir, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = run_cli("prepare-corpus", "--source", text_dir, "--out", out, expect=2)
    assert_clean_error(result, "not empty", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"


def test_cache_logits_bad_inputs(llama_teacher, corpus_dir, corpus_vocab, tmp_path):
    out = tmp_path / "c.zarr"
    assert_clean_error(run_cli("cache-logits", "--teacher", tmp_path / "none", "--corpus", corpus_dir, "--out", out, expect=2),
                       "--teacher", "is neither an existing directory nor a hub id")
    assert_clean_error(run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", tmp_path / "none", "--out", out, expect=2),
                       "corpus directory not found")
    assert_clean_error(run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out,
                               "--k", corpus_vocab + 1, expect=2), "larger than the teacher vocab")
    assert_clean_error(run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out,
                               "--k", corpus_vocab, "--tail-samples", 2, expect=2), "tail_samples needs a tail")
    assert_clean_error(run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out,
                               "--tail-samples", -1, expect=2), "tail_samples must be >= 0")
    assert not out.exists()
    not_a_cache = tmp_path / "dir"
    not_a_cache.mkdir()
    (not_a_cache / "x").write_text("mine")
    assert_clean_error(run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", not_a_cache, expect=2),
                       "not a logit cache")
    assert (not_a_cache / "x").read_text() == "mine"


def test_teacher_with_smaller_vocab_is_refused(corpus_dir, corpus_vocab, tmp_path):
    from tests.conftest import save_with_tokenizer, tiny_llama

    small = save_with_tokenizer(tiny_llama(corpus_vocab - 10), corpus_dir, tmp_path / "small")
    result = run_cli("cache-logits", "--teacher", small, "--corpus", corpus_dir, "--out", tmp_path / "c.zarr", expect=2)
    assert_clean_error(result, f"teacher vocab {corpus_vocab - 10} < corpus tokenizer vocab {corpus_vocab}")


def test_teacher_with_another_tokenizer_is_refused(corpus_dir, corpus_vocab, text_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from pipeline.corpus.tokenize import read_documents
    from pipeline.corpus.tokenizer import train_bpe
    from tests.conftest import tiny_llama

    other = train_bpe((d.text[::-1] for d in read_documents(str(text_dir))), corpus_vocab)
    teacher = tmp_path / "t"
    tiny_llama(corpus_vocab).save_pretrained(teacher)
    PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<|endoftext|>").save_pretrained(teacher)
    result = run_cli("cache-logits", "--teacher", teacher, "--corpus", corpus_dir, "--out", tmp_path / "c.zarr", expect=2)
    assert_clean_error(result, "teacher tokenizer", "!= corpus tokenizer")


def test_inspect_of_a_non_cache(tmp_path):
    assert_clean_error(run_cli("inspect", tmp_path / "missing.zarr", expect=2), "cache not found")


@pytest.mark.parametrize("params, needle", [
    ("cache_logits:\n  kk: 3\n", "unknown key 'kk'"),
    ("cache_logits:\n  k: three\n", "expected an integer"),
    ("cache_logits:\n  k: 0\n", "k must be >= 1"),
    ("cache_logits: [1, 2\n", "not valid YAML"),
])
def test_bad_params_are_named(params, needle, llama_teacher, corpus_dir, tmp_path):
    (tmp_path / "p.yaml").write_text(params)
    result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", tmp_path / "c.zarr",
                     "--params", tmp_path / "p.yaml", expect=2)
    assert_clean_error(result, needle)


@pytest.mark.parametrize("args", [
    ("train-student", "--cache", "c.zarr", "--out", "s3://bucket/student"),
    ("train-teacher", "--corpus", "c", "--out", "gs://bucket/teacher"),
    ("evaluate", "--teacher", "t", "--corpus", "c", "--students", "s3://bucket/students", "--out", "r"),
    ("cache-logits", "--teacher", "t", "--corpus", "c", "--out", "c.zarr", "--manifest", "s3://bucket/m.json"),
])
def test_a_url_where_only_a_local_path_works_is_one_line(args, tmp_path):
    result = run_cli(*args, expect=2)
    assert_clean_error(result, "must be a local path")
    assert not any(tmp_path.iterdir()) and not Path("s3:").exists() and not Path("gs:").exists()
