"""Forward-KL distillation + hard-label CE in one pass over the logits, chunked over positions.

The unfused loss (pipeline.distill.losses) lets autograd keep several (B, T, V) temporaries alive:
log-sum-exps at two temperatures, their softmaxes in backward. Here each chunk of positions is
read once in forward, the loss *and* its gradient w.r.t. the logits are computed there (closed
form below), and backward only scales the stored gradient. Peak extra memory is one gradient
buffer the size of the logits (which backward needs anyway) plus one (chunk, V) temporary.

Gradient of the coarsened forward KL at temperature T w.r.t. logit z_j (q = softmax(z / T)):
    dKL/dz_j = (q_j - p~_j) / T,  p~_j = p_j on the top-k, q_j * p_tail / q_tail off it,
i.e. the teacher's tail mass is spread over the student's own tail in the student's proportions.
Multiplied by T^2 (Hinton) this is T * (q_j - p~_j).

With sampled tail ids (s draws j_1..j_s from the teacher's distribution outside the top-k, T = 1)
the tail target is the teacher's instead: p~ = p_tail / s at each draw (repeats add up), so
E[p~_j] = p_j and the gradient q - p~ is an unbiased estimate of the full-vocabulary forward-KL
gradient q - p. The logged KD value stays the coarsened (k + 1 outcome) KL.
"""

from __future__ import annotations

import torch

from pipeline.cache.logmath import LOG_FLOOR, log_mass_outside
from pipeline.models.head import LOGITS_BUDGET


def step_divisors(kd_mask: torch.Tensor, labels: torch.Tensor, counts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_kd, n_ce): what the KD and CE sums are divided by: `counts` (a step's totals) when given, else
    the numbers of KD positions and of labels (at least 1)."""
    if counts is None:
        return kd_mask.sum().clamp(min=1).float(), (labels >= 0).sum().clamp(min=1).float()
    return tuple(torch.as_tensor(c, dtype=torch.float32, device=kd_mask.device).clamp(min=1) for c in counts[:2])


def forward_kl_ce_chunk(z: torch.Tensor, ids: torch.Tensor, log_p: torch.Tensor, label: torch.Tensor,
                        use_kd: torch.Tensor, kd_weight: float, temperature: float, tail_ids: torch.Tensor | None,
                        n_kd: torch.Tensor, n_ce: torch.Tensor, grad: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of positions: (KD, CE) contributions to the step's means, and, into `grad` (c, V) fp32
    when given, the gradient of kd_weight * KD + (1 - kd_weight) * CE w.r.t. the logits z (c, V) fp32.

    ids (c, k); log_p (c, k+1) the teacher at T; label (c,) with -1 = none; use_kd (c,) bool; tail_ids
    (c, s) or None; n_kd, n_ce: the divisors of the sums (`step_divisors`)."""
    has_label = label >= 0
    safe_label = label.clamp(min=0)[:, None]
    # hard-label CE at T = 1. With a gradient to write, its buffer is the scratch of the log-sum-exp
    # (no (c, V) temporary) and keeps exp(z - max): the softmax, once the sum is known
    if grad is not None and temperature == 1.0:
        top = z.amax(dim=-1)  # (c,)
        total = torch.sub(z, top[:, None], out=grad).exp_().sum(dim=-1)
        lse1 = top + total.log()
    else:
        lse1 = torch.logsumexp(z, dim=-1)  # (c,)
    ce = lse1 - z.gather(-1, safe_label).squeeze(-1)
    ce_part = (ce * has_label).sum() / n_ce
    # student coarsened to the teacher's k + 1 outcomes, at T
    zt = z / temperature if temperature != 1.0 else z
    lse_t = torch.logsumexp(zt, dim=-1) if temperature != 1.0 else lse1
    q_top = zt.gather(-1, ids) - lse_t[:, None]  # (c, k)
    q_tail = log_mass_outside(zt, ids, lse_t, q_top)  # (c,), exact also for an over-confident student
    empty_tail = torch.isneginf(log_p[:, -1]) | (log_p[:, -1] <= LOG_FLOOR)
    log_q = torch.cat([q_top, q_tail[:, None]], dim=-1).clamp(min=LOG_FLOOR)
    log_q[:, -1] = log_q[:, -1].masked_fill(empty_tail, LOG_FLOOR)
    p = log_p.exp()
    kd = (p * (log_p - log_q)).sum(-1)  # (c,)
    kd_part = (kd * use_kd).sum() / n_kd * temperature**2
    if grad is None:
        return kd_part, ce_part
    # d/dz of kd_weight * T^2 * mean KD + (1 - kd_weight) * mean CE, written into grad
    kd_scale = (kd_weight * temperature * use_kd / n_kd)[:, None]  # (c, 1): T^2 * (1/T)
    ce_scale = ((1 - kd_weight) * has_label / n_ce)[:, None]
    g = grad
    if temperature == 1.0:  # g holds exp(z - max): q = that / its sum; the CE softmax is the same q
        g.mul_((kd_scale + ce_scale) / total[:, None])
    else:
        torch.sub(zt, lse_t[:, None], out=g).exp_()  # q = softmax(z / T)
        g.mul_(kd_scale).add_(torch.softmax(z, dim=-1).mul_(ce_scale))
    if tail_ids is None:
        # the teacher's tail mass spread over the student's tail in the student's proportions:
        # -T * p_tail * q_j / q_tail, in log space (q_tail may be far below what fp32 can divide by)
        spread = torch.where(empty_tail | torch.isneginf(q_tail), 0.0, p[:, -1]) * kd_scale[:, 0]  # (c,)
        log_coefficient = torch.log(spread) - torch.where(torch.isfinite(q_tail), q_tail, 0.0) - lse_t
        # on the top-k the exponent can be large: those entries are written below, not kept
        g.sub_(torch.add(zt, log_coefficient[:, None]).clamp_(max=80.0).exp_())
    # on the top-k: T * (q_j - p_j), written, not added: for an over-confident student the spread
    # term is huge there (clamped above) and would cancel in fp32
    ce_top = q_top.exp() if temperature == 1.0 else (z.gather(-1, ids) - lse1[:, None]).exp()  # (c, k)
    g.scatter_(-1, ids, kd_scale * (q_top.exp() - p[:, :-1]) + ce_scale * ce_top)
    g.scatter_add_(-1, safe_label, -ce_scale * has_label[:, None])
    if tail_ids is not None:  # -p_tail / s at each draw
        g.scatter_add_(-1, tail_ids, (-kd_scale * p[:, -1:] / tail_ids.shape[-1]).expand(tail_ids.shape))
    return kd_part, ce_part


class _FusedKDCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, topk_ids, teacher_logp, labels, kd_mask, kd_weight, temperature, tail_ids=None,
                counts=None):
        """logits (N, V); topk_ids (N, k); teacher_logp (N, k+1) at T; labels (N,) with -1 = none;
        kd_mask (N,) bool; tail_ids (N, s) or None; counts: the (KD, CE) divisors of the sums, default
        the numbers of KD positions and of labels. Returns (loss, kd, ce) as 0-d tensors."""
        if tail_ids is not None and temperature != 1.0:
            raise ValueError("sampled tail ids are draws at T = 1; use them only at temperature 1")
        n, vocab = logits.shape
        n_kd, n_ce = step_divisors(kd_mask, labels, counts)
        grad = torch.empty_like(logits) if logits.requires_grad else None
        kd_mean = logits.new_zeros((), dtype=torch.float32)
        ce_mean = logits.new_zeros((), dtype=torch.float32)
        rows = max(1, LOGITS_BUDGET // vocab)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            z = logits[lo:hi].float()  # (c, V)
            # the chunk's gradient, in place when the logits are fp32 (bf16 logits: via an fp32 chunk)
            g = None if grad is None else grad[lo:hi] if grad.dtype == torch.float32 else torch.empty_like(z)
            kd, ce = forward_kl_ce_chunk(z, topk_ids[lo:hi], teacher_logp[lo:hi], labels[lo:hi], kd_mask[lo:hi],
                                         kd_weight, temperature, None if tail_ids is None else tail_ids[lo:hi],
                                         n_kd, n_ce, g)
            kd_mean, ce_mean = kd_mean + kd, ce_mean + ce
            if g is not None and grad.dtype != torch.float32:
                grad[lo:hi] = g
        ctx.save_for_backward(grad)
        loss = kd_weight * kd_mean + (1 - kd_weight) * ce_mean
        ctx.mark_non_differentiable(kd_mean, ce_mean)
        return loss, kd_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        (grad,) = scale_stored_gradients_(ctx, ctx.saved_tensors, grad_loss)
        return grad, None, None, None, None, None, None, None, None


def scale_stored_gradients_(ctx, grads, grad_loss: torch.Tensor):
    """The gradients a loss computed in forward (for an incoming gradient of 1), times the incoming
    gradient of this backward: scaled in place, so no second copy of them exists (the weight's is
    (V, d)). A second backward through the same graph (retain_graph) rescales them by the ratio of
    the two incoming gradients, so each backward gets its own; after a backward whose incoming gradient
    was 0 that ratio does not exist: refused on the CPU, non-finite gradients on a GPU (where reading
    the value would stall the stream; train-student stops on them before the update). On the CPU the
    usual loss.backward() (grad_loss == 1 the first time) skips the pass."""
    applied = getattr(ctx, "applied_grad_loss", None)  # what the stored gradients are scaled by now (None: 1)
    if applied is None:
        factor = None if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0 else grad_loss
    else:
        if applied.device.type == "cpu" and applied.item() == 0.0:
            raise RuntimeError("backward through a fused distillation loss again after a backward with a zero "
                               "incoming gradient: its stored gradients were scaled to 0; compute the loss again")
        factor = grad_loss / applied
    if factor is not None:
        for grad in grads:
            if grad is not None:  # through .data: a saved tensor whose version changes could not be read again
                grad.data.mul_(factor.to(grad.dtype))
    ctx.applied_grad_loss = grad_loss.detach().clone()
    return grads


def fused_forward_kl_ce(logits: torch.Tensor, topk_ids: torch.Tensor, teacher_logp: torch.Tensor,
                        labels: torch.Tensor, kd_mask: torch.Tensor, kd_weight: float,
                        temperature: float, tail_ids: torch.Tensor | None = None,
                        counts=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kd, ce) for flattened inputs; see _FusedKDCE.forward for shapes."""
    return _FusedKDCE.apply(logits, topk_ids, teacher_logp, labels, kd_mask, kd_weight, temperature, tail_ids, counts)
