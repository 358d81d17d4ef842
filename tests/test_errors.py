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


@pytest.mark.parametrize("seed", [-1, 2**63, 2**70])
def test_a_seed_out_of_range_is_one_line(cache_path, llama_teacher, corpus_dir, tmp_path, seed):
    """numpy and torch take seeds in [0, 2^63): train-student and cache-logits refuse others at once."""
    result = run_cli("train-student", "--cache", cache_path, "--out", tmp_path / "s", "--seed", seed, "--max-steps", 1,
                     "--device", "cpu", "--no-progress", expect=2)
    assert_clean_error(result, "seed must be >= 0 and < 2^63", str(seed))
    result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", tmp_path / "c.zarr",
                     "--seed", seed, "--no-progress", expect=2)
    assert_clean_error(result, "seed must be >= 0 and < 2^63", str(seed))
    assert not (tmp_path / "s").exists() and not (tmp_path / "c.zarr").exists()


def test_a_garbage_zst_source_is_one_line_naming_it(tmp_path):
    (tmp_path / "docs.jsonl.zst").write_bytes(b"this is not a zstd stream at all\n" * 4)
    result = run_cli("prepare-corpus", "--source", tmp_path / "docs.jsonl.zst", "--out", tmp_path / "c", expect=2)
    assert_clean_error(result, "docs.jsonl.zst", "not a readable .zst file")
    assert not (tmp_path / "c").exists()


def test_a_teacher_without_tokenizer_files_is_compared_by_its_config(corpus_dir, corpus_vocab, tmp_path):
    """No tokenizer files: nothing to fingerprint. A config whose end-of-text id is not the corpus's is
    another tokenizer's, refused in one line; one that contradicts nothing is captured."""
    from pipeline.models.load import build_llama
    from tests.conftest import tiny_llama

    other = tmp_path / "other"  # eos 2: the corpus's is 0
    build_llama(corpus_vocab, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, eos_id=2).save_pretrained(other)
    result = run_cli("cache-logits", "--teacher", other, "--corpus", corpus_dir, "--out", tmp_path / "c.zarr",
                     "--no-progress", expect=2)
    assert_clean_error(result, "has no tokenizer files to compare", "eos_token_id 2 is not the tokenizer's "
                       "end-of-text id 0")
    assert not (tmp_path / "c.zarr").exists()
    same = tmp_path / "same"
    tiny_llama(corpus_vocab).save_pretrained(same)  # eos 0, the corpus's vocabulary
    run_cli("cache-logits", "--teacher", same, "--corpus", corpus_dir, "--out", tmp_path / "d.zarr", "--k", 4,
            "--max-sequences", 16, "--no-progress")


def test_a_teacher_with_a_smaller_vocabulary_gets_the_vocabulary_line_before_any_other(corpus_dir, corpus_vocab,
                                                                                     tmp_path):
    """Teachers without tokenizer files (nothing else compared), of two families: the vocabulary is checked
    before the tokenizer, the config and the head."""
    from tests.conftest import tiny_gpt2, tiny_llama

    small = tmp_path / "small"
    tiny_llama(corpus_vocab - 10).save_pretrained(small)
    gpt2 = tmp_path / "gpt2"  # its eos id (50256) is not the corpus's either
    tiny_gpt2(corpus_vocab - 1).save_pretrained(gpt2)
    for teacher, vocab in ((small, corpus_vocab - 10), (gpt2, corpus_vocab - 1)):
        result = run_cli("cache-logits", "--teacher", teacher, "--corpus", corpus_dir, "--out", tmp_path / "c.zarr",
                         "--no-progress", expect=2)
        assert_clean_error(result, f"teacher vocab {vocab} < corpus tokenizer vocab {corpus_vocab}")
