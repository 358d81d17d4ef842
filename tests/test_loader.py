"""The streaming loader: a global order (seed, global batch) that no process or worker count changes,
every position exactly once per epoch, exact resumption, chunk-aligned reads, no hang when small."""

from collections import Counter

import numpy as np
import pytest
import zarr

from pipeline.train.loader import CacheStream, StreamSpec, make_loader
from pipeline.train.order import GlobalOrder


def all_rows(cache_path) -> Counter:
    """Every cached sequence, as a tuple of its ids (a few short rows of the tiny corpus repeat)."""
    return Counter(map(tuple, zarr.open_group(cache_path, mode="r")["input_ids"][:].tolist()))


def global_batches(spec: StreamSpec, world_size: int, num_workers: int, skip_batches: int = 0,
                   steps: int | None = None) -> list[list[tuple]]:
    """The global batches (sequences in slot order) that `world_size` processes read together:
    step t = rank 0's grad_accum micro-batches of step t, then rank 1's, ..."""
    per_rank = []
    for rank in range(world_size):
        micro = [list(map(tuple, batch["input_ids"].tolist()))
                 for batch in make_loader(spec, num_workers, skip_batches, rank=rank, world_size=world_size)]
        per_rank.append([sum(micro[i : i + spec.grad_accum], []) for i in range(0, len(micro), spec.grad_accum)])
    n_steps = len(per_rank[0])
    # every process takes as many steps (at the end of a finite stream, the short batch may leave some out)
    assert all(len(steps_of_rank) in (n_steps, n_steps - 1) for steps_of_rank in per_rank)
    return [sum((rank[t] for rank in per_rank if t < len(rank)), []) for t in range(n_steps)][:steps]


def spec(cache_path, batch_size: int, grad_accum: int = 1, seed: int = 7, epochs: int | None = 1) -> StreamSpec:
    return StreamSpec(str(cache_path), batch_size, seed, shuffle_window=24, epochs=epochs, grad_accum=grad_accum)


def test_the_same_global_batches_whatever_the_processes_and_workers(cache_path):
    """A global batch of 12: 1 process x 12, 2 x 6 (0, 1 or 3 workers), 2 x 3 x grad_accum 2, 3 x 4."""
    reference = global_batches(spec(cache_path, 12), world_size=1, num_workers=0)
    assert len(reference) == -(-506 // 12) and reference[0] != reference[1]
    for world, batch, accum, workers in [(1, 12, 1, 3), (2, 6, 1, 0), (2, 6, 1, 1), (2, 3, 2, 3), (3, 4, 1, 0)]:
        assert global_batches(spec(cache_path, batch, accum), world, workers) == reference, (world, batch, accum, workers)


def test_every_sequence_exactly_once_per_epoch_across_ranks_and_workers(cache_path):
    batches = global_batches(spec(cache_path, 5, epochs=1), world_size=2, num_workers=2)
    seen = Counter(s for batch in batches for s in batch)
    assert seen == all_rows(cache_path)  # no gap, no overlap (the last global batch is short: 506 = 50 x 10 + 6)
    assert [len(b) for b in batches] == [10] * 50 + [6]
    two_epochs = Counter(s for batch in global_batches(spec(cache_path, 5, epochs=2), 2, 0) for s in batch)
    assert two_epochs == all_rows(cache_path) + all_rows(cache_path)


def test_order_is_seeded_shuffled_and_new_each_epoch(cache_path):
    first = global_batches(spec(cache_path, 8, epochs=2), 1, 0)
    assert first == global_batches(spec(cache_path, 8, epochs=2), 1, 0)
    assert first[:5] != global_batches(spec(cache_path, 8, seed=8), 1, 0, steps=5)
    flat = [s for batch in first for s in batch]
    stored = list(map(tuple, zarr.open_group(cache_path, mode="r")["input_ids"][:].tolist()))
    assert flat[:506] != stored and flat[:506] != flat[506:]  # not storage order; each epoch its own order
    # a batch mixes the places of its window: its 8 sequences come from most of the window's ~7 chunks
    order = GlobalOrder(506, 4, global_batch=8, shuffle_window=24, seed=7)
    assert all(len(set((order.window(w)[0][i] // 4).tolist())) >= 4 for w in range(20) for i in range(3))


def test_batches_carry_matching_targets(cache_path):
    group = zarr.open_group(cache_path, mode="r")
    ids = group["input_ids"][:]
    batch = next(iter(make_loader(StreamSpec(str(cache_path), 5, 0, 8, temperature=2.0, epochs=1), 0)))
    assert batch["topk_ids"].shape == (5, ids.shape[1], 8) and batch["log_partition"].shape == (5, ids.shape[1])
    for i in range(5):
        row = int(np.flatnonzero((ids == batch["input_ids"][i].numpy()).all(1))[0])
        np.testing.assert_array_equal(batch["topk_ids"][i].numpy(), group["topk_ids"][row])
        np.testing.assert_array_equal(batch["topk_logprobs"][i].numpy(), group["topk_logprobs"][row])
        np.testing.assert_array_equal(batch["log_partition"][i].numpy(), group["log_partition"][row][:, 0])


def test_resume_continues_at_the_same_global_batch_on_another_process_count(cache_path):
    whole = global_batches(spec(cache_path, 4), world_size=2, num_workers=0)
    for world, batch, workers in [(2, 4, 2), (1, 8, 0), (4, 2, 1)]:  # 11 = mid-window (3 batches per window)
        assert global_batches(spec(cache_path, batch), world, workers, skip_batches=11) == whole[11:], (world, workers)


def test_each_process_decodes_only_its_own_chunks(cache_path):
    """Chunk-aligned reads: over a window, the chunks the 4 processes decode overlap at the edges only."""
    order = GlobalOrder(506, 4, global_batch=16, shuffle_window=64, seed=0)
    chunk_sets = [set((order.window(3, slice(r * 4, (r + 1) * 4))[0].ravel() // 4).tolist()) for r in range(4)]
    total = set().union(*chunk_sets)
    assert sum(map(len, chunk_sets)) <= len(total) + 3  # at most one chunk shared by neighbours
    assert all(len(chunks) <= 64 // 4 // 4 + 1 for chunks in chunk_sets)  # 16 sequences: 4 chunks, +1 at an edge


def test_four_ranks_with_four_workers_on_three_chunks_do_not_hang(llama_teacher, corpus_dir, tmp_path):
    import subprocess
    import sys

    from pipeline.settings.cache import CacheConfig
    from stages import cache_logits

    out = tmp_path / "three-chunks.zarr"
    cache_logits.main(str(llama_teacher), corpus_dir, out, CacheConfig(k=4, tail_samples=0, sequences_per_chunk=170,
                                                                     sequences_per_shard=510), progress=False)
    assert CacheStream(StreamSpec(str(out), 2, 0, 16)).order.n_chunks == 3
    code = ("import sys, itertools\nfrom pipeline.train.loader import StreamSpec, make_loader\n"
            "for rank in range(4):\n"
            "    loader = make_loader(StreamSpec(sys.argv[1], 2, 0, 16), 4, rank=rank, world_size=4)\n"
            "    n = sum(1 for _ in itertools.islice(loader, 300))\n"
            "    print(rank, loader.num_workers, n)\n")
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == [f"{rank} 4 300" for rank in range(4)]


def test_skipping_past_the_end_of_a_finite_stream_yields_nothing(cache_path):
    loader = make_loader(StreamSpec(str(cache_path), 4, 0, 16, epochs=1), num_workers=2, skip_batches=10_000)
    assert loader.num_workers == 0 and list(loader) == []


@pytest.mark.parametrize("n, world_size", [(64, 1), (64, 3), (7, 2), (2, 4)])
def test_the_held_out_check_covers_the_same_sequences_on_any_number_of_processes(n, world_size, cache_path):
    """Every one of the first n sequences is checked exactly once, each process gets the same number of
    slots, and a padding slot counts in no term."""
    from pipeline.api import LogitCache, loss_counts
    from pipeline.train.heldout import padding, share

    shares = [share(n, rank, world_size) for rank in range(world_size)]
    assert len({len(s) for s in shares}) == 1
    assert sorted(s for part in shares for s in part if s is not None) == list(range(n))
    item = LogitCache.open(cache_path).dataset()[0]
    assert loss_counts([{name: value[None] for name, value in padding(item).items()}]).tolist() == [0.0, 0.0]
