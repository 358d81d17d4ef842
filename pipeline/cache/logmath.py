"""Log-space helpers shared by the capture (teacher targets) and the losses (student side).

A leaf module: it imports nothing from this package, so `topk`, `losses` and `fused_loss` can all
use it without importing each other.
"""

from __future__ import annotations

import math

import torch

# Clamp for log-probabilities of (near-)empty outcomes: exp(-100) is 0 in fp32, and the
# clamp keeps 0 * (-inf) out of the sums.
LOG_FLOOR = -100.0
# Below this log-mass, 1 - sum(top-k) loses digits to cancellation: compute the tail exactly.
TAIL_EXACT_BELOW = math.log(0.01)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012); x = 0 gives -inf."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def logsumexp_outside(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log sum_{j not in ids} exp(logits_j) per row: (n, V), (n, k) -> (n,). Exact, no cancellation."""
    return torch.logsumexp(logits.scatter(-1, ids, -math.inf), dim=-1)


def log_mass_outside(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
    """log of softmax(logits)'s mass outside `ids`, (n,), accurate for every row.

    logits (n, V), ids (n, k), lse (n,) = logsumexp(logits), top_logprobs (n, k) = logits at ids - lse.
    On the CPU it is 1 - sum(top) (k values, no second pass over V) where the tail holds >= 1% of
    the mass, and an exact log-sum-exp over the other logits where cancellation would lose digits;
    on a GPU the exact log-sum-exp for every row, since choosing rows would stall on a host sync.
    """
    if logits.is_cuda:
        return logsumexp_outside(logits, ids) - lse
    tail = log1mexp(torch.logsumexp(top_logprobs.double(), dim=-1)).to(logits.dtype)  # (n,)
    exact = torch.nonzero(tail < TAIL_EXACT_BELOW).squeeze(-1)
    if exact.numel():
        tail[exact] = logsumexp_outside(logits.index_select(0, exact), ids.index_select(0, exact)) - lse[exact]
    return tail
