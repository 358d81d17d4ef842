"""The loss of a batch read from the cache: which positions each term counts, and the step mean.

One rule for `train-student`, its held-out check, `DistillationTrainer` and the public
`distillation_loss`:

- KD counts the real positions (attention_mask), CE those whose next token is real too; with a chat
  corpus's loss_mask, both count the positions that predict an assistant token (`loss_positions`).
- A step's loss is the mean over all the positions it counts, whatever the micro-batches and
  processes it is split into: each part divides its sums by the step's totals / the number of parts
  whose losses (or gradients) are averaged (`step_counts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.corpus.loss_mask import learned_positions
from pipeline.distill.linear import kd_ce_from_hidden
from pipeline.distill.losses import SparseTargets, kd_ce_from_logits, label_positions
from pipeline.errors import require
from pipeline.models.head import LogitHead
from pipeline.settings.student import LOSS_KINDS

# batch keys that are targets, not model inputs (pop them before calling the model)
TARGET_KEYS = ("topk_ids", "topk_logprobs", "tail_logprob", "tail_ids", "log_partition", "tempered_tail_logprob",
               "temperature", "loss_mask")


@dataclass(frozen=True)
class DistillationLoss:
    loss: torch.Tensor  # 0-d, differentiable: kd_weight * KD + (1 - kd_weight) * CE
    kd: torch.Tensor  # 0-d, detached (for logging): the KD term, T^2-scaled
    ce: torch.Tensor  # 0-d, detached (for logging): the hard-label cross-entropy


def distillation_loss(student_logits: torch.Tensor, batch: dict[str, torch.Tensor], kd_weight: float = 0.8,
                      temperature: float = 1.0, loss: str = "forward_kl",
                      counts: torch.Tensor | tuple[float, float] | None = None) -> DistillationLoss:
    """The loss `train-student` uses, for student logits (B, T, V) and a batch from the cache
    (`linear_distillation_loss` is the same loss from the hidden states, without the logits).

    Positions with attention_mask 0 count in neither term; with a `loss_mask` (chat data) only the
    positions that predict an assistant token count (pipeline.corpus.loss_mask). `loss`: forward_kl
    (fused, the default), reverse_kl or jsd. Only `.loss` carries a gradient; `.kd` and `.ce` are
    detached copies for logging. Each term is a mean over its positions; `counts` (KD positions, CE
    positions) divides the sums by other numbers instead: what makes the loss of a step split over
    processes and micro-batches the mean over the whole step (see `step_counts`).
    """
    input_ids, targets, kd_mask, ce_mask = _loss_inputs(batch, kd_weight, temperature, loss)
    parts = kd_ce_from_logits(student_logits, input_ids, targets, kd_mask, kd_weight, temperature, loss, ce_mask=ce_mask,
                        counts=counts)
    return DistillationLoss(parts["loss"], parts["kd"].detach(), parts["ce"].detach())


def linear_distillation_loss(hidden: torch.Tensor, head: LogitHead, batch: dict[str, torch.Tensor],
                             kd_weight: float = 0.8, temperature: float = 1.0, loss: str = "forward_kl",
                             counts: torch.Tensor | tuple[float, float] | None = None) -> DistillationLoss:
    """`distillation_loss` from the student's final hidden states (B, T, d) and its LM head
    (`pipeline.models.hidden_and_head` gives both from the model's own forward), computed a chunk of
    positions at a time (pipeline.distill.linear): the (B, T, V) logits never exist, in forward or
    backward. The same value, and the same gradients (w.r.t. the hidden states and the head's weight
    and bias) up to float rounding; what `train-student` uses."""
    input_ids, targets, kd_mask, ce_mask = _loss_inputs(batch, kd_weight, temperature, loss)
    parts = kd_ce_from_hidden(hidden, head, input_ids, targets, kd_mask, kd_weight, temperature, loss,
                               ce_mask=ce_mask, counts=counts)
    return DistillationLoss(parts["loss"], parts["kd"].detach(), parts["ce"].detach())


def _loss_inputs(batch: dict[str, torch.Tensor], kd_weight: float, temperature: float, loss: str):
    """(input_ids, targets, kd_mask, ce_mask) of a batch, the settings checked."""
    require(loss in LOSS_KINDS, f"loss must be one of {', '.join(LOSS_KINDS)}, got {loss!r}")
    require(0.0 <= kd_weight <= 1.0, f"kd_weight must be in [0, 1], got {kd_weight}")
    require_temperature(batch, temperature)
    kd_mask, ce_mask = loss_positions(batch)
    return batch["input_ids"].long(), SparseTargets.from_batch(batch), kd_mask, ce_mask


def require_temperature(batch: dict[str, torch.Tensor], temperature: float) -> None:
    """A batch's tempered columns (log_partition, tempered_tail_logprob) belong to one temperature, which
    it carries (`temperature`): the loss must be at that one, or one temperature's normaliser would
    be combined with another's scaling."""
    if "log_partition" not in batch:
        return  # no tempered columns: at T != 1 the tempered tail is approximated
    carried = batch.get("temperature")
    require(carried is not None, "the batch has tempered targets (log_partition) but not the temperature they belong "
                                 "to (a `temperature` entry): read it with LogitCache.dataset(temperature=...)")
    values = torch.unique(torch.as_tensor(carried, dtype=torch.float32))
    require(values.numel() == 1 and abs(float(values[0]) - temperature) <= 1e-6 * max(1.0, temperature),
            f"the batch's tempered targets are for temperature {values.tolist()}, the loss's is {temperature}: read "
            f"the cache at the loss's temperature (LogitCache.dataset(temperature={temperature}))")


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


def step_counts(total: torch.Tensor, parts: int) -> torch.Tensor:
    """(2,) the `counts` that make a step the mean over all its positions: `total` (2,) is the step's
    KD and CE positions (over every micro-batch and process), `parts` the number of losses whose
    gradients are then averaged (processes x micro-batches under DDP with accumulation; 1 where they
    are summed). Each part divides its sums by total / parts."""
    return total / parts
