"""The global order of training sequences: which sequence fills each slot of each global batch.

A pure function of (seed, number of sequences, chunk size, global batch, shuffle window), never of
how many processes or DataLoader workers read it, so a run resumes exactly on another process count
with the same global batch and `num_workers` is only a performance knob.

    stream    each epoch lists every sequence once: the chunks in a seeded order (a permutation
              per epoch), each chunk's sequences in storage order; epochs follow each other.
    windows   the stream is cut into windows of M global batches (M * S positions, S = the global
              batch in sequences, M = shuffle_window // S, at least 1).
    columns   inside a window, slot j of the global batch owns the M consecutive positions
              [j*M, (j+1)*M) (a column) and hands them to the window's M batches in a seeded
              order: batch i, slot j = column j's (perm_j[i])-th position.

So a global batch holds S sequences from S different places of the shuffled chunk order, and the
slots of one process (a contiguous range of them) cover a contiguous stretch of each window:
a process decodes only its own chunks (plus at most two it shares with a neighbour). Every
sequence fills exactly one slot per epoch. When the stream ends (a finite number of epochs), the
positions left after the last full batch form one short batch in slots 0, 1, ...
"""

from __future__ import annotations

import functools

import numpy as np


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


class GlobalOrder:
    def __init__(self, n_sequences: int, chunk: int, global_batch: int, shuffle_window: int, seed: int,
                 epochs: int | None = None):
        self.n_sequences, self.chunk, self.seed, self.epochs = n_sequences, chunk, seed, epochs
        self.global_batch = global_batch  # S, sequences per optimizer step over every process
        self.batches_per_window = max(1, shuffle_window // global_batch)  # M
        self.window_size = self.batches_per_window * global_batch
        self.n_chunks = -(-n_sequences // chunk)
        self.length = None if epochs is None else epochs * n_sequences  # stream positions (None: endless)

    @property
    def n_windows(self) -> int | None:
        return None if self.length is None else -(-self.length // self.window_size)

    @functools.lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(chunk order, sizes in that order, start position of each in the epoch's stream)."""
        order = _rng(self.seed, epoch).permutation(self.n_chunks)
        sizes = np.minimum(self.chunk, self.n_sequences - order * self.chunk)
        return order, sizes, np.concatenate([[0], np.cumsum(sizes)])

    def sequences(self, lo: int, hi: int) -> np.ndarray:
        """Sequence indices at stream positions [lo, hi) (fewer where the stream ends)."""
        if self.length is not None:
            hi = min(hi, self.length)
        parts, position = [], lo
        while position < hi:
            epoch, offset = divmod(position, self.n_sequences)
            end = min(hi - epoch * self.n_sequences, self.n_sequences)  # within this epoch
            order, sizes, starts = self._epoch(epoch)
            first = int(np.searchsorted(starts, offset, side="right")) - 1
            last = int(np.searchsorted(starts, end, side="left"))  # exclusive
            for i in range(first, last):
                begin = order[i] * self.chunk
                parts.append(np.arange(begin + max(offset - starts[i], 0), begin + min(end - starts[i], sizes[i])))
            position = epoch * self.n_sequences + end
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def window(self, w: int, slots: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Window w's batches, restricted to `slots` of each global batch:

            full  (M_w, n_slots) sequence indices: M_w full global batches (M_w = M but at the end)
            short (n,) sequence indices of the short last batch of the stream in these slots (often empty)
        """
        S, lo = self.global_batch, w * self.window_size
        first, stop, _ = slots.indices(S)
        n_full = self.batches_per_window
        if self.length is not None:
            n_full = min(n_full, (self.length - lo) // S)
        # slot j's column: positions lo + [j*n_full, (j+1)*n_full); only this process's columns are listed
        columns = self.sequences(lo + first * n_full, lo + stop * n_full).reshape(stop - first, n_full)
        perm = _rng(self.seed, 1 << 20, w).permuted(np.tile(np.arange(n_full), (S, 1)), axis=1)[first:stop]
        full = np.take_along_axis(columns, perm, axis=1).T  # (n_full, slots): batch i, slot j
        short = np.zeros(0, dtype=np.int64)
        if self.length is not None and n_full < self.batches_per_window:  # the stream ends in this window
            tail = self.sequences(lo + n_full * S, self.length)  # fewer than S: slots 0.. of one batch
            short = tail[first:stop]
        return full, short
