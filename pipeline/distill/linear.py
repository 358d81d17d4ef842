"""The distillation loss from the student's final hidden states and its LM head: no (B, T, V) logits.

At a real vocabulary (128k-262k tokens) a student's training memory is its logits, not its weights:
(B, T, V) fp32 logits, their gradient and the loss's temporaries. Here the positions are taken a chunk
at a time: the chunk's logits (c, V) are computed from its hidden states, its loss and its gradient
w.r.t. those logits are computed there (`forward_kl_ce_chunk`'s closed form for forward KL, autograd
on the chunk alone for the other divergences), and that gradient is turned at once into the chunk's
share of the gradients w.r.t. the hidden states (c, d) and the head's weight (V, d) and bias. Nothing
of size positions x vocabulary outlives a chunk, in forward or in backward: backward only scales the
three stored gradients.

The values are those of `pipeline.distill.losses.distillation_loss` on the logits the model's own
forward makes (`LogitHead.logits`: scale and soft-cap included), the gradients the same up to float
rounding (tests/test_linear_loss.py: every loss kind, masks, draws, temperatures, V up to 151,936).
"""

from __future__ import annotations

import torch

from pipeline.cache.format import tail_draws_apply
from pipeline.distill.fused import forward_kl_ce_chunk, scaled_once, step_divisors
from pipeline.distill.losses import SparseTargets, label_positions, next_token_labels, sparse_kd_loss, teacher_coarse
from pipeline.models import LogitHead

# positions x vocabulary per chunk: two (c, V) fp32 buffers, allocated once (the chunk's logits and
# their gradient), and the loss's small temporaries. Rows never fall below MIN_CHUNK_ROWS: the head's
# weight gradient is accumulated once per chunk (a read and write of (V, d)), which must stay small
# against the chunk's matmuls (at V = 151,936, 2^23 elements made a CPU step 1.2x slower than 2^24).
CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 per buffer: 110 positions at V = 151,936
MIN_CHUNK_ROWS = 64


def chunk_rows(positions: int, vocab: int) -> int:
    return min(positions, max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)) if positions else 1


def _label_ce_part(z: torch.Tensor, label: torch.Tensor, n_ce: torch.Tensor) -> torch.Tensor:
    """Sum over the chunk of -log softmax(z)[label] where label >= 0, divided by n_ce."""
    has_label = label >= 0
    nll = torch.logsumexp(z, dim=-1) - z.gather(-1, label.clamp(min=0)[:, None]).squeeze(-1)
    return (nll * has_label).sum() / n_ce


def _autograd_chunk(z, targets: SparseTargets, label, kd_mask, kd_weight, temperature, kind, n_kd, n_ce, grad):
    """Any divergence: the reference loss on this chunk's logits, its gradient by autograd on the chunk."""
    leaf = z.detach().requires_grad_(grad is not None)
    with torch.enable_grad():
        kd = sparse_kd_loss(leaf[None], targets, kd_mask[None], temperature, kind, n_kd)
        ce = _label_ce_part(leaf, label, n_ce)
        if grad is not None:
            (leaf_grad,) = torch.autograd.grad(kd_weight * kd + (1 - kd_weight) * ce, leaf)
            grad.copy_(leaf_grad)
    return kd.detach(), ce.detach()


def _target_rows(targets: SparseTargets, lo: int, hi: int) -> SparseTargets:
    """Rows lo..hi of flattened (N, ...) targets, as a batch of one sequence (1, c, ...)."""
    return SparseTargets(**{name: None if value is None else value[lo:hi][None] for name, value in vars(targets).items()})


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, head: LogitHead, targets: SparseTargets, labels, kd_mask, kd_weight,
                temperature, kind, counts):
        """hidden (N, d); weight (V, d); bias (V,) or None; targets flattened to N positions; labels (N,)
        with -1 = none; kd_mask (N,) bool. Returns (loss, kd, ce) as 0-d tensors."""
        n, vocab = hidden.shape[0], weight.shape[0]
        want = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        n_kd, n_ce = step_divisors(kd_mask, labels, counts)
        draws = targets.tail_ids if kind == "forward_kl" and tail_draws_apply(kind, temperature) else None
        teacher_logp = teacher_coarse(targets, temperature) if kind == "forward_kl" else None  # (N, k+1)
        # the matmuls in the autocast dtype where autocast is on (bf16 on a GPU), the loss in fp32
        device_type = hidden.device.type
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        w = weight.detach().to(compute)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if want[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want[1] else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if want[2] else None
        kd_total = hidden.new_zeros((), dtype=torch.float32)
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        rows = chunk_rows(n, vocab)
        # two (c, V) fp32 buffers for every chunk: its logits and their gradient (reused: no allocation per chunk)
        logits = torch.empty((rows, vocab), dtype=torch.float32, device=hidden.device)
        buffer = torch.empty((rows, vocab), dtype=torch.float32, device=hidden.device) if any(want) else None
        with torch.autocast(device_type, enabled=False):
            for lo in range(0, n, rows):
                hi = min(n, lo + rows)
                h = hidden[lo:hi].detach().to(compute)  # (c, d)
                z, capped = _logits_into(logits[: hi - lo], h, w, bias, head)  # (c, V); tanh of the soft-cap, or None
                g = None if buffer is None else buffer[: hi - lo]
                if kind == "forward_kl":
                    kd, ce = forward_kl_ce_chunk(z, targets.topk_ids[lo:hi], teacher_logp[lo:hi], labels[lo:hi],
                                                 kd_mask[lo:hi], kd_weight, temperature,
                                                 None if draws is None else draws[lo:hi], n_kd, n_ce, g)
                else:
                    kd, ce = _autograd_chunk(z, _target_rows(targets, lo, hi), labels[lo:hi], kd_mask[lo:hi],
                                             kd_weight, temperature, kind, n_kd, n_ce, g)
                kd_total, ce_total = kd_total + kd, ce_total + ce
                if g is None:
                    continue
                _untransform_(g, capped, head)  # d loss / d (h @ W.T + b)
                if compute != torch.float32:
                    g = g.to(compute)
                if want[0]:
                    grad_hidden[lo:hi] = g @ w  # (c, d)
                if want[1]:  # (V, d), accumulated in fp32
                    if compute == torch.float32:
                        grad_weight.addmm_(g.t(), h)
                    else:
                        grad_weight += (g.t() @ h).float()
                if want[2]:
                    grad_bias += g.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = kd_weight * kd_total + (1 - kd_weight) * ce_total
        ctx.mark_non_differentiable(kd_total, ce_total)
        return loss, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            grads.append(None if grad is None else scaled_once(grad, grad_loss).to(dtype))
        return (*grads, None, None, None, None, None, None, None, None)


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                 head: LogitHead) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's logits of hidden states h (c, d), written into out (c, V) fp32; and tanh(...) of the
    soft-cap (for backward), or None."""
    if h.dtype == torch.float32:
        torch.mm(h, w.t(), out=out)
    else:  # the autocast dtype: its matmul, then fp32
        out.copy_(h @ w.t())
    if bias is not None:
        out.add_(bias.detach().float())
    if head.scale != 1.0:
        out.mul_(head.scale)
    if head.softcap is None:
        return out, None
    capped = torch.tanh(out / head.softcap)
    return torch.mul(capped, head.softcap, out=out), capped


def _untransform_(g: torch.Tensor, capped: torch.Tensor | None, head: LogitHead) -> None:
    """d/dz -> d/d(head output), in place: the soft-cap's derivative 1 - tanh^2, then the scale."""
    if capped is not None:
        g.mul_(1 - capped.square())
    if head.scale != 1.0:
        g.mul_(head.scale)


def linear_distillation_loss(hidden: torch.Tensor, head: LogitHead, input_ids: torch.Tensor, targets: SparseTargets,
                             mask: torch.Tensor, kd_weight: float, temperature: float, kind: str = "forward_kl",
                             ce_mask: torch.Tensor | None = None, counts=None) -> dict[str, torch.Tensor]:
    """`pipeline.distill.losses.distillation_loss` from hidden states (B, T, d) and the head that makes
    the logits, chunked over positions: the same masks, counts, divergences, temperatures and tail
    draws (forward KL at T = 1), without the (B, T, V) logits."""
    ce_mask = label_positions(mask) if ce_mask is None else ce_mask
    B, T, d = hidden.shape
    flat = SparseTargets(**{name: None if value is None else value.reshape(B * T, *value.shape[2:])
                            for name, value in vars(targets).items()})
    labels = next_token_labels(input_ids, mask, ce_mask).reshape(B * T)
    loss, kd, ce = _FusedLinearLoss.apply(hidden.reshape(B * T, d), head.weight, head.bias, head, flat, labels,
                                          mask.reshape(B * T), kd_weight, temperature, kind, counts)
    return {"loss": loss, "kd": kd, "ce": ce}
