"""The public library API: distil from a logit cache in your own loop or trainer (docs/api.md).

    cache = LogitCache.open("data/logits.zarr")          # or "s3://bucket/logits.zarr"
    dataset = cache.dataset()                              # map-style: any sampler, DataLoader, Trainer
    loader = DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=collate)
    for batch in loader:
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = distillation_loss(logits, batch, kd_weight=0.8)
        out.loss.backward()

A facade: every name here is the code `train-student` runs (the same cache reader, targets and
loss), imported from where it lives; nothing in the library imports this module.
"""

from __future__ import annotations

from pipeline.distill.batch import TARGET_KEYS, DistillationLoss, distillation_loss, loss_counts, loss_positions
from pipeline.train.data import CacheDataset, LogitCache
from pipeline.train.loader import collate

__all__ = ["LogitCache", "CacheDataset", "collate", "distillation_loss", "loss_counts", "DistillationLoss",
           "TARGET_KEYS", "loss_positions"]
