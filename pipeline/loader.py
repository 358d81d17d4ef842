"""Stream cached soft targets: an IterableDataset over the cache's chunks.

Order: each epoch shuffles the chunk list with a seeded permutation, deals chunks round-robin to
every (data-parallel rank, DataLoader worker) pair, and each pair shuffles sequences within
windows of whole chunks (`shuffle_window` sequences). So every sequence is seen exactly once per
epoch, memory is one window per worker whatever the cache size, and the whole order is a pure
function of (seed, epoch): a resumed run skips exactly the batches it already consumed.
"""

from __future__ import annotations

import contextlib
import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import UserError, require
from pipeline.integrity import read_rows
from pipeline.losses import SparseTargets
from pipeline.storage import display, is_url, open_group

ARRAYS = ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob")
# chunk reads in flight per worker: an object store's latency is hidden behind the others (and behind
# the consumption of the previous window, which is read ahead); decoded windows in memory: 2
READ_THREADS = 8


@dataclass(frozen=True)
class StreamSpec:
    path: str
    batch_size: int
    seed: int
    shuffle_window: int  # sequences per shuffle window (rounded to whole chunks)
    temperature_column: int | None = None  # column of log_partition for the loss temperature
    tail_ids: bool = False  # also read the sampled tail ids (caches captured with tail_samples > 0)
    epochs: int | None = None  # None: cycle forever (training); 1: one pass (tests, evaluation)


def data_parallel_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class CacheStream(IterableDataset):
    """Yields collated batches (dicts of tensors) of `batch_size` sequences.

    `skip_batches` is how many batches this rank already consumed (for resuming); with
    `DataLoader(num_workers=n, batch_size=None)` batch j comes from worker j % n.
    """

    def __init__(self, spec: StreamSpec, rank: int | None = None, world_size: int | None = None, skip_batches: int = 0):
        super().__init__()
        self.spec = spec
        default_rank, default_world = data_parallel_rank()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.skip_batches = skip_batches
        attrs = open_group(spec.path, mode="r").attrs
        self.n_sequences = attrs["n_sequences"]
        self.chunk = attrs["sequences_per_chunk"]
        self.n_chunks = -(-self.n_sequences // self.chunk)

    def windows(self, epoch: int, stream: int, n_streams: int) -> list[np.ndarray]:
        """This stream's chunk indices for one epoch, grouped into shuffle windows."""
        order = _rng(self.spec.seed, epoch).permutation(self.n_chunks)
        mine = order[stream::n_streams]
        per_window = max(1, self.spec.shuffle_window // self.chunk)
        return [mine[i : i + per_window] for i in range(0, len(mine), per_window)]

    def _chunk_rows(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk, min((chunk + 1) * self.chunk, self.n_sequences)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # The DataLoader takes batch j from worker j % n_workers; after consuming skip_batches, the
        # next batch must come from the worker that would have made it, so roles rotate.
        role = (worker + self.skip_batches) % n_workers
        stream, n_streams = self.rank * n_workers + role, self.world_size * n_workers
        # batches this role already produced before the resume point
        skip = max(0, -(-(self.skip_batches - role) // n_workers)) * self.spec.batch_size
        group = open_group(self.spec.path, mode="r")  # opened in the worker: store clients do not survive a fork
        arrays = {name: group[name] for name in ARRAYS}
        if self.spec.temperature_column is not None:
            arrays["log_partition"] = group["log_partition"]
            arrays["tempered_tail_logprob"] = group["tempered_tail_logprob"]
        if self.spec.tail_ids:
            arrays["tail_ids"] = group["tail_ids"]
        buffer: list[dict[str, np.ndarray]] = []
        # Read-ahead threads only inside DataLoader workers: in the main process they could be alive
        # at a later fork (the workers of another loader) and leave it a lock it can never take.
        with ThreadPoolExecutor(max_workers=READ_THREADS) if info else _Inline() as pool:

            def fetch(window: np.ndarray) -> dict[str, list[Future]]:  # every (array, chunk) read of a window, in flight
                return {name: [pool.submit(self._read, array, name, c) for c in window] for name, array in arrays.items()}

            todo = self._windows_to_read(stream, n_streams, skip)
            current = next(todo, None)
            in_flight = fetch(current[2]) if current else None
            while current is not None:
                (epoch, w, window, skip_rows), futures = current, in_flight
                current = next(todo, None)
                in_flight = fetch(current[2]) if current else None  # read-ahead: the next window loads meanwhile
                data = {name: np.concatenate([f.result() for f in parts]) for name, parts in futures.items()}
                n_rows = next(iter(data.values())).shape[0]
                for row in _rng(self.spec.seed, epoch, stream, w).permutation(n_rows)[skip_rows:]:
                    buffer.append({name: values[row] for name, values in data.items()})
                    if len(buffer) == self.spec.batch_size:
                        yield collate(buffer)
                        buffer = []
        if buffer:
            yield collate(buffer)

    def _windows_to_read(self, stream: int, n_streams: int, skip: int) -> Iterator[tuple[int, int, np.ndarray, int]]:
        """(epoch, window index, chunks, rows of it to skip) for every window this stream still reads."""
        epochs = range(self.spec.epochs) if self.spec.epochs is not None else itertools.count()
        for epoch in epochs:
            for w, window in enumerate(self.windows(epoch, stream, n_streams)):
                rows = sum(hi - lo for lo, hi in map(self._chunk_rows, window))
                if skip >= rows:
                    skip -= rows
                    continue
                yield epoch, w, window, skip
                skip = 0

    def _read(self, array: zarr.Array, name: str, chunk: int) -> np.ndarray:
        lo, hi = self._chunk_rows(chunk)
        values = read_rows(array, lo, hi, display(self.spec.path))  # a corrupted chunk fails its crc32c here
        if name in ("log_partition", "tempered_tail_logprob"):
            values = values[..., self.spec.temperature_column]
        return values


class _Inline(contextlib.AbstractContextManager):
    """An executor that runs each call at once, in this thread."""

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # re-raised by .result(), as from a thread
            future.set_exception(error)
        return future


def collate(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack rows; ids become int32 and log-probs fp16 here (compact to ship between processes)."""
    batch = {}
    for name in rows[0]:
        stacked = np.stack([r[name] for r in rows])
        if stacked.dtype in (np.uint16, np.uint32):
            stacked = stacked.astype(np.int32)
        elif name == "topk_logprobs":
            stacked = stacked.astype(np.float16)  # multiples of 1/16 in [-16, 0]: exact in fp16, half the IPC
        batch[name] = torch.from_numpy(stacked)
    return batch


def make_loader(spec: StreamSpec, num_workers: int, skip_batches: int = 0) -> DataLoader:
    """A DataLoader over the cache. Every (rank, worker) stream needs at least one chunk per epoch, or
    it would wait forever for data: workers beyond the chunks available to a rank are not started."""
    stream = CacheStream(spec, skip_batches=skip_batches)
    require(stream.n_chunks >= stream.world_size,
            f"{display(spec.path)} has {stream.n_chunks} chunks, fewer than the {stream.world_size} data-parallel ranks")
    num_workers = min(num_workers, stream.n_chunks // stream.world_size)
    # an object store's client (sockets, an event loop thread) is not fork-safe: its workers start fresh
    context = "forkserver" if num_workers and is_url(spec.path) else None
    return DataLoader(stream, batch_size=None, num_workers=num_workers, multiprocessing_context=context,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      prefetch_factor=4 if num_workers else None)


def batches(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate a loader; a UserError raised in a worker process (a corrupted chunk, say) comes out as
    itself, one line, not wrapped in the worker's traceback."""
    iterator = iter(loader)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except UserError as error:
            last = str(error).strip().splitlines()[-1]
            raise UserError(last.removeprefix("pipeline.errors.UserError: ")) from None


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: values.to(device, non_blocking=True) for name, values in batch.items()}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, SparseTargets, torch.Tensor]:
    """(input_ids (B, T) int64, targets, mask (B, T) bool) on the device."""
    batch = move(batch, device)
    input_ids = batch["input_ids"].long()
    targets = SparseTargets.from_batch(batch)
    mask = torch.ones_like(input_ids, dtype=torch.bool)  # packed rows: every position is real text
    return input_ids, targets, mask
