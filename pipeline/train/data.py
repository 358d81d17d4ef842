"""A cache opened for training: checked once, read as a map-style dataset or as the training stream.

`LogitCache` is what `train-student`, its held-out check and the public API (`pipeline.LogitCache`)
open; which arrays each reader reads is decided in one place (`pipeline.cache.format.arrays_to_read`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.cache.format import CacheSpec, arrays_to_read
from pipeline.cache.integrity import open_checked, read_rows, require_intact
from pipeline.cache.manifest import check, follow
from pipeline.cache.store import cache_tokenizer, open_cache, require_complete
from pipeline.errors import require
from pipeline.io.storage import Location, display, open_group
from pipeline.train.loader import StreamSpec, make_loader


@dataclass(frozen=True)
class LogitCache:
    """A complete, intact cache, opened from a path, a URL or a manifest (checked once, here)."""

    location: Location
    spec: CacheSpec
    attrs: dict[str, Any]

    @classmethod
    def open(cls, where: Location) -> LogitCache:
        location, manifest = follow(where)
        group = open_cache(location)
        check(group, manifest, where)
        require_complete(group, location)
        attrs = dict(group.attrs)
        spec = CacheSpec.from_attrs(attrs)
        require_intact(group, spec, display(location))
        return cls(location, spec, attrs)

    def __len__(self) -> int:
        return self.spec.n_sequences

    def tokenizer(self):
        """The tokenizer the cache was made with (a `tokenizers.Tokenizer`)."""
        return cache_tokenizer(open_group(self.location, mode="r"))

    def stream_spec(self, batch_size: int, seed: int = 0, shuffle_window: int = 1024, temperature: float = 1.0,
                    tail_ids: bool = True, epochs: int | None = None, grad_accum: int = 1,
                    loss: str = "forward_kl") -> StreamSpec:
        """The settings of `stream` (what `train-student` runs with)."""
        return StreamSpec(str(self.location), batch_size, seed, shuffle_window, temperature=temperature,
                          tail_ids=tail_ids, loss=loss, epochs=epochs, grad_accum=grad_accum)

    def stream(self, batch_size: int, seed: int = 0, shuffle_window: int = 1024, temperature: float = 1.0,
               tail_ids: bool = True, num_workers: int = 1, epochs: int | None = None,
               skip_batches: int = 0, grad_accum: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Batches as `train-student` reads them: the fastest way through the cache for a training loop.

        This process's micro-batches of each global batch (processes x batch_size x grad_accum
        sequences; which ones depends on the seed and the global batch only, pipeline.train.order),
        grad_accum of them per step. Whole chunks are decoded once and sequences shuffled within
        windows of about `shuffle_window`; under torch.distributed each rank reads its own slots, so do
        not wrap it in another distributed sampler (use `dataset()` for that). Batches have the keys of
        `dataset()` items but `labels` and `attention_mask`; `epochs=None` cycles forever;
        `skip_batches` is the number of global batches (steps) already consumed, on any number of
        processes."""
        spec = self.stream_spec(batch_size, seed, shuffle_window, temperature, tail_ids, epochs, grad_accum)
        return iter(make_loader(spec, num_workers, skip_batches=skip_batches))

    def dataset(self, temperature: float = 1.0, tail_ids: bool = True) -> CacheDataset:
        """Sequences with their targets. `temperature`: the loss temperature (a stored one gives the exact
        tempered tail); `tail_ids`: include the sampled tail draws when the cache has them (at T = 1)."""
        return CacheDataset(self, temperature, tail_ids)


class CacheDataset(Dataset):
    """Map-style: item i is sequence i of the cache as a dict of tensors,

        input_ids (T,) int64, labels (T,) int64 (= input_ids; HF models shift them), attention_mask (T,),
        topk_ids (T, k) int64, topk_logprobs (T, k) fp32, tail_logprob (T,) fp32,
        [tail_ids (T, s) int64], [log_partition (T,), tempered_tail_logprob (T,) fp32 and temperature () fp32
        at a stored temperature],
        [loss_mask (T,) int64 for chat data: 1 on the assistant's tokens; labels are then -100 elsewhere].

    Any sampler works (so `DistributedSampler`, accelerate and `Trainer` shard and resume it the
    standard way). Reads decode whole chunks; each DataLoader worker keeps the last few decoded
    (`cached_chunks`), so neighbouring indices are cheap and random ones cost one chunk each.
    """

    def __init__(self, cache: LogitCache, temperature: float = 1.0, tail_ids: bool = True, cached_chunks: int = 8):
        self.cache = cache
        self.arrays = arrays_to_read(cache.spec, temperature, tail_draws=tail_ids)
        self.temperature = temperature
        self.column = cache.spec.temperature_column(temperature)
        self.cached_chunks = cached_chunks
        self._group = None  # opened lazily in each worker process: store clients do not survive a fork
        self._chunks: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return self.cache.spec.n_sequences

    def _chunk(self, chunk: int) -> dict[str, np.ndarray]:
        if chunk not in self._chunks:
            if self._group is None:  # each shard object read is checked to be the one written there
                self._group = open_checked(self.cache.location, self.cache.spec)
            size = self.cache.spec.sequences_per_chunk
            lo, hi = chunk * size, min((chunk + 1) * size, len(self))
            where = display(self.cache.location)
            self._chunks[chunk] = {name: read_rows(self._group[name], lo, hi, where) for name in self.arrays}
            while len(self._chunks) > self.cached_chunks:
                self._chunks.popitem(last=False)
        self._chunks.move_to_end(chunk)
        return self._chunks[chunk]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        require(-len(self) <= index < len(self), f"index {index} out of range for {len(self)} sequences")
        index %= len(self)
        size = self.cache.spec.sequences_per_chunk
        rows = self._chunk(index // size)
        item = {name: values[index % size] for name, values in rows.items()}
        if self.column is not None:
            item["log_partition"] = item["log_partition"][..., self.column]
            item["tempered_tail_logprob"] = item["tempered_tail_logprob"][..., self.column]
            item["temperature"] = np.float32(self.temperature)  # the temperature those columns belong to
        out = {name: torch.from_numpy(np.asarray(value, dtype=np.int64 if value.dtype.kind == "u" else np.float32))
               for name, value in item.items()}
        out["labels"] = out["input_ids"].clone()
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        if "loss_mask" in out:  # chat data: only the assistant's tokens are labels (HF models shift them)
            out["labels"] = out["labels"].masked_fill(out["loss_mask"] == 0, -100)
        # the first token is no one's target after the shift; marked so, the Trainer's count of label positions
        # (num_items_in_batch: all of them in transformers 4.x, those after the first in 5.x) is the same
        out["labels"][0] = -100
        return out

    def __getstate__(self) -> dict[str, Any]:  # for spawn/forkserver workers: no open store, no decoded chunks
        return {**self.__dict__, "_group": None, "_chunks": OrderedDict()}

