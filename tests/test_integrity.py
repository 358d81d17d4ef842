"""A cache that is damaged or non-finite is refused, never trained on (issue 9, cases 1 and 2)."""

import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.format import CHECKSUMS, CHUNK_CHECKSUMS, DONE, ROW_DIGESTS, CacheSpec, array_layout
from pipeline.cache.integrity import shard_key
from pipeline.distributed import Process
from pipeline.settings.cache import CacheConfig
from stages import cache_logits
from tests.conftest import run_cli, save_with_tokenizer, tiny_llama
from tests.test_errors import assert_clean_error

# the settings of the `cache_path` fixture, to recapture repaired shards
FIXTURE_CFG = CacheConfig(k=8, batch_size=8, sequences_per_chunk=4, sequences_per_shard=16, temperatures=(1.0, 2.0),
                          tail_samples=2)
STUDENT = ("--max-steps", 2, "--device", "cpu")


@pytest.fixture
def cache_copy(cache_path, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(cache_path, copy)
    return copy


def shard_file(cache, name: str, shard: int):
    group = zarr.open_group(cache, mode="r")
    return cache / shard_key(group[name], shard)


def every_array(cache) -> list[str]:
    return list(array_layout(CacheSpec.from_attrs(dict(zarr.open_group(cache, mode="r").attrs))))


def read_all(cache) -> dict[str, np.ndarray]:
    group = zarr.open_group(cache, mode="r")
    return {name: group[name][:] for name in [*every_array(cache), DONE, CHECKSUMS, CHUNK_CHECKSUMS, ROW_DIGESTS]}


def record_as_written(group) -> None:
    """Record every complete shard's checksums from its objects as they are now, as a capture does when it
    writes a shard: a cache rewritten through zarr then holds what was written, values and all."""
    from pipeline.cache.integrity import shard_records

    spec = CacheSpec.from_attrs(dict(group.attrs))
    for shard in np.flatnonzero(group[DONE][:]):
        checksums, chunks = shard_records(group, spec, int(shard))
        group[CHECKSUMS][shard], group[CHUNK_CHECKSUMS][shard] = checksums, chunks


def test_verify_detects_every_single_shard_corruption(cache_copy):
    """One bit flipped in every shard object of every array: each is found and named, none missed,
    none doubled; restored, the cache verifies clean again."""
    from pipeline.cache.integrity import verify

    group = zarr.open_group(cache_copy, mode="r")
    spec = CacheSpec.from_attrs(dict(group.attrs))
    rng = np.random.default_rng(0)
    assert verify(group, spec) == []
    originals = {}
    for name in every_array(cache_copy):
        for shard in range(spec.n_shards):
            path = shard_file(cache_copy, name, shard)
            originals[path] = path.read_bytes()
            damaged = bytearray(originals[path])
            damaged[rng.integers(len(damaged))] ^= 1 << int(rng.integers(8))
            path.write_bytes(bytes(damaged))
    problems = verify(group, spec)
    expected = [(shard, name, "checksum mismatch") for shard in range(spec.n_shards) for name in every_array(cache_copy)]
    assert sorted((p.shard, p.array, p.what) for p in problems) == sorted(expected)
    assert len(expected) == len(every_array(cache_copy)) * spec.n_shards >= 6 * 30
    for path, original in originals.items():
        path.write_bytes(original)
    assert verify(group, spec) == []


def test_deleted_shard_is_an_error_not_zeros_and_is_repaired(cache_copy, cache_path, llama_teacher, corpus_dir, tmp_path):
    shard_file(cache_copy, "topk_logprobs", 3).unlink()
    assert_clean_error(run_cli("train-student", "--cache", cache_copy, "--out", tmp_path / "s", *STUDENT, expect=2),
                       "shard 3: topk_logprobs: missing object")
    assert not (tmp_path / "s").exists()
    assert_clean_error(run_cli("inspect", cache_copy, expect=2), "missing object")
    result = run_cli("verify", cache_copy, "--no-progress", expect=1)
    assert "shard 3: topk_logprobs: missing object" in result.output
    run_cli("verify", cache_copy, "--repair", "--no-progress", expect=1)
    assert zarr.open_group(cache_copy, mode="r")[DONE][3] == 0
    cache_logits.main(str(llama_teacher), corpus_dir, cache_copy, FIXTURE_CFG, progress=False)
    assert "intact" in run_cli("verify", cache_copy, "--no-progress").output
    repaired, original = read_all(cache_copy), read_all(cache_path)
    for name in original:
        np.testing.assert_array_equal(repaired[name], original[name], err_msg=name)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_repair_then_capture_restores_damage_anywhere_in_a_shard_of_every_array(cache_copy, cache_path, llama_teacher,
                                                                               corpus_dir, where):
    """A byte flipped at the start, middle or end (the shard index) of one shard object of every array:
    `verify --repair` then `cache-logits` gives back the intact cache (the write does not read the old,
    damaged shard: repair removed it)."""
    names = every_array(cache_copy)
    for i, name in enumerate(names):
        path = shard_file(cache_copy, name, i % 3)
        damaged = bytearray(path.read_bytes())
        damaged[{"start": 0, "middle": len(damaged) // 2, "end": len(damaged) - 1}[where]] ^= 0xFF
        path.write_bytes(bytes(damaged))
    run_cli("verify", cache_copy, "--repair", "--no-progress", expect=1)
    cache_logits.main(str(llama_teacher), corpus_dir, cache_copy, FIXTURE_CFG, progress=False)
    assert "intact" in run_cli("verify", cache_copy, "--no-progress").output
    repaired, original = read_all(cache_copy), read_all(cache_path)
    for name in original:
        np.testing.assert_array_equal(repaired[name], original[name], err_msg=name)


def test_corrupted_chunk_fails_loudly_when_read(cache_copy, tmp_path):
    """The loader and inspect decode through each chunk's crc32c: a flipped byte stops them."""
    for name, shard in (("topk_logprobs", 0), ("tail_logprob", 1)):
        path = shard_file(cache_copy, name, shard)
        damaged = bytearray(path.read_bytes())
        damaged[len(damaged) // 3] ^= 0xFF
        path.write_bytes(bytes(damaged))
    (tmp_path / "p.yaml").write_text("train_student:\n  num_workers: 2\n  batch_size: 64\n  shuffle_window: 64\n"
                                     "  d_model: 32\n  n_layers: 1\n  d_ff: 64\n")
    result = run_cli("train-student", "--cache", cache_copy, "--out", tmp_path / "s", *STUDENT,
                     "--params", tmp_path / "p.yaml", expect=2)
    assert_clean_error(result, "cannot be read", "the cache is corrupted")  # raised in a worker process
    assert not (tmp_path / "s" / "model.safetensors").exists()
    # inspect checks the checksums of what it reads first
    assert_clean_error(run_cli("inspect", cache_copy, expect=2), "shard 1: tail_logprob: checksum mismatch")


@pytest.mark.parametrize("tail_samples", [0, 2])
def test_teacher_with_nan_is_refused_naming_the_first_bad_position(corpus_dir, corpus_vocab, tmp_path, tail_samples):
    from pipeline.corpus.token_store import open_token_store

    rows = open_token_store(corpus_dir)["train"][:]
    poison = int(rows[2, 5])  # this token's embedding is NaN: every later position of its rows is NaN
    model = tiny_llama(corpus_vocab)
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    teacher = save_with_tokenizer(model, corpus_dir, tmp_path / "t")
    hits = np.argwhere(rows == poison)
    row, position = hits[0]
    out = tmp_path / "c.zarr"
    result = run_cli("cache-logits", "--teacher", teacher, "--corpus", corpus_dir, "--out", out,
                     "--tail-samples", tail_samples, "--device", "cpu", expect=2)
    assert_clean_error(result, "non-finite", f"sequence {row}, position {position}")
    assert zarr.open_group(out, mode="r")[DONE][:].sum() == 0  # nothing stored as if it were fine


def test_student_stops_on_a_non_finite_loss_and_saves_nothing(cache_copy, tmp_path):
    group = zarr.open_group(cache_copy, mode="r+")
    group["tail_logprob"][:] = np.nan  # a well-formed cache with bad values (e.g. from another tool)
    record_as_written(group)  # ... which recorded their checksums: what is read is what was written
    (tmp_path / "p.yaml").write_text("train_student:\n  num_workers: 0\n  d_model: 32\n  n_layers: 1\n  d_ff: 64\n"
                                     "  checkpoint_every: 1\n")
    result = run_cli("train-student", "--cache", cache_copy, "--out", tmp_path / "s", *STUDENT,
                     "--params", tmp_path / "p.yaml", expect=2)
    assert_clean_error(result, "non-finite training loss", "step 1")
    assert not (tmp_path / "s" / "model.safetensors").exists() and not (tmp_path / "s" / "metrics.json").exists()
    assert not (tmp_path / "s" / "checkpoint.pt").exists()


def test_a_non_finite_gradient_from_a_finite_loss_never_reaches_the_weights(cache_path):
    """The loss is finite but a gradient is not (here a layer's gradient turned NaN on its way back): the
    step stops before the optimizer, naming the step, and every weight is as it was."""
    from pipeline.errors import UserError
    from pipeline.optim import make_optimizer
    from pipeline.settings.student import StudentConfig
    from pipeline.train.checkpoint import TrainState
    from pipeline.train.loader import StreamSpec, make_loader
    from pipeline.train.student import train_step

    attrs = zarr.open_group(cache_path, mode="r").attrs
    model = tiny_llama(attrs["vocab_size"])
    model.train()
    model.model.layers[0].mlp.down_proj.weight.register_hook(lambda grad: grad * float("nan"))
    before = {name: value.detach().clone() for name, value in model.named_parameters()}
    cfg = StudentConfig(batch_size=4, num_workers=0)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    batches = iter(make_loader(StreamSpec(str(cache_path), 4, 0, 16), 0))
    with pytest.raises(UserError, match="non-finite gradient norm .* at step 1"):
        train_step(model, optimizer, batches, TrainState(), cfg, torch.device("cpu"), Process(), None)
    assert all(torch.equal(value, before[name]) for name, value in model.named_parameters())
    assert not optimizer.state  # no step was taken


def test_a_damaged_tokenizer_in_the_cache_is_refused_before_training(cache_copy, tmp_path):
    """The cache's tokenizer (saved beside the student when it is done) is read before the first step:
    damaged, it stops train-student at once in one line, with nothing trained or written."""
    chunk = next((cache_copy / "tokenizer_json" / "c").rglob("*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    out = tmp_path / "s"
    result = run_cli("train-student", "--cache", cache_copy, "--out", out, *STUDENT, "--no-progress", expect=2)
    assert_clean_error(result, "tokenizer_json is corrupted")
    assert not out.exists() or not any(out.iterdir())


def test_verify_without_repair_writes_nothing(cache_copy, tmp_path):
    """`verify` only reads: on an intact cache, a damaged one, and a path that does not exist, not a
    file or directory appears or changes beside or inside it (no lock file); `--repair` may lock."""
    def tree(root):
        return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}

    before = tree(tmp_path)
    assert "intact" in run_cli("verify", cache_copy, "--no-progress").output
    assert tree(tmp_path) == before
    shard_file(cache_copy, "topk_ids", 0).write_bytes(b"damaged")
    before = tree(tmp_path)
    run_cli("verify", cache_copy, "--no-progress", expect=1)
    missing = tmp_path / "no" / "such.zarr"
    assert_clean_error(run_cli("verify", missing, expect=2), "cache not found")
    assert tree(tmp_path) == before
    run_cli("verify", cache_copy, "--repair", "--no-progress", expect=1)
    assert not zarr.open_group(cache_copy, mode="r")[DONE][0]  # repaired: marked for recapture


def test_the_crc32c_of_a_whole_shard_object_is_blind_to_its_content_and_its_chunks_are_not(tmp_path):
    """Why the cache records each chunk's crc32c: a chunk ends with its own crc32c, a message followed by its
    crc32c always has the same crc32c, so two shard objects of equally long chunks have the same crc32c
    whatever they hold; the crc32c each chunk carries tells them apart."""
    import google_crc32c
    from zarr.codecs import Crc32cCodec

    from pipeline.cache.integrity import chunk_entries

    array = zarr.create_array(tmp_path / "a.zarr", shape=(8, 4), chunks=(2, 4), shards=(4, 4), dtype="uint32",
                              compressors=[Crc32cCodec()], fill_value=0)
    array[:] = np.arange(32, dtype=np.uint32).reshape(8, 4) * 7 + 1  # two shards of other values
    first, second = ((tmp_path / "a.zarr" / "c" / str(s) / "0").read_bytes() for s in (0, 1))
    assert first != second and len(first) == len(second)
    assert google_crc32c.value(first) == google_crc32c.value(second)  # blind
    assert not np.array_equal(chunk_entries(first, 2), chunk_entries(second, 2))  # not blind


def swap_shard_objects(cache, name: str, a: int, b: int, checksums_too: bool) -> None:
    """Swap two shard objects of an array (each chunk's crc32c stays valid); `checksums_too`: swap their
    whole-object checksums as well, as when their chunks are equally long (see the test above)."""
    first, second = shard_file(cache, name, a), shard_file(cache, name, b)
    data = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(data)
    if checksums_too:
        table, column = zarr.open_group(cache, mode="r+")[CHECKSUMS], every_array(cache).index(name)
        row_a, row_b = table[a], table[b]
        row_a[column], row_b[column] = row_b[column], row_a[column]
        table[a], table[b] = row_a, row_b


@pytest.mark.parametrize("checksums_too", [False, True])
def test_swapped_shard_objects_are_refused_by_every_reader(cache_copy, tmp_path, checksums_too):
    """Shards 1 and 2 of topk_logprobs (and of tail_logprob, which inspect reads) swapped: the training
    stream, the dataset and inspect each stop in one line naming a swapped shard, before using it;
    verify names both."""
    from pipeline.errors import UserError
    from pipeline.train.data import LogitCache

    swap_shard_objects(cache_copy, "topk_logprobs", 1, 2, checksums_too)
    result = run_cli("verify", cache_copy, "--no-progress", expect=1)
    assert "shard 1: topk_logprobs: " in result.output and "shard 2: topk_logprobs: " in result.output
    (tmp_path / "p.yaml").write_text("train_student:\n  d_model: 32\n  n_layers: 1\n  d_ff: 64\n")
    result = run_cli("train-student", "--cache", cache_copy, "--out", tmp_path / "s", *STUDENT,
                     "--params", tmp_path / "p.yaml", expect=2)  # read in a DataLoader worker
    assert_clean_error(result, "topk_logprobs: not the object written there", f"pipeline verify {cache_copy}")
    assert not (tmp_path / "s" / "model.safetensors").exists()
    dataset = LogitCache.open(cache_copy).dataset()
    dataset[0]  # shard 0 is intact
    with pytest.raises(UserError, match="shard 1: topk_logprobs: not the object written there"):
        dataset[16]
    swap_shard_objects(cache_copy, "tail_logprob", 1, 2, checksums_too=True)
    assert_clean_error(run_cli("inspect", cache_copy, expect=2), "tail_logprob: not the object written there")


def test_a_shard_removed_while_a_reader_reads_is_an_error_not_zeros(cache_copy):
    """`verify --repair` clears a shard (flag, rows, objects) while a student reads the cache it opened
    before: the stream and the dataset stop naming the shard, instead of reading the fill values."""
    from pipeline.cache.integrity import clear_shards
    from pipeline.errors import UserError
    from pipeline.train.data import LogitCache
    from pipeline.train.loader import StreamSpec, make_loader

    cache = LogitCache.open(cache_copy)
    dataset = cache.dataset()
    dataset[0]
    stream = make_loader(StreamSpec(str(cache_copy), 4, 0, 16, epochs=1), 0)  # opened, not yet read
    clear_shards(zarr.open_group(cache_copy, mode="r+"), cache.spec, [2])  # what --repair does
    with pytest.raises(UserError, match=r"shard 2: \w+: missing object: .*`pipeline verify "):
        dataset[2 * 16]
    with pytest.raises(UserError, match=r"shard 2: \w+: missing object"):
        list(stream)


def test_verify_covers_the_bookkeeping_and_repair_rewrites_what_can_be_recomputed(cache_copy):
    """An edited row digest (a valid chunk of another value), an unreadable provenance group and an
    unreadable shard record: verify names each; --repair recomputes the digest from the shard's rows and
    resets the provenance, exit 0, and the cache verifies intact."""
    group = zarr.open_group(cache_copy, mode="r+")
    digests = group[ROW_DIGESTS][:]
    group[ROW_DIGESTS][1] = digests[1] ^ np.uint64(1)
    (cache_copy / "provenance" / "zarr.json").write_text("{")
    (cache_copy / "provenance" / "shards" / "0000003.json").write_text("{not json")
    result = run_cli("verify", cache_copy, "--no-progress", expect=1)
    assert "shard 1: shard_row_digests: differs from the digest of the shard's rows" in result.output
    assert "provenance: zarr.json unreadable" in result.output
    assert "shard 3: provenance: unreadable shard record" in result.output
    assert_clean_error(result, "3 bookkeeping entries are damaged", "--repair` rewrites the damaged entries")
    result = run_cli("verify", cache_copy, "--repair", "--no-progress")
    assert "3 bookkeeping entries rewritten from the intact data" in result.output
    np.testing.assert_array_equal(zarr.open_group(cache_copy, mode="r")[ROW_DIGESTS][:], digests)
    assert "intact" in run_cli("verify", cache_copy, "--no-progress").output
    run_cli("inspect", cache_copy)  # the provenance reads again


@pytest.mark.parametrize("how", ["flipped", "another tokenizer"])
def test_a_damaged_stored_tokenizer_is_named_by_verify_and_rewritten_by_the_capture(cache_copy, cache_path,
                                                                                 llama_teacher, corpus_dir, how):
    import json

    from pipeline.cache.store import write_tokenizer

    if how == "flipped":
        chunk = next(p for p in (cache_copy / "tokenizer_json" / "c").rglob("*") if p.is_file())
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    else:  # a valid tokenizer, two of its tokens swapped: another one
        group = zarr.open_group(cache_copy, mode="r+")
        spec = json.loads(group["tokenizer_json"][:].tobytes().decode())
        vocab = spec["model"]["vocab"]
        (a, i), (b, j) = list(vocab.items())[100:102]
        vocab[a], vocab[b] = j, i
        write_tokenizer(group, json.dumps(spec))
    result = run_cli("verify", cache_copy, "--no-progress", expect=1)
    assert "tokenizer_json: " in result.output
    assert_clean_error(result, "the stored tokenizer is damaged",
                       "`pipeline cache-logits` with the same settings rewrites the stored tokenizer")
    cache_logits.main(str(llama_teacher), corpus_dir, cache_copy, FIXTURE_CFG, progress=False)
    assert "intact" in run_cli("verify", cache_copy, "--no-progress").output
    original = zarr.open_group(cache_path, mode="r")["tokenizer_json"][:]
    np.testing.assert_array_equal(zarr.open_group(cache_copy, mode="r")["tokenizer_json"][:], original)


def test_a_damaged_chunk_checksum_row_is_repaired_by_recapture(cache_copy, cache_path, llama_teacher, corpus_dir):
    row = shard_file(cache_copy, CHUNK_CHECKSUMS, 3)
    data = bytearray(row.read_bytes())
    data[0] ^= 0xFF
    row.write_bytes(bytes(data))
    assert "shard 3: chunk_checksums: unreadable checksum row" in run_cli("verify", cache_copy, "--no-progress",
                                                                          expect=1).output
    run_cli("verify", cache_copy, "--repair", "--no-progress", expect=1)
    cache_logits.main(str(llama_teacher), corpus_dir, cache_copy, FIXTURE_CFG, progress=False)
    repaired, original = read_all(cache_copy), read_all(cache_path)
    for name in original:
        np.testing.assert_array_equal(repaired[name], original[name], err_msg=name)


def test_a_capture_resumes_into_a_cache_whose_history_is_unreadable(cache_copy, llama_teacher, corpus_dir, capsys):
    """The provenance group's zarr.json damaged: the capture (which records its run there) starts the history
    anew, saying so, instead of failing; the data is untouched and verifies intact."""
    (cache_copy / "provenance" / "zarr.json").write_text("{")
    before = read_all(cache_copy)
    cache_logits.main(str(llama_teacher), corpus_dir, cache_copy, FIXTURE_CFG, progress=False)
    assert "provenance: zarr.json unreadable (the capture history): starting the history anew" in capsys.readouterr().err
    assert "intact" in run_cli("verify", cache_copy, "--no-progress").output
    after = read_all(cache_copy)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
