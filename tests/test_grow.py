"""A cache that grows with its corpus: `prepare-corpus --append` adds rows after the old ones, and
`cache-logits` then captures only the shards whose rows are new or changed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import zarr

from pipeline.cache.format import CHECKSUMS
from pipeline.corpus.tokenize import is_validation
from pipeline.corpus.token_store import STORE_NAME
from tests.conftest import run_cli

CAPTURE = ("--k", "4", "--batch-size", "16", "--tail-samples", "2", "--no-masked-targets")


def _shard_objects(cache: Path) -> dict[str, float]:
    """Every shard object of the data arrays -> its modification time."""
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.glob("*/c/*/**/*") if p.is_file()}


def test_append_adds_rows_and_the_capture_writes_only_the_new_shards(tmp_path, text_dir, llama_teacher):
    plays = sorted(text_dir.glob("*.txt"))
    names = [f"p{i}.txt" for i in range(len(plays) + 20)]
    train_names = [n for n in names if not is_validation(n, 0.25, 0)]
    validation_name = next(n for n in names if is_validation(n, 0.25, 0))
    source = tmp_path / "texts"
    source.mkdir()
    shutil.copy(plays[0], source / validation_name)
    for play, name in zip(plays[1:7], train_names):  # seven plays: one held out, six for training
        shutil.copy(play, source / name)
    params = tmp_path / "params.yaml"
    params.write_text(f"prepare_corpus:\n  teacher: {llama_teacher}\n  seq_len: 16\n  validation_fraction: 0.25\n"
                      "cache_logits:\n  sequences_per_shard: 16\n  sequences_per_chunk: 4\n")
    corpus, cache = tmp_path / "corpus", tmp_path / "logits.zarr"
    prepare = ("prepare-corpus", "--source", source, "--params", params, "--no-progress")
    capture = ("cache-logits", "--teacher", llama_teacher, "--corpus", corpus, "--params", params, *CAPTURE)
    run_cli(*prepare, "--out", corpus)
    run_cli(*capture, "--out", cache)
    old_rows = zarr.open_group(corpus / STORE_NAME, mode="r")["train"][:]
    old_shards = -(-len(old_rows) // 16)
    before = _shard_objects(cache)

    shutil.copy(plays[7], source / max(train_names[6], validation_name).replace("p", "q"))  # one more play: ~1/7 more rows, all in train
    appended = run_cli(*prepare, "--out", corpus, "--append").output
    assert "1 new units" in appended
    rows = zarr.open_group(corpus / STORE_NAME, mode="r")["train"][:]
    np.testing.assert_array_equal(rows[: len(old_rows)], old_rows)  # the old rows as they were
    # ... and the whole corpus as a from-scratch prepare of the same files makes it (the packing went on)
    run_cli(*prepare, "--out", tmp_path / "scratch-corpus")
    scratch_rows = zarr.open_group(tmp_path / "scratch-corpus" / STORE_NAME, mode="r")["train"][:]
    np.testing.assert_array_equal(rows, scratch_rows)

    # an append killed half-way (rows written past the counts): readers refuse the store, and the
    # next --append cuts them off and finishes with the same rows
    store = zarr.open_group(corpus / STORE_NAME, mode="r+")
    store.attrs.update({"appending": True})
    store["train"].resize((len(rows) + 5, 16))
    assert "--append` was interrupted" in run_cli(*capture, "--out", cache, expect=2).output
    assert "interrupted append cut off" in run_cli(*prepare, "--out", corpus, "--append").output
    np.testing.assert_array_equal(zarr.open_group(corpus / STORE_NAME, mode="r")["train"][:], scratch_rows)

    grown = run_cli(*capture, "--out", cache).output
    new_shards = -(-len(rows) // 16)
    partial = len(old_rows) % 16 != 0  # the old last shard gained rows: captured again
    written = int(re.search(r"\((\d+) shards written now", grown).group(1))
    assert new_shards > old_shards and written == new_shards - old_shards + partial
    after = _shard_objects(cache)
    kept = [key for key in before if int(key.split("/c/")[1].split("/")[0]) < old_shards - partial]
    assert kept and all(after[key] == before[key] for key in kept)  # not rewritten

    run_cli(*capture, "--out", tmp_path / "scratch.zarr", "--corpus", tmp_path / "scratch-corpus")
    grown_cache, scratch = (zarr.open_group(p, mode="r") for p in (cache, tmp_path / "scratch.zarr"))
    for name in [*grown_cache.attrs["shard_arrays"], CHECKSUMS]:
        np.testing.assert_array_equal(grown_cache[name][:], scratch[name][:], err_msg=name)
    assert grown_cache.attrs.asdict() | {"codecs": None} == scratch.attrs.asdict() | {"codecs": None}

    # other rows (an edited play), not more: refused, and started over only when asked
    edited = source / train_names[0]
    edited.write_text(edited.read_text().replace("the", "THE"))
    run_cli(*prepare, "--out", corpus, "--overwrite")
    refused = run_cli(*capture, "--out", cache, expect=2).output
    assert "captured from other corpus rows" in refused and "Traceback" not in refused
    assert "starting over" in run_cli(*capture, "--out", cache, "--restart-on-mismatch").output

    # a setting the rows depend on: the whole corpus again, saying why; the cache then refuses it
    changed = run_cli(*prepare, "--out", corpus, "--append", "--seq-len", "8").output
    assert "seq_len changed (16 -> 8)" in changed and "preparing the whole corpus again" in changed
    refused = run_cli(*capture, "--out", cache, expect=2).output
    assert "seq_len" in refused and "Traceback" not in refused


def test_max_sequences_captures_the_first_rows_and_raising_it_keeps_the_shards(tmp_path, corpus_dir, llama_teacher,
                                                                               cache_path):
    """cache_logits.max_sequences: the cache holds the split's first N sequences, each as the whole
    capture has it; raised later, the shards already written stay and only the new ones are written."""
    capture = ("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--k", "8", "--batch-size", "8",
               "--sequences-per-chunk", "4", "--sequences-per-shard", "16", "--temperatures", "1.0",
               "--temperatures", "2.0", "--tail-samples", "2")
    whole = zarr.open_group(cache_path, mode="r")
    assert whole["input_ids"].shape[0] > 40
    cache = tmp_path / "first.zarr"
    run_cli(*capture, "--out", cache, "--max-sequences", "20", "--no-progress")
    first = zarr.open_group(cache, mode="r")
    assert first["input_ids"].shape[0] == 20 and first.attrs["n_sequences"] == 20
    for name in first.attrs["shard_arrays"]:
        np.testing.assert_array_equal(first[name][:], whole[name][:20], err_msg=name)
    before = _shard_objects(cache)
    grown = run_cli(*capture, "--out", cache, "--max-sequences", "40", "--no-progress").output
    assert "(2 shards written now" in grown  # the short second shard again, and the third
    after = _shard_objects(cache)
    kept = [key for key in before if key.split("/c/")[1].split("/")[0] == "0"]
    assert kept and all(after[key] == before[key] for key in kept)
    grown_cache = zarr.open_group(cache, mode="r")
    for name in grown_cache.attrs["shard_arrays"]:
        np.testing.assert_array_equal(grown_cache[name][:], whole[name][:40], err_msg=name)
