"""Teacher forward -> top-k log-probs and the exact mass outside the top-k, in bounded memory.

The teacher's final hidden states are taken as the students' are (`hidden_and_head`: the LM head's own
input), and the head is applied to slices of positions, so fp32 logits exist for at most
`max_slice_elements` (positions x vocab, default LOGITS_BUDGET) at a time, whatever the vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from pipeline.cache.logmath import log_mass_outside
from pipeline.models.head import LOGITS_BUDGET, hidden_and_head

@dataclass
class TopK:
    """Sparse teacher targets for N positions (N = B*T flattened, or [B, T] after reshape)."""

    ids: torch.Tensor  # (N, k) int64, in descending log-prob order
    logprobs: torch.Tensor  # (N, k) fp32, log p_i under the full-vocabulary softmax at T=1
    tail_logprob: torch.Tensor  # (N,) fp32, log of the mass outside the top-k (-inf when k = V)
    log_partition: torch.Tensor  # (N, n_temps) fp32, log sum_j p_j^(1/T) for each stored temperature
    tempered_tail_logprob: torch.Tensor  # (N, n_temps - 1) fp32, log-mass outside the top-k at each T != 1
    tail_ids: torch.Tensor | None = None  # (N, s) int64, ids drawn from the distribution outside the top-k


def _signed(constant: int) -> int:
    return constant - (1 << 64) if constant >= 1 << 63 else constant


# splitmix64's constants, as the int64 values of their bits (torch has no uint64 arithmetic)
_GOLDEN, _MIX1, _MIX2 = map(_signed, (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic): a bijection that scatters bits."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 31)) * _MIX2
    return z ^ _shift_right(z, 31)


def position_keys(seed: int, first_sequence: int, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """(batch * seq_len,) int64: one key per position of sequences first_sequence..+batch, a function of
    (seed, sequence, position) only: a position's tail draws never depend on how its shard is cut into
    batches or vocabulary slices, on the device's generator or on the process that computes it."""
    sequence = torch.arange(first_sequence, first_sequence + batch, device=device, dtype=torch.int64)
    position = torch.arange(seq_len, device=device, dtype=torch.int64)
    start = _mix(torch.tensor(seed, dtype=torch.int64, device=device))
    return _mix(_mix(start ^ sequence)[:, None] ^ position[None, :]).reshape(-1)


def uniforms(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(len(keys), n) float64 in [0, 1): the n uniforms of each key (53 bits of a counter-based hash)."""
    draw = torch.arange(n, device=keys.device, dtype=torch.int64)
    return _shift_right(_mix(keys[:, None] ^ _mix(draw)[None, :]), 11).double() * 2.0**-53


def topk_of_logits(logits: torch.Tensor, k: int, temperatures: tuple[float, ...], tail_samples: int = 0,
                   keys: torch.Tensor | None = None) -> TopK:
    """Top-k of (n, V) fp32 logits, with the exact log-mass outside it, and optionally `tail_samples`
    ids per row drawn (with replacement) from the teacher's distribution restricted to outside the
    top-k: by inverse CDF from the uniforms of each row's key (`keys` (n,) int64, see position_keys;
    default: the row's index)."""
    # one id more when drawing: the most likely id outside the top-k (k < V is checked upstream)
    values, ids = logits.topk(k + 1 if tail_samples else k, dim=-1, sorted=True)  # (n, k[+1])
    top = _topk_and_tail(logits, values[:, :k], ids[:, :k], temperatures)
    if tail_samples:
        # the tail distribution, unnormalised: p with the top-k zeroed
        weights = torch.softmax(logits, dim=-1).scatter_(-1, top.ids, 0.0)  # (n, V)
        # A non-finite teacher row (refused by the capture before anything is stored) must not stop the draw.
        weights.nan_to_num_(nan=0.0, posinf=0.0)
        # A row whose whole tail underflows in fp32 (tail mass below ~1e-38) would have nothing to draw
        # from: its most likely tail id keeps a tiny weight. Such draws weigh p_tail / s ~ 0 in the loss.
        next_id = ids[:, k:]  # (n, 1)
        weights.scatter_(-1, next_id, weights.gather(-1, next_id).clamp_(min=1e-30))
        cdf = weights.double().cumsum_(-1)  # (n, V); zero-weight ids (the top-k) are never reached
        keys = torch.arange(logits.shape[0], device=logits.device) if keys is None else keys
        targets = uniforms(keys, tail_samples) * cdf[:, -1:]  # (n, s), in [0, total)
        top.tail_ids = torch.searchsorted(cdf, targets, right=True).clamp_(max=logits.shape[-1] - 1)  # (n, s)
    return top


def _topk_and_tail(logits: torch.Tensor, top_values: torch.Tensor, top_ids: torch.Tensor,
                   temperatures: tuple[float, ...]) -> TopK:
    """Top-k log-probs, the log-mass outside the top-k and the tempered normalisers and tail masses,
    from the (n, V) logits and their top-k (n, k) values and ids."""
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    extra = [t for t in temperatures if t != 1.0]
    lse_at = {t: torch.logsumexp(logits / t, dim=-1) for t in extra}  # (n,) each
    # log sum_j p_j^(1/T) = lse(z / T) - lse(z) / T
    log_partition = torch.stack([lse_at[t] - lse / t if t != 1.0 else torch.zeros_like(lse) for t in temperatures], dim=-1)
    top_logprobs = top_values - lse[:, None]  # (n, k)
    if extra:  # exact tempered tails: log sum_{j not in K} p_j^(1/T), normalised = lse(rest / T) - lse(z / T)
        rest = logits.scatter(-1, top_ids, -math.inf)  # (n, V)
        tempered = torch.stack([torch.logsumexp(rest / t, dim=-1) - lse_at[t] for t in extra], dim=-1)  # (n, n_temps - 1)
        tail_logprob = torch.logsumexp(rest, dim=-1) - lse
    else:
        tempered = lse.new_empty((lse.shape[0], 0))
        tail_logprob = log_mass_outside(logits, top_ids, lse, top_logprobs)  # (n,)
    return TopK(top_ids, top_logprobs, tail_logprob, log_partition, tempered)


@torch.inference_mode()
def teacher_topk(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    k: int,
    temperatures: tuple[float, ...] = (1.0,),
    max_slice_elements: int | None = None,
    tail_samples: int = 0,
    seed: int = 0,
    first_sequence: int = 0,
) -> TopK:
    """Run the teacher on (B, T) ids and return its top-k targets for all B*T positions. The tail draws
    of row b, position t are a function of (seed, first_sequence + b, t) only."""
    hidden, head = hidden_and_head(model, input_ids=input_ids)  # (B, T, d): the LM head's own input
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    vocab = head.weight.shape[0]
    rows = max(1, (max_slice_elements or LOGITS_BUDGET) // vocab)
    keys = position_keys(seed, first_sequence, *input_ids.shape, hidden.device) if tail_samples else None
    parts = [topk_of_logits(head.logits(hidden[i : i + rows]), k, temperatures, tail_samples,
                            None if keys is None else keys[i : i + rows])
             for i in range(0, hidden.shape[0], rows)]
    fields = ("ids", "logprobs", "tail_logprob", "log_partition", "tempered_tail_logprob") + (("tail_ids",) if tail_samples else ())
    return TopK(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))
