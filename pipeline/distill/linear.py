"""The distillation loss from the student's final hidden states and its LM head: no (B, T, V) logits.

At a real vocabulary (128k-262k tokens) a student's training memory is its logits, not its weights:
(B, T, V) logits, their gradient and the loss's temporaries. Here the positions are taken a chunk at a
time. A chunk's logits (c, V) are made in the matmul dtype (bf16 under autocast) in one buffer; the
loss and its gradient w.r.t. those logits are computed in fp32 a few rows at a time (`forward_kl_ce_chunk`'s
closed form for forward KL, autograd on those rows for the other divergences) and the gradient is
written back over the logits; that buffer then gives the chunk's share of the gradients w.r.t. the
hidden states (c, d) and the head's weight (V, d), accumulated in place in fp32. Backward only scales
the stored gradients.

What it holds at its peak, in bytes, for N positions, a V x d head, b bytes per element of the
matmul dtype (2 in bf16) and c = d / 2 positions per chunk (`chunk_rows`):

    chunked:    b c V (a chunk's logits) + 4 V d (the weight's gradient) + b V d (the weight's copy in
                the matmul dtype, only under autocast)
    one chunk:  b N V + 4 V d (the copy is freed before the gradient is made), chosen where that is
                no more: N <= c, or N <= c + d with a copy

plus the fp32 rows the loss works on (a few times `LOGITS_BUDGET` elements); under fp16 autocast
the gradient has an fp32 buffer of its own (4 c V more: fp16 cannot hold it). The logits' own path
(F.linear, then the loss) holds 2 b N V + b V d in forward and (b + 4) V d in backward. So the fused
loss holds no more than that path (plus those rows) at any N, and at N >> d about 7 d / (4 N) of it
in bf16, 3 d / (4 N) in fp32 (docs/benchmarks.md measures both at d = 256 to 4,096).

The values are those of `pipeline.distill.losses.kd_ce_from_logits` on the logits the model's own
forward makes (`LogitHead.logits`), the gradients the same up to float rounding
(tests/test_linear_loss.py: every loss kind, masks, draws, temperatures, V up to 151,936).
"""

from __future__ import annotations

import torch

from pipeline.cache.format import tail_draws_apply
from pipeline.distill.fused import forward_kl_ce_chunk, scale_stored_gradients_, step_divisors
from pipeline.distill.losses import SparseTargets, label_positions, next_token_labels, sparse_kd_loss, teacher_coarse
from pipeline.models.head import LOGITS_BUDGET, LogitHead

# Positions per chunk: half the hidden size d, at least MIN_CHUNK_ROWS. Why: a chunk's three matmuls
# (its logits, the hidden states' and the weight's gradients) cost 6 c V d flops against a read and a
# write of the fp32 (V, d) weight gradient and, in bf16, its blocks (~12 V d bytes): 0.5 c flops per
# byte, 512 at d = 2,048, above what an H100 needs to be compute-bound (~300) from d ~ 1,200 on (at
# d = 256, 128: traffic then matters, on a head that small); and the chunk's logits (c V: a quarter
# of that gradient's bytes in bf16, half in fp32) never dominate, whatever V.
MIN_CHUNK_ROWS = 256


def chunk_rows(positions: int, hidden_size: int, weight_copied: bool) -> int:
    """Positions per chunk: c = d / 2 (at least MIN_CHUNK_ROWS); or all of them in one chunk where that
    holds no more at its peak: N <= c, or N <= c + d when the weight has a compute copy (autocast), since
    one chunk frees that copy (d V in the same dtype as the logits) before the gradient is made."""
    rows = max(MIN_CHUNK_ROWS, hidden_size // 2)
    return max(1, positions if positions <= rows + (hidden_size if weight_copied else 0) else rows)


def _label_ce_part(z: torch.Tensor, label: torch.Tensor, n_ce: torch.Tensor) -> torch.Tensor:
    """Sum over the rows of -log softmax(z)[label] where label >= 0, divided by n_ce."""
    has_label = label >= 0
    nll = torch.logsumexp(z, dim=-1) - z.gather(-1, label.clamp(min=0)[:, None]).squeeze(-1)
    return (nll * has_label).sum() / n_ce


def _autograd_rows(z, targets: SparseTargets, label, kd_mask, kd_weight, temperature, kind, n_kd, n_ce, grad):
    """Any divergence: the reference loss on these rows' logits, its gradient by autograd on them alone."""
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


def _transform_(z: torch.Tensor, bias: torch.Tensor | None, head: LogitHead) -> torch.Tensor | None:
    """h @ W.T (r, V) fp32 -> the model's logits, in place: bias, scale / divisor, soft-cap (in fp32: the
    model's own forward rounds each to its dtype). Returns tanh(...) of the soft-cap (its derivative
    needs it), or None."""
    if bias is not None:
        z.add_(bias.detach().float())
    if head.factor != 1.0:
        z.mul_(head.factor)
    if head.softcap is None:
        return None
    capped = torch.tanh(z / head.softcap)
    torch.mul(capped, head.softcap, out=z)
    return capped


def _untransform_(g: torch.Tensor, capped: torch.Tensor | None, head: LogitHead) -> None:
    """d/dz -> d/d(h @ W.T + b), in place: the soft-cap's derivative 1 - tanh^2, then the scale."""
    if capped is not None:
        g.mul_(1 - capped.square())
    if head.factor != 1.0:
        g.mul_(head.factor)


def _add_outer_(grad_weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor, block: torch.Tensor | None,
                first: bool) -> None:
    """grad_weight (V, d) fp32 += g.T (V, c) @ h (c, d), in place (`first`: = instead of +=, into an
    uninitialised buffer: no pass to zero it). In fp32 one matmul; in a lower dtype a block of
    vocabulary rows at a time through `block` (rows, d), so no (V, d) temporary exists."""
    if block is None:
        torch.mm(g.t(), h, out=grad_weight) if first else grad_weight.addmm_(g.t(), h)
        return
    rows = block.shape[0]
    for lo in range(0, grad_weight.shape[0], rows):
        hi = min(grad_weight.shape[0], lo + rows)
        part = torch.mm(g[:, lo:hi].t(), h, out=block[: hi - lo])
        grad_weight[lo:hi].copy_(part) if first else grad_weight[lo:hi].add_(part)


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, head: LogitHead, targets: SparseTargets, labels, kd_mask, kd_weight,
                temperature, kind, counts, grad_enabled):
        """hidden (N, d); weight (V, d); bias (V,) or None; targets flattened to N positions; labels (N,)
        with -1 = none; kd_mask (N,) bool; grad_enabled: whether the caller's grad mode is on (inside
        forward it is off; a parameter requires grad under no_grad too). Returns (loss, kd, ce), 0-d."""
        (n, d), vocab, device = hidden.shape, weight.shape[0], hidden.device
        want_hidden, want_weight = grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad
        want_bias = grad_enabled and bias is not None and bias.requires_grad
        with_grad = want_hidden or want_weight or want_bias
        n_kd, n_ce = step_divisors(kd_mask, labels, counts)
        draws = targets.tail_ids if kind == "forward_kl" and tail_draws_apply(kind, temperature) else None
        teacher_logp = teacher_coarse(targets, temperature) if kind == "forward_kl" else None  # (N, k+1)
        # the matmuls in the autocast dtype where autocast is on (bf16 on a GPU), the loss in fp32
        compute = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        w = weight.detach().to(compute)  # (V, d): a copy only where autocast changes the dtype
        # the gradient's dtype: fp16 cannot hold a gradient divided by the step's positions (its small
        # entries underflow), so under fp16 it stays fp32, and so do the matmuls that use it
        grad_dtype = torch.float32 if compute == torch.float16 else compute
        rows = chunk_rows(n, d, weight_copied=compute != weight.dtype)
        loss_rows = max(1, min(rows, LOGITS_BUDGET // vocab))  # fp32 rows the loss works on at once

        def fp32(*shape):
            return torch.empty(shape, dtype=torch.float32, device=device)

        # buffers made once: a chunk's logits (then their gradient), the loss's fp32 rows
        logits_buffer = torch.empty((rows, vocab), dtype=compute, device=device)  # (c, V)
        grad_buffer = logits_buffer if grad_dtype == compute or not with_grad else torch.empty(
            (rows, vocab), dtype=grad_dtype, device=device)  # (c, V): the gradient, over the logits where it can
        upcast = fp32(loss_rows, vocab) if compute != torch.float32 else None
        grad_rows = fp32(loss_rows, vocab) if with_grad else None
        grad_hidden = fp32(n, d) if want_hidden else None
        grad_weight = None  # (V, d) fp32, made at the last moment: at one chunk, after the weight's copy is freed
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if want_bias else None
        block = None
        kd_total = torch.zeros((), dtype=torch.float32, device=device)
        ce_total = torch.zeros((), dtype=torch.float32, device=device)
        with torch.autocast(device.type, enabled=False):
            for lo in range(0, n, rows):
                hi = min(n, lo + rows)
                h = hidden[lo:hi].detach().to(compute)  # (c, d)
                logits = torch.mm(h, w.t(), out=logits_buffer[: hi - lo])  # (c, V)
                grads = grad_buffer[: hi - lo]  # (c, V): d loss / d (h @ W.T + b), once the loss has run
                for a in range(0, hi - lo, loss_rows):  # the loss, and its gradient written over the logits
                    b = min(hi - lo, a + loss_rows)
                    z = logits[a:b] if upcast is None else upcast[: b - a].copy_(logits[a:b])  # (r, V) fp32
                    capped = _transform_(z, bias, head)
                    g = None if grad_rows is None else grad_rows[: b - a]
                    at = slice(lo + a, lo + b)
                    if kind == "forward_kl":
                        kd, ce = forward_kl_ce_chunk(z, targets.topk_ids[at], teacher_logp[at], labels[at],
                                                     kd_mask[at], kd_weight, temperature,
                                                     None if draws is None else draws[at], n_kd, n_ce, g)
                    else:
                        kd, ce = _autograd_rows(z, _target_rows(targets, at.start, at.stop), labels[at], kd_mask[at],
                                                kd_weight, temperature, kind, n_kd, n_ce, g)
                    kd_total += kd
                    ce_total += ce
                    if g is not None:
                        _untransform_(g, capped, head)  # d loss / d (h @ W.T + b)
                        if want_bias:
                            grad_bias += g.sum(0)
                        grads[a:b].copy_(g)
                if not with_grad:
                    continue
                # the gradient's matmuls: in the compute dtype, or (fp16) in fp32 on the fp32 weight
                w_grad, h_grad = (w, h) if grad_dtype == compute else (weight.detach().float(), hidden[lo:hi].detach().float())
                if want_hidden:
                    grad_hidden[lo:hi] = grads @ w_grad  # (c, d)
                if hi == n:  # the weight's compute copy is not needed again: freed before the gradient is made
                    w = w_grad = None
                if want_weight:
                    first = grad_weight is None
                    if first:
                        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=device)
                        if grad_dtype != torch.float32:
                            block = torch.empty((max(1, min(vocab, LOGITS_BUDGET // d)), d), dtype=grad_dtype,
                                                device=device)
                    _add_outer_(grad_weight, grads, h_grad, block, first)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = kd_weight * kd_total + (1 - kd_weight) * ce_total
        ctx.mark_non_differentiable(kd_total, ce_total)
        return loss, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        stored = scale_stored_gradients_(ctx, ctx.saved_tensors, grad_loss)
        grads = [None if grad is None else grad.to(dtype) for grad, dtype in zip(stored, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None, None, None)


def kd_ce_from_hidden(hidden: torch.Tensor, head: LogitHead, input_ids: torch.Tensor, targets: SparseTargets,
                      mask: torch.Tensor, kd_weight: float, temperature: float, kind: str = "forward_kl",
                      ce_mask: torch.Tensor | None = None, counts=None) -> dict[str, torch.Tensor]:
    """`pipeline.distill.losses.kd_ce_from_logits` from hidden states (B, T, d) and the head that makes
    the logits, chunked over positions: the same masks, counts, divergences, temperatures and tail
    draws (forward KL at T = 1), without the (B, T, V) logits."""
    ce_mask = label_positions(mask) if ce_mask is None else ce_mask
    B, T, d = hidden.shape
    flat = SparseTargets(**{name: None if value is None else value.reshape(B * T, *value.shape[2:])
                            for name, value in vars(targets).items()})
    labels = next_token_labels(input_ids, mask, ce_mask).reshape(B * T)
    loss, kd, ce = _FusedLinearLoss.apply(hidden.reshape(B * T, d), head.weight, head.bias, head, flat, labels,
                                          mask.reshape(B * T), kd_weight, temperature, kind, counts,
                                          torch.is_grad_enabled())
    return {"loss": loss, "kd": kd, "ce": ce}
