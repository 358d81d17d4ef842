"""The public library API: distil from a logit cache in your own loop or trainer (docs/api.md).

    cache = LogitCache.open("data/logits.zarr")          # or "s3://bucket/logits.zarr"
    dataset = cache.dataset()                              # map-style: any sampler, DataLoader, Trainer
    loader = DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=collate)
    for batch in loader:
        hidden, head = hidden_and_head(student, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out = linear_distillation_loss(hidden, head, batch, kd_weight=0.8)  # no (B, T, V) logits
        out.loss.backward()

`distillation_loss(logits, batch)` is the same loss from logits you already hold.

A facade: every name here is the code `train-student` runs (the same cache reader, targets and
loss), imported from where it lives; nothing in the library imports this module.
"""

from __future__ import annotations

from pipeline.distill.batch import (TARGET_KEYS, DistillationLoss, distillation_loss, linear_distillation_loss,
                                    loss_counts, loss_positions)
from pipeline.models.head import LogitHead, hidden_and_head
from pipeline.train.data import CacheDataset, LogitCache
from pipeline.train.loader import collate

__all__ = ["LogitCache", "CacheDataset", "collate", "distillation_loss", "linear_distillation_loss", "hidden_and_head",
           "LogitHead", "loss_counts", "DistillationLoss", "TARGET_KEYS", "loss_positions"]
