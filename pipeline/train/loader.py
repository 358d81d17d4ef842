"""Stream cached soft targets to one training process: its slots of every global batch, in order.

The order is `pipeline.train.order.GlobalOrder`'s: a pure function of the seed and the global batch
(processes x batch_size x grad_accum), so the same optimizer step sees the same sequences whatever
the number of processes or DataLoader workers, and a resumed run (on any process count with the same
global batch) continues at exactly the sequence where it stopped.

Each DataLoader worker decodes whole windows (window w goes to worker w mod num_workers, so the
DataLoader's round-robin keeps their order) and only this process's chunks of them; the main process
cuts each window into micro-batches. Inside a worker, a window's chunk reads run READ_THREADS at a
time and its next window loads while the current one is consumed (read-ahead for object stores).
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

from pipeline.errors import UserError
from pipeline.cache.format import CacheSpec, arrays_to_read
from pipeline.cache.integrity import open_checked, read_rows
from pipeline.train.order import GlobalOrder
from pipeline.io.storage import display, is_url, open_group

# chunk reads in flight per worker: an object store's latency is hidden behind the others (and behind
# the consumption of the previous window, which is read ahead); decoded windows in memory: 2 per worker
READ_THREADS = 8


@dataclass(frozen=True)
class StreamSpec:
    path: str
    batch_size: int  # sequences per micro-batch of one process
    seed: int
    shuffle_window: int  # sequences shuffled together (rounded to whole global batches)
    temperature: float = 1.0  # the loss temperature: a stored one brings its normaliser and tempered tail
    tail_ids: bool = False  # also read the sampled tail ids, where the cache has them and they apply
    loss: str = "forward_kl"  # the loss kind (the tail draws serve forward KL at T = 1 only)
    epochs: int | None = None  # None: cycle forever (training); 1: one pass (tests, evaluation)
    grad_accum: int = 1  # micro-batches per optimizer step: global batch = processes x batch_size x grad_accum


def data_parallel_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class CacheStream(IterableDataset):
    """Yields one item per window: this process's micro-batches of it, stacked (n, batch_size, ...).

    `skip_batches` is how many global batches (optimizer steps) were already consumed, by any number
    of processes: the stream starts at the next one.
    """

    def __init__(self, spec: StreamSpec, rank: int | None = None, world_size: int | None = None, skip_batches: int = 0):
        super().__init__()
        self.spec = spec
        default_rank, default_world = data_parallel_rank()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        cache = CacheSpec.from_attrs(dict(open_group(spec.path, mode="r").attrs))
        self.cache = cache
        self.arrays = arrays_to_read(cache, spec.temperature, spec.loss, spec.tail_ids)
        self.temperature_column = cache.temperature_column(spec.temperature)
        self.n_sequences = cache.n_sequences
        self.chunk = cache.sequences_per_chunk
        self.slots_per_process = spec.batch_size * spec.grad_accum
        self.order = GlobalOrder(self.n_sequences, self.chunk, self.world_size * self.slots_per_process,
                                 spec.shuffle_window, spec.seed, spec.epochs)
        self.slots = slice(self.rank * self.slots_per_process, (self.rank + 1) * self.slots_per_process)
        self.first_window, self.skip_in_first = divmod(skip_batches, self.order.batches_per_window)

    def _windows(self, worker: int, n_workers: int) -> Iterator[int]:
        """The windows this worker decodes: every n_workers-th from the resume point."""
        last = self.order.n_windows
        windows = itertools.count(self.first_window + worker, n_workers)
        return itertools.takewhile(lambda w: last is None or w < last, windows)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # opened in the worker (store clients do not survive a fork), through a store that checks each shard
        # object read is the one written there: another shard's, a rewritten or a removed one stops the stream
        group = open_checked(self.spec.path, self.cache)
        arrays = {name: group[name] for name in self.arrays}
        # Read-ahead threads only inside DataLoader workers: in the main process they could be alive
        # at a later fork (the workers of another loader) and leave it a lock it can never take.
        with ThreadPoolExecutor(max_workers=READ_THREADS) if info else _Inline() as pool:

            def fetch(w: int) -> tuple[int, np.ndarray, np.ndarray, dict[str, dict[int, Future]]]:
                full, short = self.order.window(w, self.slots)
                if w == self.first_window:
                    full = full[self.skip_in_first :]
                chunks = np.unique(np.concatenate([full.ravel(), short]) // self.chunk)
                reads = {name: {int(c): pool.submit(self._read, array, name, int(c)) for c in chunks}
                         for name, array in arrays.items()}
                return w, full, short, reads

            todo = self._windows(worker, n_workers)
            current = next(todo, None)
            in_flight = fetch(current) if current is not None else None
            while in_flight is not None:
                w, full, short, reads = in_flight
                current = next(todo, None)
                in_flight = fetch(current) if current is not None else None  # read-ahead: the next window loads meanwhile
                decoded = {name: {c: f.result() for c, f in parts.items()} for name, parts in reads.items()}
                if full.size:
                    yield self._stacked(full.reshape(-1, self.spec.batch_size), decoded)
                for part in _split(short, self.spec.batch_size):  # the stream's last, short batch (its end only)
                    yield self._stacked(part[None], decoded)

    def _stacked(self, rows: np.ndarray, decoded: dict[str, dict[int, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Micro-batches of the sequences in `rows` (n, b), stacked: each value (n, b, ...)."""
        batch = collate([{name: parts[s // self.chunk][s % self.chunk] for name, parts in decoded.items()}
                         for s in rows.ravel()])
        batch = {name: values.view(*rows.shape, *values.shape[1:]) for name, values in batch.items()}
        if self.temperature_column is not None:  # the temperature the tempered columns belong to
            batch["temperature"] = torch.full(rows.shape, self.spec.temperature)
        return batch

    def _read(self, array: zarr.Array, name: str, chunk: int) -> np.ndarray:
        lo, hi = chunk * self.chunk, min((chunk + 1) * self.chunk, self.n_sequences)
        values = read_rows(array, lo, hi, display(self.spec.path))  # a corrupted chunk fails its crc32c here
        if name in ("log_partition", "tempered_tail_logprob"):
            values = values[..., self.temperature_column]
        return values


def _split(sequences: np.ndarray, size: int) -> list[np.ndarray]:
    return [sequences[i : i + size] for i in range(0, len(sequences), size)]


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


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack items into a batch: every value gains a leading batch axis (B, ...). Items of tensors (the
    dataset's) are stacked as they are; rows of the cache's own arrays (numpy: the stream's) become
    compact tensors to ship between processes: ids int32, top-k log-probs fp16 (multiples of 1/16 in
    [-16, 0]: exact)."""
    batch = {}
    for name in items[0]:
        values = [item[name] for item in items]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
            continue
        stacked = np.stack(values)
        if stacked.dtype in (np.uint16, np.uint32):
            stacked = stacked.astype(np.int32)
        elif name == "topk_logprobs":
            stacked = stacked.astype(np.float16)
        batch[name] = torch.from_numpy(stacked)
    return batch


class CacheLoader:
    """This process's micro-batches, in step order: iterate it (again and again: each pass restarts at
    `skip_batches`). A UserError raised in a worker process (a corrupted chunk, say) comes out as
    itself, one line, not wrapped in the worker's traceback."""

    def __init__(self, stream: CacheStream, num_workers: int):
        n_windows = stream.order.n_windows
        self.num_workers = num_workers if n_windows is None else max(0, min(num_workers, n_windows - stream.first_window))
        # an object store's client (sockets, an event loop thread) is not fork-safe: its workers start fresh
        context = "forkserver" if self.num_workers and is_url(stream.spec.path) else None
        self.stream = stream
        self.loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, multiprocessing_context=context,
                                 pin_memory=torch.cuda.is_available(), persistent_workers=False,
                                 prefetch_factor=2 if self.num_workers else None)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        windows = iter(self.loader)
        while True:
            try:
                window = next(windows)
            except StopIteration:
                return
            except UserError as error:
                last = str(error).strip().splitlines()[-1]
                raise UserError(last.removeprefix("pipeline.errors.UserError: ")) from None
            for i in range(window["input_ids"].shape[0]):
                yield {name: values[i] for name, values in window.items()}


def make_loader(spec: StreamSpec, num_workers: int, skip_batches: int = 0, rank: int | None = None,
                world_size: int | None = None) -> CacheLoader:
    """This process's micro-batches of the cache (`skip_batches`: global batches already consumed).
    Any number of processes and workers works, more than the cache has chunks included."""
    return CacheLoader(CacheStream(spec, rank, world_size, skip_batches), num_workers)


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: values.to(device, non_blocking=True) for name, values in batch.items()}
