"""The streaming loader: every position exactly once per epoch across workers and ranks, seeded order."""

from collections import Counter

import numpy as np
import pytest
import zarr
from torch.utils.data import DataLoader

from pipeline.loader import CacheStream, StreamSpec


def rows_seen(spec: StreamSpec, world_size: int, num_workers: int, skip_batches: int = 0) -> list[list[tuple]]:
    """For each rank, the sequence of rows (as tuples of ids) it yields, in order."""
    per_rank = []
    for rank in range(world_size):
        stream = CacheStream(spec, rank=rank, world_size=world_size, skip_batches=skip_batches)
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
        per_rank.append([tuple(row.tolist()) for batch in loader for row in batch["input_ids"]])
    return per_rank


def test_every_sequence_exactly_once_per_epoch_across_workers_and_ranks(cache_path):
    spec = StreamSpec(str(cache_path), batch_size=3, seed=7, shuffle_window=8, epochs=1)
    seen = rows_seen(spec, world_size=2, num_workers=2)
    all_rows = [tuple(r) for r in zarr.open_group(cache_path, mode="r")["input_ids"][:].tolist()]
    assert Counter(seen[0] + seen[1]) == Counter(all_rows)  # no gap, no overlap
    assert set(seen[0]).isdisjoint(seen[1]) and seen[0] and seen[1]


def test_order_is_reproducible_from_the_seed_and_shuffled(cache_path):
    spec = StreamSpec(str(cache_path), batch_size=4, seed=3, shuffle_window=8, epochs=2)
    first, again = rows_seen(spec, 1, 2), rows_seen(spec, 1, 2)
    assert first == again
    other = rows_seen(StreamSpec(str(cache_path), batch_size=4, seed=4, shuffle_window=8, epochs=2), 1, 2)
    assert other != first
    all_rows = [tuple(r) for r in zarr.open_group(cache_path, mode="r")["input_ids"][:].tolist()]
    half = len(first[0]) // 2
    assert first[0][:half] != all_rows  # not storage order
    assert first[0][:half] != first[0][half:]  # the second epoch is ordered differently


def test_batches_carry_matching_targets(cache_path):
    group = zarr.open_group(cache_path, mode="r")
    ids = group["input_ids"][:]
    spec = StreamSpec(str(cache_path), batch_size=5, seed=0, shuffle_window=8, temperature_column=0, epochs=1)
    batch = next(iter(CacheStream(spec)))
    assert batch["topk_ids"].shape == (5, ids.shape[1], 8) and batch["log_partition"].shape == (5, ids.shape[1])
    for i in range(5):
        row = int(np.flatnonzero((ids == batch["input_ids"][i].numpy()).all(1))[0])
        np.testing.assert_array_equal(batch["topk_ids"][i].numpy(), group["topk_ids"][row])
        np.testing.assert_array_equal(batch["topk_logprobs"][i].numpy(), group["topk_logprobs"][row])
        np.testing.assert_array_equal(batch["log_partition"][i].numpy(), group["log_partition"][row][:, 0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_resumes_at_the_same_position(cache_path, num_workers):
    spec = StreamSpec(str(cache_path), batch_size=3, seed=1, shuffle_window=8, epochs=3)
    full = rows_seen(spec, 1, num_workers)[0]
    resumed = rows_seen(spec, 1, num_workers, skip_batches=5)[0]
    # far from the end of the finite stream (where workers run dry unevenly) the order is identical
    assert len(full) > 30 * 3
    assert resumed[: 20 * 3] == full[5 * 3 : 25 * 3]


def test_more_workers_than_chunks_does_not_hang(llama_teacher, corpus_dir, tmp_path):
    """4 DataLoader workers over a 2-chunk cache, cycling forever: workers without a chunk would wait
    for data for ever (and the DataLoader with them); they are not started."""
    import subprocess
    import sys

    from pipeline.settings.cache import CacheConfig
    from stages import cache_logits

    out = tmp_path / "two-chunks.zarr"
    cache_logits.main(str(llama_teacher), corpus_dir, out, CacheConfig(k=4, tail_samples=0, sequences_per_chunk=256,
                                                                     sequences_per_shard=256), progress=False)
    assert zarr.open_group(out, mode="r").attrs["n_sequences"] <= 512  # 2 chunks
    code = ("import sys\nfrom pipeline.loader import StreamSpec, make_loader\n"
            "loader = make_loader(StreamSpec(sys.argv[1], 8, 0, 256), num_workers=4)\n"
            "batches = iter(loader)\nfor _ in range(100): next(batches)\nprint(loader.num_workers)\n")
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "2"


def test_more_ranks_than_chunks_is_refused(cache_path, monkeypatch):
    from pipeline import loader
    from pipeline.errors import UserError

    monkeypatch.setattr(loader, "data_parallel_rank", lambda: (0, 1000))
    with pytest.raises(UserError, match="fewer than the 1000 data-parallel ranks"):
        loader.make_loader(StreamSpec(str(cache_path), 4, 0, 16), num_workers=0)
