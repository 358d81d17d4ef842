"""Distillation losses on sparse cached targets: top-k plus one "tail" outcome.

The teacher's cached distribution is coarsened to k+1 outcomes: its top-k tokens and "everything
else" (mass 1 - sum_K p). The student's full softmax is coarsened the same way (its mass on the
teacher's top-k ids, and the rest). The KL between the coarsened distributions is exact, a lower
bound on the full KL, and it does not push the student to be overconfident (as renormalising the
teacher over K would). See docs/cache-format.md for the temperature convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.distill.fused import fused_forward_kl_ce
from pipeline.cache.format import tail_draws_apply
from pipeline.cache.logmath import LOG_FLOOR, log1mexp, logsumexp_outside
from pipeline.settings.student import LOSS_KINDS


@dataclass
class SparseTargets:
    """Teacher targets for a batch, as read from the cache (already on the device)."""

    topk_ids: torch.Tensor  # (B, T, k) int64
    topk_logprobs: torch.Tensor  # (B, T, k) fp32, log p_i at T=1
    tail_logprob: torch.Tensor  # (B, T) fp32, log of the mass outside the top-k at T=1 (-inf if k=V)
    log_partition: torch.Tensor | None = None  # (B, T) fp32, log sum_j p_j^(1/T) for the loss temperature
    tail_ids: torch.Tensor | None = None  # (B, T, s) int64, ids drawn from the teacher's tail at T=1
    tempered_tail_logprob: torch.Tensor | None = None  # (B, T) fp32, log-mass outside the top-k at the loss temperature

    def as_batch(self) -> dict[str, torch.Tensor]:
        """The batch entries `from_batch` reads (the fields that are set)."""
        return {name: value for name, value in vars(self).items() if value is not None}

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> SparseTargets:
        """The targets of a batch read from the cache (the training stream's or `pipeline.CacheDataset`'s)."""
        def optional(name: str, as_ids: bool = False) -> torch.Tensor | None:
            if name not in batch:
                return None
            return batch[name].long() if as_ids else batch[name].float()

        return cls(topk_ids=batch["topk_ids"].long(), topk_logprobs=batch["topk_logprobs"].float(),
                   tail_logprob=batch["tail_logprob"].float(), log_partition=optional("log_partition"),
                   tail_ids=optional("tail_ids", as_ids=True), tempered_tail_logprob=optional("tempered_tail_logprob"))


def teacher_coarse(targets: SparseTargets, temperature: float) -> torch.Tensor:
    """Teacher log-probs over the k+1 outcomes at temperature T: (B, T, k+1)."""
    if temperature == 1.0:
        top, tail = targets.topk_logprobs, targets.tail_logprob
    elif targets.log_partition is not None:
        # exact: p_i^(1/T) / sum_j p_j^(1/T) with the normaliser stored at capture time
        top = targets.topk_logprobs / temperature - targets.log_partition[..., None]
        if targets.tempered_tail_logprob is not None:  # stored at capture: no cancellation
            tail = targets.tempered_tail_logprob
        else:
            tail = log1mexp(torch.logsumexp(top, dim=-1))
        tail = torch.where(torch.isneginf(targets.tail_logprob), targets.tail_logprob, tail)  # k = V stays empty
    else:
        # approximate: the tail treated as a single token when tempering (documented)
        raw = torch.cat([targets.topk_logprobs, targets.tail_logprob[..., None]], dim=-1) / temperature
        return torch.log_softmax(raw, dim=-1).clamp(min=LOG_FLOOR)
    # renormalise: a no-op for exact values, removes the drift of the cache's 1/16-nat quantisation
    return torch.log_softmax(torch.cat([top, tail[..., None]], dim=-1), dim=-1).clamp(min=LOG_FLOOR)


def student_coarse(logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Student log-probs over the teacher's k+1 outcomes: (B, T, k+1), from logits (B, T, V)."""
    scaled = logits / temperature if temperature != 1.0 else logits
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (B, T, 1)
    top = scaled.gather(-1, topk_ids) - lse  # (B, T, k)
    tail = logsumexp_outside(scaled, topk_ids) - lse[..., 0]  # (B, T), exact even when the top-k holds ~all mass
    return torch.cat([top, tail[..., None]], dim=-1).clamp(min=LOG_FLOOR)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position over the last axis."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def sparse_kd_loss(logits: torch.Tensor, targets: SparseTargets, mask: torch.Tensor, temperature: float = 1.0,
                   kind: str = "forward_kl", count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean over masked positions of the divergence on k+1 outcomes, scaled by T^2 (Hinton).

    logits (B, T, V); mask (B, T) bool. An all-false mask gives 0. `count`: divide the sum by it
    instead of by the number of masked positions.
    """
    log_p = teacher_coarse(targets, temperature)
    log_q = student_coarse(logits.float(), targets.topk_ids, temperature)
    # k = V: the "rest" outcome is empty for both, not a rounding error of the student's sum
    empty_tail = torch.isneginf(targets.tail_logprob)[..., None]  # (B, T, 1)
    log_q = torch.cat([log_q[..., :-1], log_q[..., -1:].masked_fill(empty_tail, LOG_FLOOR)], dim=-1)
    if kind == "forward_kl":
        per_position = _kl(log_p, log_q)
    elif kind == "reverse_kl":
        per_position = _kl(log_q, log_p)
    elif kind == "jsd":
        log_m = torch.logaddexp(log_p, log_q) - math.log(2)
        per_position = 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)
    else:
        raise ValueError(f"unknown loss kind {kind!r} (expected one of {LOSS_KINDS})")
    return masked_mean(per_position, mask, count) * temperature**2


def tail_draws_objective(logits: torch.Tensor, targets: SparseTargets, mask: torch.Tensor,
                         count: torch.Tensor | float | None = None) -> torch.Tensor:
    """The masked mean of -(sum_K p_j log q_j + p_tail / s * sum_draws log q_d) at T = 1: its gradient
    w.r.t. the logits is q - p~ (p~ = p on the top-k, p_tail / s at each of the s draws), the unbiased
    full-vocabulary forward-KL gradient the fused loss computes in closed form (pipeline.distill.fused)."""
    log_q = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    log_p = teacher_coarse(targets, 1.0)  # (B, T, k+1)
    p = log_p.exp()
    draws = targets.tail_ids
    per_position = -(p[..., :-1] * log_q.gather(-1, targets.topk_ids)).sum(-1)
    per_position = per_position - p[..., -1] / draws.shape[-1] * log_q.gather(-1, draws).sum(-1)
    return masked_mean(per_position, mask, count)


def label_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions t with a label, where t and t + 1 are both real (never the last)."""
    out = torch.zeros_like(mask)
    out[:, :-1] = mask[:, :-1] & mask[:, 1:]
    return out


def hard_label_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                    ce_mask: torch.Tensor | None = None, count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts input_ids[t+1]; the last position has no label.

    logits (B, T, V), input_ids (B, T), mask (B, T) bool; ce_mask (B, T): the positions that count
    (default: label_positions(mask)); `count`: divide the sum by it instead of by their number.
    """
    ce_mask = label_positions(mask) if ce_mask is None else ce_mask
    logits = logits[:, :-1].float()  # (B, T-1, V)
    labels = input_ids[:, 1:]  # (B, T-1)
    nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, labels[..., None]).squeeze(-1)
    return masked_mean(nll, ce_mask[:, :-1], count)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean of values where mask is set (the sum divided by `count` when given); 0 (not NaN) when nothing is."""
    mask = mask.to(values.dtype)
    divisor = mask.sum() if count is None else torch.as_tensor(count, dtype=values.dtype, device=values.device)
    return (values * mask).sum() / divisor.clamp(min=1.0)


def next_token_labels(input_ids: torch.Tensor, mask: torch.Tensor, ce_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) labels: input_ids[t+1] where position t counts (ce_mask, default label_positions(mask)), else -1."""
    ce_mask = label_positions(mask) if ce_mask is None else ce_mask
    labels = torch.full_like(input_ids, -1)
    labels[:, :-1] = input_ids[:, 1:]
    return labels.masked_fill(~ce_mask, -1)


def kd_ce_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, targets: SparseTargets, mask: torch.Tensor,
                      kd_weight: float, temperature: float, kind: str = "forward_kl", fused: bool = True,
                      ce_mask: torch.Tensor | None = None, counts: tuple | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """kd_weight * KD + (1 - kd_weight) * hard-label CE. kd_weight=0 is the hard-label baseline.

    mask (B, T): the positions KD counts; ce_mask: those CE counts (default label_positions(mask));
    counts: (KD, CE) divisors of the two sums instead of the numbers of positions (a step's totals,
    over processes and micro-batches). Both terms are always computed, so the KD divergence is logged
    for baselines too. Forward KL runs fused (pipeline.distill.fused: one chunked pass, gradient computed
    in forward); the other divergences, or fused=False, go through plain autograd. Sampled tail ids
    (targets.tail_ids) are used by forward KL at T = 1, fused or not (`tail_draws_objective`); elsewhere
    the tail is one bucket.
    """
    ce_mask = label_positions(mask) if ce_mask is None else ce_mask
    kd_count, ce_count = (None, None) if counts is None else (counts[0], counts[1])
    if fused and kind == "forward_kl":
        B, T, V = logits.shape
        k = targets.topk_ids.shape[-1]
        tail_ids = targets.tail_ids if tail_draws_apply(kind, temperature) else None
        loss, kd, ce = fused_forward_kl_ce(
            logits.reshape(B * T, V), targets.topk_ids.reshape(B * T, k),
            teacher_coarse(targets, temperature).reshape(B * T, k + 1),
            next_token_labels(input_ids, mask, ce_mask).reshape(B * T), mask.reshape(B * T), kd_weight, temperature,
            tail_ids.reshape(B * T, -1) if tail_ids is not None else None, counts)
        return {"loss": loss, "kd": kd, "ce": ce}
    kd = sparse_kd_loss(logits, targets, mask, temperature, kind, kd_count)
    if kind == "forward_kl" and targets.tail_ids is not None and tail_draws_apply(kind, temperature):
        # the value stays the coarsened KL; the gradient is the tail draws' estimate, as the fused path's
        estimate = tail_draws_objective(logits, targets, mask, kd_count)
        kd = kd.detach() + (estimate - estimate.detach())
    ce = hard_label_loss(logits, input_ids, mask, ce_mask, ce_count)
    return {"loss": kd_weight * kd + (1 - kd_weight) * ce, "kd": kd, "ce": ce}


@torch.inference_mode()
def dense_teacher_targets(model, input_ids: torch.Tensor, temperature: float) -> SparseTargets:
    """Online KD reference: the teacher's *full* distribution as targets with k = V (no tail).

    Same loss code as the cache path; ids (B, T, V) = arange(V).
    """
    logits = model(input_ids=input_ids).logits.float()  # (B, T, V)
    lse = torch.logsumexp(logits, dim=-1)  # (B, T)
    vocab = logits.shape[-1]
    ids = torch.arange(vocab, device=logits.device).expand(*logits.shape[:-1], vocab)
    log_partition = torch.logsumexp(logits / temperature, dim=-1) - lse / temperature if temperature != 1.0 else None
    logprobs = logits.sub_(lse[..., None])
    tail = torch.full_like(lse, -math.inf)
    return SparseTargets(ids, logprobs, tail, log_partition, tempered_tail_logprob=tail if log_partition is not None else None)
