"""The public library API: distil from a logit cache in your own loop or trainer (docs/api.md).

    cache = LogitCache.open("data/logits.zarr")          # or "s3://bucket/logits.zarr"
    dataset = cache.dataset()                              # map-style: any sampler, DataLoader, Trainer
    loader = DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=collate)
    for batch in loader:
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = distillation_loss(logits, batch, kd_weight=0.8)
        out.loss.backward()

Everything here is the code `train-student` runs: the same cache reader, the same targets and the
same loss.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.cache.format import CacheSpec
from pipeline.cache.store import cache_tokenizer, open_cache, require_complete
from pipeline.errors import require
from pipeline.cache.integrity import read_rows, require_intact
from pipeline.train.loader import StreamSpec, make_loader
from pipeline.corpus.loss_mask import learned_positions
from pipeline.distill.losses import SparseTargets, label_positions
from pipeline.distill.losses import distillation_loss as _distillation_loss
from pipeline.cache.manifest import check, follow
from pipeline.settings.student import LOSS_KINDS
from pipeline.io.storage import Location, display, open_group

# batch keys that are targets, not model inputs (pop them before calling the model)
TARGET_KEYS = ("topk_ids", "topk_logprobs", "tail_logprob", "tail_ids", "log_partition", "tempered_tail_logprob",
               "loss_mask")


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
                    tail_ids: bool = True, epochs: int | None = None, grad_accum: int = 1) -> StreamSpec:
        """The settings of `stream` (what `train-student` runs with)."""
        column = self.spec.temperature_column(temperature)
        return StreamSpec(str(self.location), batch_size, seed, shuffle_window, temperature_column=column,
                          tail_ids=tail_ids and self.spec.tail_samples > 0 and temperature == 1.0, epochs=epochs,
                          grad_accum=grad_accum)

    def stream(self, batch_size: int, seed: int = 0, shuffle_window: int = 1024, temperature: float = 1.0,
               tail_ids: bool = True, num_workers: int = 1, epochs: int | None = None,
               skip_batches: int = 0, grad_accum: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """Batches as `train-student` reads them: the fastest way through the cache for a training loop.

        This process's micro-batches of each global batch (processes x batch_size x grad_accum
        sequences; which ones depends on the seed and the global batch only, pipeline.train.order), grad_accum
        of them per step. Whole chunks are decoded once and sequences shuffled within windows of about
        `shuffle_window`; under torch.distributed each rank reads its own slots, so do not wrap it in
        another distributed sampler (use `dataset()` for that). Batches have the keys of `dataset()`
        items but `labels` and `attention_mask`; `epochs=None` cycles forever; `skip_batches` is the
        number of global batches (steps) already consumed, on any number of processes."""
        spec = self.stream_spec(batch_size, seed, shuffle_window, temperature, tail_ids, epochs, grad_accum)
        return iter(make_loader(spec, num_workers, skip_batches=skip_batches))

    def dataset(self, temperature: float = 1.0, tail_ids: bool = True) -> CacheDataset:
        """Sequences with their targets. `temperature`: the loss temperature (a stored one gives the exact
        tempered tail); `tail_ids`: include the sampled tail draws when the cache has them."""
        return CacheDataset(self, temperature, tail_ids)


class CacheDataset(Dataset):
    """Map-style: item i is sequence i of the cache as a dict of tensors,

        input_ids (T,) int64, labels (T,) int64 (= input_ids; HF models shift them), attention_mask (T,),
        topk_ids (T, k) int64, topk_logprobs (T, k) fp32, tail_logprob (T,) fp32,
        [tail_ids (T, s) int64], [log_partition (T,), tempered_tail_logprob (T,) fp32 at a stored temperature],
        [loss_mask (T,) int64 for chat data: 1 on the assistant's tokens; labels are then -100 elsewhere].

    Any sampler works (so `DistributedSampler`, accelerate and `Trainer` shard and resume it the
    standard way). Reads decode whole chunks; each DataLoader worker keeps the last few decoded
    (`cached_chunks`), so neighbouring indices are cheap and random ones cost one chunk each.
    """

    def __init__(self, cache: LogitCache, temperature: float = 1.0, tail_ids: bool = True, cached_chunks: int = 8):
        self.cache = cache
        spec = cache.spec
        self.arrays = ["input_ids", "topk_ids", "topk_logprobs", "tail_logprob"]
        if tail_ids and spec.tail_samples and temperature == 1.0:
            self.arrays.append("tail_ids")
        self.column = spec.temperature_column(temperature)
        if self.column is not None:
            self.arrays += ["log_partition", "tempered_tail_logprob"]
        if spec.loss_mask:
            self.arrays.append("loss_mask")
        self.cached_chunks = cached_chunks
        self._group = None  # opened lazily in each worker process: store clients do not survive a fork
        self._chunks: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return self.cache.spec.n_sequences

    def _chunk(self, chunk: int) -> dict[str, np.ndarray]:
        if chunk not in self._chunks:
            if self._group is None:
                self._group = open_group(self.cache.location, mode="r")
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
        out = {name: torch.from_numpy(np.asarray(value, dtype=np.int64 if value.dtype.kind == "u" else np.float32))
               for name, value in item.items()}
        out["labels"] = out["input_ids"].clone()
        out["attention_mask"] = torch.ones_like(out["input_ids"])
        if "loss_mask" in out:  # chat data: only the assistant's tokens are labels (HF models shift them)
            out["loss_mask"] = out["loss_mask"].long()
            out["labels"] = out["labels"].masked_fill(out["loss_mask"] == 0, -100)
        return out

    def __getstate__(self) -> dict[str, Any]:  # for spawn/forkserver workers: no open store, no decoded chunks
        return {**self.__dict__, "_group": None, "_chunks": OrderedDict()}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into a batch: every tensor gains a leading batch axis (B, ...)."""
    return {name: torch.stack([item[name] for item in items]) for name in items[0]}


@dataclass(frozen=True)
class DistillationLoss:
    loss: torch.Tensor  # 0-d, differentiable: kd_weight * KD + (1 - kd_weight) * CE
    kd: torch.Tensor  # 0-d, detached (for logging): the KD term, T^2-scaled
    ce: torch.Tensor  # 0-d, detached (for logging): the hard-label cross-entropy


def distillation_loss(student_logits: torch.Tensor, batch: dict[str, torch.Tensor], kd_weight: float = 0.8,
                      temperature: float = 1.0, loss: str = "forward_kl",
                      counts: tuple[float, float] | None = None) -> DistillationLoss:
    """The loss `train-student` uses, for student logits (B, T, V) and a batch from the cache.

    Positions with attention_mask 0 count in neither term; with a `loss_mask` (chat data) only the
    positions that predict an assistant token count (pipeline.corpus.loss_mask). `loss`: forward_kl (fused,
    the default), reverse_kl or jsd. Only `.loss` carries a gradient; `.kd` and `.ce` are detached
    copies for logging. Each term is a mean over its positions; `counts` (KD positions, CE positions)
    divides the sums by other numbers instead: what makes the loss of a step split over processes and
    micro-batches the mean over the whole step (see `loss_counts`).
    """
    require(loss in LOSS_KINDS, f"loss must be one of {', '.join(LOSS_KINDS)}, got {loss!r}")
    require(0.0 <= kd_weight <= 1.0, f"kd_weight must be in [0, 1], got {kd_weight}")
    input_ids = batch["input_ids"].long()
    kd_mask, ce_mask = loss_positions(batch)
    parts = _distillation_loss(student_logits, input_ids, SparseTargets.from_batch(batch), kd_mask, kd_weight,
                               temperature, loss, ce_mask=ce_mask, counts=counts)
    return DistillationLoss(parts["loss"], parts["kd"].detach(), parts["ce"].detach())


def loss_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd_mask, ce_mask), each (B, T) bool: the positions each term counts. KD: the real positions
    (attention_mask); CE: those whose next token is real too (the last position has no label). With
    a loss_mask, both: the positions that predict an assistant token."""
    input_ids = batch["input_ids"]
    real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(input_ids, dtype=torch.bool)
    ce = label_positions(real)
    if "loss_mask" not in batch:
        return real, ce
    learned = learned_positions(batch["loss_mask"]) & ce
    return learned, learned


def loss_counts(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(2,) float: how many positions the KD and the CE terms count over these batches."""
    masks = [loss_positions(batch) for batch in batches]
    return torch.stack([sum(kd.sum() for kd, _ in masks), sum(ce.sum() for _, ce in masks)]).float()
