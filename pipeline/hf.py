"""Distil from the cache inside Hugging Face `transformers.Trainer` (docs/api.md).

    trainer = DistillationTrainer(model=student, args=TrainingArguments(...),
                                  train_dataset=LogitCache.open(path).dataset(), kd_weight=0.8)
    trainer.train()

The dataset is map-style, so the Trainer's own sampler shards it over processes (torchrun /
`accelerate launch`) and resumes it; `collate` is the data collator. `compute_loss` takes the
cached targets out of the batch, runs the student on the rest and returns the same loss as
`train-student`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from pipeline.api import TARGET_KEYS, collate, distillation_loss


class DistillationTrainer(Trainer):
    def __init__(self, *args: Any, kd_weight: float = 0.8, temperature: float = 1.0, loss: str = "forward_kl",
                 **kwargs: Any):
        kwargs.setdefault("data_collator", collate)
        training_args = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if training_args is not None:
            # the cached targets are not arguments of the model's forward; the Trainer must not drop them
            training_args.remove_unused_columns = False
        super().__init__(*args, **kwargs)
        self.kd_weight, self.temperature, self.loss_kind = kd_weight, temperature, loss

    def compute_loss(self, model, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        # the targets and labels stay out of the model call: the loss is ours, not the model's CE
        model_inputs = {k: v for k, v in inputs.items() if k not in (*TARGET_KEYS, "labels")}
        outputs = model(**model_inputs)
        parts = distillation_loss(outputs.logits, inputs, self.kd_weight, self.temperature, self.loss_kind)
        if model.training:  # detached 0-d tensors: read (one device sync) only when a log is written
            self._distillation_parts = {"kd": parts.kd, "ce": parts.ce}
        return (parts.loss, outputs) if return_outputs else parts.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training-step log: add the KD and CE parts of the last step
            logs = {**logs, **{k: round(float(v), 4) for k, v in getattr(self, "_distillation_parts", {}).items()}}
        super().log(logs, *args, **kwargs)
