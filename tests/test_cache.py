"""Capture into a real Zarr cache: exact round trip, resumable, self-describing, refuses mismatches."""


import json

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.format import DONE, LOGPROB_FLOOR
from pipeline.cache.store import open_cache
from pipeline.settings.cache import CacheConfig
from pipeline.models.load import load_causal_lm
from pipeline.corpus.token_store import SplitRows, open_token_store
from pipeline.capture.topk import teacher_topk
from stages import cache_logits
from tests.conftest import run_cli, save_with_tokenizer, tiny_llama

CFG = CacheConfig(k=8, batch_size=5, sequences_per_chunk=4, sequences_per_shard=16, temperatures=(1.0, 2.0), tail_samples=3)


def capture(teacher, corpus, out, cfg=CFG, **kwargs):
    cache_logits.main(str(teacher), corpus, out, cfg, progress=False, **kwargs)
    return zarr.open_group(out, mode="r")


def read_all(group) -> dict[str, np.ndarray]:
    return {name: group[name][:] for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob", "log_partition", "tail_ids", DONE)}


@pytest.mark.parametrize("teacher_fixture", ["llama_teacher", "gpt2_teacher"])
def test_cache_equals_teacher_topk(request, teacher_fixture, corpus_dir, tmp_path):
    teacher = request.getfixturevalue(teacher_fixture)
    group = capture(teacher, corpus_dir, tmp_path / "c.zarr")
    rows = open_token_store(corpus_dir)["train"][:]
    assert np.array_equal(group["input_ids"][:], rows)

    model = load_causal_lm(str(teacher), torch.device("cpu"))
    direct = teacher_topk(model, torch.from_numpy(rows.astype(np.int64)), k=8, temperatures=(1.0, 2.0))
    S, T = rows.shape
    # stored in id order: the same top-k set, and each id keeps its own log-prob
    ids, order = direct.ids.sort(dim=-1)
    assert np.array_equal(group["topk_ids"][:].astype(np.int64), ids.numpy().reshape(S, T, 8))
    exact = direct.logprobs.gather(-1, order).clamp(min=LOGPROB_FLOOR).numpy().reshape(S, T, 8)
    stored = group["topk_logprobs"][:]
    np.testing.assert_allclose(stored, exact, rtol=0, atol=1 / 32 + 1e-6)  # 1/16-nat steps
    np.testing.assert_array_equal(group["tail_logprob"][:], direct.tail_logprob.numpy().reshape(S, T))
    np.testing.assert_array_equal(group["log_partition"][:, :, 0], direct.log_partition[:, 1].numpy().reshape(S, T))
    mass = np.exp(stored.astype(np.float64)).sum(-1) + np.exp(group["tail_logprob"][:].astype(np.float64))
    np.testing.assert_allclose(mass, 1.0, atol=0.04)  # each value within 1/32 nat
    # what the loss sees (renormalised k+1 outcomes) is within 1e-3 nats of the exact distribution
    p = np.concatenate([exact, group["tail_logprob"][:][..., None]], -1).astype(np.float64)
    q = np.concatenate([stored, group["tail_logprob"][:][..., None]], -1).astype(np.float64)
    q -= np.logaddexp.reduce(q, axis=-1, keepdims=True)
    assert (np.exp(p) * (p - q)).sum(-1).mean() < 1e-3
    # tail draws: 3 per position, in id order, never one of the position's top-k ids
    draws = group["tail_ids"][:].astype(np.int64)
    assert draws.shape == (S, T, 3) and (np.diff(draws, axis=-1) >= 0).all()
    assert not (draws[..., :, None] == ids.numpy().reshape(S, T, 1, 8)).any()


def test_cache_describes_itself(llama_teacher, corpus_dir, tmp_path):
    group = capture(llama_teacher, corpus_dir, tmp_path / "c.zarr")
    corpus = open_token_store(corpus_dir).attrs
    attrs = group.attrs
    assert attrs["k"] == 8 and attrs["vocab_size"] == corpus["vocab_size"] and attrs["seq_len"] == corpus["seq_len"]
    assert attrs["tokenizer_fingerprint"] == corpus["tokenizer_fingerprint"]
    assert attrs["corpus_fingerprint"] == corpus["corpus_fingerprint"]
    assert attrs["temperatures"] == [1.0, 2.0] and attrs["format_version"] == 7
    assert attrs["tail_samples"] == 3 and attrs["seed"] == 0
    for key in ("teacher_fingerprint", "codecs"):
        assert attrs[key]
    # run-specific facts are in the provenance record, not in the (hashed) identity
    for key in ("created", "package_version", "teacher", "host"):
        assert key not in attrs
    from pipeline.cache.provenance import read_provenance

    provenance = read_provenance(tmp_path / "c.zarr")
    assert provenance["teacher"] == str(llama_teacher) and provenance["created"] and provenance["package_version"]
    assert provenance["runs"][-1]["shards_written"] == group[DONE].shape[0]
    assert group["topk_ids"].dtype == np.uint16
    assert group["topk_ids"].shards == (16, corpus["seq_len"], 8) and group["topk_ids"].chunks == (4, corpus["seq_len"], 8)
    assert group[DONE][:].all()
    from pipeline.cache.store import cache_tokenizer
    from pipeline.corpus.tokenizer import fingerprint

    assert fingerprint(cache_tokenizer(group)) == corpus["tokenizer_fingerprint"]


def test_plain_zarr_decodes_the_cache(cache_path):
    """No import of this package: the codecs are registered numcodecs/Zarr codecs."""
    import subprocess
    import sys

    code = ("import sys, zarr\ng = zarr.open_group(sys.argv[1], mode='r')\n"
            "print(int(g['topk_ids'][0, 0, 0]), float(g['topk_logprobs'][0, 0].max()))\n"
            "assert 'pipeline' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code, str(cache_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    group = zarr.open_group(cache_path, mode="r")
    first_id, top_value = result.stdout.split()
    assert int(first_id) == int(group["topk_ids"][0, 0, 0]) and float(top_value) == float(group["topk_logprobs"][0, 0].max())


def test_interrupted_capture_resumes_to_the_same_cache(llama_teacher, corpus_dir, tmp_path):
    whole = read_all(capture(llama_teacher, corpus_dir, tmp_path / "whole.zarr"))
    n_shards = whole[DONE].size
    assert n_shards >= 3

    partial = tmp_path / "partial.zarr"
    capture(llama_teacher, corpus_dir, partial, CFG)  # then simulate two kinds of crash:
    group = zarr.open_group(partial, mode="r+")
    group[DONE][1] = 0  # died after writing data, before the flag
    group[DONE][2] = 0  # died mid-shard: data half written
    group["topk_ids"][32:40] = 0
    group["topk_logprobs"][32:40] = 0
    assert read_all(group)[DONE].sum() == n_shards - 2

    resumed = read_all(capture(llama_teacher, corpus_dir, partial))
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name], err_msg=name)


def test_shard_limit_stops_early_then_finishes(llama_teacher, corpus_dir, tmp_path):
    from pipeline.cache.format import CacheSpec
    from pipeline.cache.store import open_or_create
    from pipeline.capture.shards import capture as run_capture

    store = open_token_store(corpus_dir)
    model = load_causal_lm(str(llama_teacher), torch.device("cpu"))
    spec = CacheSpec("w", "tok", "corp", "train", model.config.vocab_size, 8, store.attrs["seq_len"],
                     store["train"].shape[0], 16, 4, (1.0,), 0)
    group = open_or_create(tmp_path / "c.zarr", spec, "{}", overwrite=False)
    assert run_capture(model, SplitRows(store, "train", "corpus"), group, spec, 3, torch.device("cpu"), shard_limit=2, progress=False) == [0, 1]
    assert group[DONE][:].tolist()[:3] == [1, 1, 0]
    rest = run_capture(model, SplitRows(store, "train", "corpus"), group, spec, 3, torch.device("cpu"), progress=False)
    assert len(rest) == spec.n_shards - 2 and group[DONE][:].all()


def test_vocab_above_uint16_stores_ids_exactly(corpus_dir, tmp_path):
    big = save_with_tokenizer(tiny_llama(70_000), corpus_dir, tmp_path / "big")
    cfg = CacheConfig(k=4, batch_size=8, sequences_per_chunk=8, sequences_per_shard=32)
    group = capture(big, corpus_dir, tmp_path / "c.zarr", cfg)
    assert group["topk_ids"].dtype == np.uint32 and group.attrs["vocab_size"] == 70_000
    rows = group["input_ids"][:4]
    direct = teacher_topk(load_causal_lm(str(big), torch.device("cpu")), torch.from_numpy(rows.astype(np.int64)), k=4)
    ids = group["topk_ids"][:4].astype(np.int64).reshape(-1, 4)
    assert np.array_equal(ids, np.sort(direct.ids.numpy(), axis=-1))
    assert ids.max() > 65_535  # the test means something only if high ids occur


def test_rerun_with_other_settings_is_refused_and_leaves_cache(llama_teacher, corpus_dir, tmp_path):
    out = tmp_path / "c.zarr"
    before = read_all(capture(llama_teacher, corpus_dir, out))
    result = run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, "--k", 5, expect=2)
    assert "k: cache has 8, this run has 5" in result.output and "Traceback" not in result.output
    after = read_all(zarr.open_group(out, mode="r"))
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])

    run_cli("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, "--k", 5, "--overwrite")
    assert open_cache(out).attrs["k"] == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_capture_matches_cpu(llama_teacher, corpus_dir, corpus_vocab):
    """The GPU path (top-k on the device, exact tail for every row, asynchronous pinned copies)
    gives the CPU's targets. fp32 on both, so only summation order differs."""
    from pipeline.cache.format import CacheSpec
    from pipeline.capture.shards import compute_shard

    rows = open_token_store(corpus_dir)["train"][:20]
    spec = CacheSpec(teacher_fingerprint="", tokenizer_fingerprint="", corpus_fingerprint="",
                     split="train", vocab_size=corpus_vocab,
                     k=8, seq_len=rows.shape[1], n_sequences=len(rows), sequences_per_shard=20,
                     sequences_per_chunk=4, temperatures=(1.0, 2.0), eos_id=0)
    results = {}
    for name in ("cpu", "cuda"):
        model = load_causal_lm(str(llama_teacher), torch.device("cpu")).to(name)  # fp32 weights on both
        results[name] = compute_shard(model, rows, spec, batch_size=3, device=torch.device(name))  # 7 batches, 2 slots
    cpu, gpu = results["cpu"], results["cuda"]
    same_set = (cpu["topk_ids"] == gpu["topk_ids"]).all(-1)
    assert same_set.mean() > 0.99  # ties at the k-th value may break differently
    np.testing.assert_allclose(gpu["topk_logprobs"][same_set], cpu["topk_logprobs"][same_set], atol=1e-4)
    np.testing.assert_allclose(gpu["tail_logprob"], cpu["tail_logprob"], atol=1e-3)
    np.testing.assert_allclose(gpu["log_partition"], cpu["log_partition"], atol=1e-4)


def test_resume_with_another_dtype_is_refused(llama_teacher, corpus_dir, tmp_path):
    """The teacher's compute dtype and device kind are part of the identity: shards computed in
    bf16 next to shards computed in fp32 would make a cache that disagrees with itself."""
    out = tmp_path / "c.zarr"
    args = ("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, "--k", 4,
            "--tail-samples", 0, "--device", "cpu")
    run_cli(*args)
    attrs = zarr.open_group(out, mode="r").attrs
    assert (attrs["teacher_dtype"], attrs["device_type"]) == ("float32", "cpu")
    fp32 = zarr.open_group(out, mode="r")["tail_logprob"][:]
    result = run_cli(*args, "--dtype", "bfloat16", expect=2)
    assert "teacher_dtype: cache has 'float32', this run has 'bfloat16'" in result.output and "--force" in result.output
    # --force resumes it anyway (a half-written cache finishes in the new dtype); the identity keeps fp32
    group = zarr.open_group(out, mode="r+")
    group[DONE][0] = 0
    result = run_cli(*args, "--dtype", "bfloat16", "--force")
    assert "resuming with another teacher dtype or device as forced" in result.output
    assert "1 shards written now" in result.output and zarr.open_group(out).attrs["teacher_dtype"] == "float32"
    mixed = zarr.open_group(out, mode="r")["tail_logprob"][:]
    rows = CacheConfig.sequences_per_shard
    assert not np.array_equal(mixed[:rows], fp32[:rows]) and np.array_equal(mixed[rows:], fp32[rows:])  # shard 0 redone
    # --force never covers another setting
    result = run_cli(*args[:-4], "--k", 5, "--tail-samples", 0, "--device", "cpu", "--force", expect=2)
    assert "k: cache has 4, this run has 5" in result.output
    run_cli(*args, "--dtype", "bfloat16", "--overwrite")
    group = zarr.open_group(out, mode="r")
    assert group.attrs["teacher_dtype"] == "bfloat16" and not np.array_equal(group["tail_logprob"][:], fp32)


def test_device_map_gives_the_same_cache(llama_teacher, corpus_dir, tmp_path):
    """--device-map spreads the teacher with accelerate (here: all of it on the CPU, the only device):
    the same arrays as the plain capture."""
    caches = [tmp_path / "plain.zarr", tmp_path / "mapped.zarr"]
    args = ("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--k", 4, "--device", "cpu")
    run_cli(*args, "--out", caches[0])
    run_cli(*args, "--out", caches[1], "--device-map", "auto")
    plain, mapped = (zarr.open_group(c, mode="r") for c in caches)
    for name in plain.attrs["shard_arrays"]:
        np.testing.assert_array_equal(mapped[name][:], plain[name][:], err_msg=name)
    assert dict(mapped.attrs) == dict(plain.attrs)


def test_manifest_stands_for_the_cache_and_refuses_a_changed_one(llama_teacher, corpus_dir, tmp_path):
    out, manifest = tmp_path / "c.zarr", tmp_path / "c.manifest.json"
    args = ("cache-logits", "--teacher", llama_teacher, "--corpus", corpus_dir, "--out", out, "--k", 4,
            "--device", "cpu", "--manifest", manifest)
    run_cli(*args)
    written = json.loads(manifest.read_text())
    assert written["location"] == str(out) and written["shards_complete"] == written["shards_total"]
    run_cli(*args)  # an identical rerun writes an identical manifest (DVC sees no change)
    assert json.loads(manifest.read_text()) == written
    assert json.loads(run_cli("inspect", manifest, "--json").output)["shards_complete"] == written["shards_total"]
    run_cli("train-student", "--cache", manifest, "--out", tmp_path / "s", "--max-steps", 1, "--device", "cpu")
    group = zarr.open_group(out, mode="r+")
    group["shard_checksums"][0, 0] ^= np.uint64(1)  # what a recapture of one shard would change
    result = run_cli("train-student", "--cache", manifest, "--out", tmp_path / "s2", "--max-steps", 1, expect=2)
    assert "has changed since" in result.output
