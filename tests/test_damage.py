"""Damage to a corpus or a cache is refused in one line naming what is damaged, by every command
that reads it (issue 22 items 2 and 3); `verify` finds all of it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from pipeline.corpus.token_store import STORE_NAME
from tests.conftest import run_cli
from tests.test_errors import assert_clean_error
from tests.test_integrity import FIXTURE_CFG, every_array

CAPTURE = ("--k", FIXTURE_CFG.k, "--batch-size", 8, "--sequences-per-chunk", 4, "--sequences-per-shard", 16,
           "--no-progress")


def corpus_arrays(corpus) -> list[str]:
    store = zarr.open_group(corpus / STORE_NAME, mode="r")
    return sorted(name for name, _ in store.arrays())


def chunk_file(corpus, name: str):
    files = sorted(p for p in (corpus / STORE_NAME / name / "c").rglob("*") if p.is_file())
    return files[len(files) // 2]


def damage(path, how: str) -> None:
    """Flip a byte at the start, middle or end of an object, or delete it."""
    if how == "deleted":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    data[{"start": 0, "middle": len(data) // 2, "end": len(data) - 1}[how]] ^= 0xFF
    path.write_bytes(bytes(data))


def edit(corpus, name: str) -> None:
    """Rewrite one value through zarr: a valid chunk, with a valid checksum, of other content."""
    array = zarr.open_group(corpus / STORE_NAME, mode="r+")[name]
    index = (array.shape[0] // 2,) + (0,) * (array.ndim - 1)
    value = np.asarray(array[index])
    array[index] = value ^ np.array(1, dtype=value.dtype)  # of its own type (numpy 1 would promote a Python int)


@pytest.fixture(params=["text", "chat"])
def corpus_copy(request, corpus_dir, chat, tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(corpus_dir if request.param == "text" else chat["corpus"], copy)
    return copy


@pytest.mark.parametrize("how", ["start", "middle", "end", "deleted", "edited"])
def test_verify_finds_damage_to_every_array_of_a_corpus(corpus_copy, how):
    names = corpus_arrays(corpus_copy)
    assert {"train", "train_row_digests", "validation", "validation_row_digests"} <= set(names)
    assert run_cli("verify", corpus_copy, "--no-progress").output.strip().endswith("corpus intact (every row matches its digest)")
    pristine = corpus_copy.with_name("pristine")
    shutil.copytree(corpus_copy, pristine)
    for name in names:
        if how == "edited":
            edit(corpus_copy, name)
        else:
            damage(chunk_file(corpus_copy, name), how)
        result = run_cli("verify", corpus_copy, "--no-progress", expect=1)
        assert_clean_error(result, "the corpus is damaged")
        problems = [line for line in result.output.splitlines() if not line.startswith("error:")]
        # named: the array itself, or (digests) the fingerprint they no longer match
        split = name.removesuffix("_row_digests").removesuffix("_loss_mask")
        assert problems and any(name in line or (name.endswith("digests") and "fingerprint" in line)
                                or (split in line and "differ from their recorded digests" in line)
                                for line in problems), (name, problems)
        shutil.rmtree(corpus_copy)
        shutil.copytree(pristine, corpus_copy)


@pytest.mark.parametrize("name", ["train", "train_row_digests"])
def test_a_capture_refuses_a_damaged_corpus_in_one_line(corpus_dir, llama_teacher, tmp_path, name):
    corpus = tmp_path / "corpus"
    for how in ("deleted", "middle", "edited"):
        shutil.rmtree(corpus, ignore_errors=True)
        shutil.copytree(corpus_dir, corpus)
        edit(corpus, name) if how == "edited" else damage(chunk_file(corpus, name), how)
        result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus, "--out", tmp_path / f"{how}.zarr",
                         *CAPTURE, expect=2)
        assert_clean_error(result, str(corpus), "the corpus is damaged or was edited")
        assert name in result.output or "fingerprint" in result.output, result.output


def test_teacher_training_and_evaluate_refuse_a_damaged_corpus(corpus_dir, llama_teacher, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    damage(chunk_file(corpus, "train"), "deleted")
    damage(chunk_file(corpus, "validation"), "middle")
    result = run_cli("train-teacher", "--corpus", corpus, "--out", tmp_path / "t", "--max-steps", 1, "--no-progress", expect=2)
    assert_clean_error(result, "train rows", "the corpus is damaged")
    assert not (tmp_path / "t").exists()
    (tmp_path / "students" / "s").mkdir(parents=True)
    result = run_cli("evaluate", "--teacher", llama_teacher, "--corpus", corpus, "--students", tmp_path / "students",
                     "--out", tmp_path / "reports", "--no-progress", expect=2)
    assert_clean_error(result, "validation rows", "cannot be read (checksum mismatch)", "the corpus is damaged")


@pytest.mark.parametrize("name", ["topk_ids", "tail_logprob", "shard_complete", "shard_checksums", "chunk_checksums",
                                  "tokenizer_json"])
def test_a_damaged_zarr_json_of_one_cache_array_is_one_line_naming_it_in_every_command(cache_path, llama_teacher,
                                                                                       corpus_dir, tmp_path, name):
    cache = tmp_path / "c.zarr"
    shutil.copytree(cache_path, cache)
    assert name in every_array(cache) or name in ("shard_complete", "shard_checksums", "chunk_checksums",
                                                  "tokenizer_json")
    (cache / name / "zarr.json").write_text('{"zarr_format": 3, "node_type": "arr')
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    commands = [("inspect", cache), ("verify", cache, "--no-progress"), ("verify", cache, "--repair", "--no-progress"),
                ("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", cache, *CAPTURE,
                 "--temperatures", 1.0, "--temperatures", 2.0, "--tail-samples", 2),
                ("train-student", "--cache", cache, "--out", tmp_path / "s", "--max-steps", 1, "--device", "cpu",
                 "--no-progress")]
    capture = commands[3]
    if name == "tokenizer_json":  # the one a capture rewrites (from the corpus's tokenizer): below
        commands.remove(capture)
    for command in commands:
        assert_clean_error(run_cli(*command, expect=2), name, str(cache))
    assert {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()} == before  # nothing changed
    assert not (tmp_path / "s").exists()
    if name == "tokenizer_json":
        run_cli(*capture)
        assert "intact" in run_cli("verify", cache, "--no-progress").output


def test_a_damaged_zarr_json_of_a_corpus_array_is_one_line_naming_it(corpus_dir, llama_teacher, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    (corpus / STORE_NAME / "train" / "zarr.json").write_text("{")
    assert_clean_error(run_cli("verify", corpus, "--no-progress", expect=1), "the corpus is damaged")
    assert "train" in run_cli("verify", corpus, "--no-progress", expect=1).output
    result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus, "--out", tmp_path / "c.zarr",
                     *CAPTURE, expect=2)
    assert_clean_error(result, "array train is missing or its zarr.json is unreadable")
    assert not np.any([p.exists() for p in [tmp_path / "c.zarr"]])


def test_inspect_refuses_damage_it_reads_and_says_what_it_did_not_check(cache_path, tmp_path):
    """A truncated tail_logprob shard (zarr would read it as zeros) is refused, not averaged into the
    captured mass; damage to an array inspect does not read is left to `verify`, and the output says so."""
    from tests.test_integrity import shard_file

    cache = tmp_path / "c.zarr"
    shutil.copytree(cache_path, cache)
    intact = run_cli("inspect", cache).output
    assert "checked            every complete shard has all its objects; checksums of tail_logprob in the" in intact
    assert "the rest only by `pipeline verify`" in intact
    topk = shard_file(cache, "topk_ids", 1)
    damage(topk, "middle")
    assert run_cli("inspect", cache).output == intact  # not read by inspect: its output said so
    assert "shard 1: topk_ids: checksum mismatch" in run_cli("verify", cache, "--no-progress", expect=1).output
    tail = shard_file(cache, "tail_logprob", 2)
    tail.write_bytes(tail.read_bytes()[: tail.stat().st_size // 2])
    assert_clean_error(run_cli("inspect", cache, expect=2), "shard 2: tail_logprob: checksum mismatch")


def test_a_capture_refuses_an_edited_corpus_tokenizer_before_embedding_it(corpus_dir, llama_teacher, tmp_path):
    """The corpus's tokenizer.json is compared with the fingerprint the corpus recorded before the capture
    copies it into the cache: an edited one (two tokens swapped) is one line, and no cache is made."""
    import json

    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    spec = json.loads((corpus / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    (a, i), (b, j) = list(vocab.items())[300:302]
    vocab[a], vocab[b] = j, i
    (corpus / "tokenizer.json").write_text(json.dumps(spec))
    result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus, "--out", tmp_path / "c.zarr",
                     *CAPTURE, expect=2)
    assert_clean_error(result, "tokenizer.json is not the tokenizer this corpus was tokenized with")
    assert not (tmp_path / "c.zarr").exists()
