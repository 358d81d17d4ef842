"""Who am I: rank, world size and device of this process, under torchrun or alone.

Started by `torchrun --nproc-per-node N ...` (the environment has WORLD_SIZE > 1), `init()` joins
the process group: NCCL with `cuda:LOCAL_RANK` when the device is a GPU, gloo on the CPU. Alone,
everything here is a harmless no-op, so library code reads the same in both cases and asks this
module instead of reading environment variables itself.

Coordination (rank 0's decisions and refusals, shard claims, the end of a job's work) goes through
the c10d key-value store that torchrun's rendezvous already provides, never through NCCL or a
collective: a rank that finished its work waits on the store, with no deadline (a slow shard of a
big teacher can take an hour; if a process dies, torchrun ends the job). Collectives are left to
training (gradients, held-out sums, sharded state), under the process-group timeout.
"""

from __future__ import annotations

import datetime
import itertools
import os
import pickle
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import SaidByAnother, UserError
from pipeline.models.devices import resolve_device

T = TypeVar("T")
# the collectives' timeout (training's all-reduces): LOGIT_CACHE_COLLECTIVE_TIMEOUT_S overrides it
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("LOGIT_CACHE_COLLECTIVE_TIMEOUT_S", 30 * 60)))
STORE_POLL = datetime.timedelta(seconds=30)  # how often a wait on the store wakes up (it has no deadline)


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> Process:
    """This process's place, from torchrun's environment (rank 0 of 1 when started alone)."""
    env = os.environ
    return Process(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                   int(env.get("LOCAL_WORLD_SIZE", 1)))


def init(device_name: str, whole_node: bool = False) -> tuple[Process, torch.device]:
    """Join the process group (when launched by torchrun) and pick this process's device: cuda:LOCAL_RANK,
    or with `whole_node` (one process that spreads its model over every GPU of the node) cuda:0."""
    process = launched()
    device = resolve_device(device_name)
    if device.type == "cuda" and not whole_node:
        device = torch.device("cuda", process.local_rank)
        torch.cuda.set_device(device)
    if process.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    return process, device


def shutdown() -> None:
    """Leave the process group (a no-op when alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def store():
    """The c10d key-value store shared by every process of the job (None when alone)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.distributed_c10d._get_default_store()


_exchanges = itertools.count()  # every process makes the same exchanges in the same order: their keys agree


def _wait(key: str) -> bytes:
    """The value of `key` in the job's store, once some process has set it (waiting as long as it takes)."""
    job = store()
    while True:
        try:
            job.wait([key], STORE_POLL)
            return job.get(key)
        except (dist.DistStoreError, RuntimeError) as error:  # the poll's own timeout: wait on
            if "timeout" not in str(error).lower() and "timed out" not in str(error).lower():
                raise


def run_on_main(process: Process, work: Callable[[], T]) -> T | None:
    """Run `work` on rank 0 only; every rank then gets rank 0's UserError (as its own) or None.

    So a refusal on rank 0 (a bad --out, a lock held by another job) ends every rank with the same
    one-line message, instead of leaving the others waiting.
    """
    result, error = None, None
    if process.is_main:
        try:
            result = work()
        except UserError as raised:
            error = str(raised)
    error = broadcast(process, error)
    if error is not None:
        raise UserError(error) if process.is_main else SaidByAnother(error)
    return result


def on_main(process: Process, work: Callable[[], T]) -> T:
    """Run `work` on rank 0 only and give its result (or its UserError) to every rank: what every rank
    needs but only one should compute or fetch (opening a cache in object storage, hashing weights)."""
    return broadcast(process, run_on_main(process, work))


def broadcast(process: Process, value: T) -> T:
    """Rank 0's `value` (anything picklable), on every rank; through the store."""
    if not process.distributed:
        return value
    key = f"broadcast/{next(_exchanges)}"
    if process.is_main:
        store().set(key, pickle.dumps(value))
        return value
    return pickle.loads(_wait(key))


def gather(process: Process, value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank; through the store: a rank that is done
    waits for the slowest one without a deadline."""
    if not process.distributed:
        return [value]
    key = f"gather/{next(_exchanges)}"
    store().set(f"{key}/{process.rank}", pickle.dumps(value))
    return [pickle.loads(_wait(f"{key}/{rank}")) for rank in range(process.world_size)]


class Claims:
    """Hand out work items 0..n-1, each to exactly one process, first come first served: a fast
    process keeps taking items while a slow one is busy. Alone, a plain counter."""

    def __init__(self, name: str, n: int):
        self.name, self.n, self.store, self.next = f"claims/{name}", n, store(), 0

    def __iter__(self):
        while True:
            if self.store is None:
                item, self.next = self.next, self.next + 1
            else:
                item = self.store.add(self.name, 1) - 1
            if item >= self.n:
                return
            yield item


class Counter:
    """A job-wide running total (tokens written by every process), for one progress bar."""

    def __init__(self, name: str):
        self.name, self.store, self.total = f"counter/{name}", store(), 0

    def add(self, amount: int) -> int:
        """Add `amount`; returns the job-wide total so far."""
        if self.store is None:
            self.total += amount
            return self.total
        return int(self.store.add(self.name, amount))
