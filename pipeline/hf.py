"""Distil from the cache inside Hugging Face `transformers.Trainer` (docs/api.md).

    trainer = DistillationTrainer(model=student, args=TrainingArguments(...),
                                  train_dataset=LogitCache.open(path).dataset(), kd_weight=0.8)
    trainer.train()

The dataset is map-style, so the Trainer's own sampler shards it over processes (torchrun /
`accelerate launch`) and resumes it; `collate` is the data collator. `compute_loss` takes the
cached targets out of the batch, runs the student on the rest and returns the same loss as
`train-student`, from the student's hidden states and LM head (found as transformers finds it,
`get_output_embeddings`) a chunk of positions at a time: the (B, T, V) logits are never made, except
when the Trainer asks for the outputs (evaluation with predictions).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from pipeline.distill.batch import TARGET_KEYS, distillation_loss, linear_distillation_loss, loss_counts, step_counts
from pipeline.errors import say_to_stderr
from pipeline.models.head import HEAD_CHECK_POSITIONS, check_head, hidden_and_head
from pipeline.train.data import CacheDataset
from pipeline.train.loader import collate


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
        dataset = self.train_dataset
        if isinstance(dataset, CacheDataset) and temperature != 1.0 and dataset.column is None:
            say_to_stderr(f"note: temperature {temperature} is not among the cache's stored temperatures "
                          f"{list(dataset.cache.spec.temperatures)}; the tempered teacher tail is approximated")

    def compute_loss(self, model, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        # the targets and labels stay out of the model call: the loss is ours, not the model's CE
        model_inputs = {k: v for k, v in inputs.items() if k not in (*TARGET_KEYS, "labels")}
        counts = None
        if num_items_in_batch is not None:
            # The Trainer counts the step's label positions (labels[..., 1:] != -100: the CE positions) over
            # its accumulated micro-batches (and processes, with average_tokens_across_devices), sums the
            # micro-batches' losses undivided, and DDP averages the processes' gradients: the step's mean
            # over all its positions, as in train-student. The KD count follows the CE count's ratio (the
            # same for every batch of a cache: T / (T - 1), or 1 with a loss mask).
            local = loss_counts([inputs])  # (2,): KD and CE positions of this micro-batch
            total = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=local.device).reshape(())
            processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            counts = step_counts(torch.stack([total * local[0] / local[1].clamp(min=1), total]), processes)
        if return_outputs:  # the caller wants the logits (evaluation with predictions): the loss from them
            outputs = model(**model_inputs)
            parts = distillation_loss(outputs.logits, inputs, self.kd_weight, self.temperature, self.loss_kind, counts)
        else:  # the model's forward without its head, the loss from the hidden states: no (B, T, V) logits
            if not getattr(self, "_head_checked", False):  # once, on the first batch: the head is the model's own
                check_head(model, model_inputs["input_ids"][:1, :HEAD_CHECK_POSITIONS], "the student",
                           "DistillationTrainer's loss")
                self._head_checked = True
            hidden, head = hidden_and_head(model, **model_inputs)
            parts = linear_distillation_loss(hidden, head, inputs, self.kd_weight, self.temperature, self.loss_kind,
                                             counts)
        loss = parts.loss
        if model.training:  # detached 0-d tensors: read (one device sync) only when a log is written
            # logged as this micro-batch's own means
            scale = (1.0, 1.0) if counts is None else (counts[0] / local[0].clamp(min=1), counts[1] / local[1].clamp(min=1))
            self._distillation_parts = {"kd": parts.kd * scale[0], "ce": parts.ce * scale[1]}
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training-step log: add the KD and CE parts of the last step
            logs = {**logs, **{k: round(float(v), 4) for k, v in getattr(self, "_distillation_parts", {}).items()}}
        super().log(logs, *args, **kwargs)
