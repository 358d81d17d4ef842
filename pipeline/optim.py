"""Optimizer and schedule shared by teacher and student training."""

from __future__ import annotations

import math

import torch

from pipeline.errors import UserError


def lr_at(step: int, max_steps: int, warmup_steps: int, peak_lr: float, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to peak_lr, then cosine decay to min_lr_ratio * peak_lr at max_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def finite_grad_norm(model: torch.nn.Module, max_norm: float, where: str) -> float:
    """Clip the gradients to `max_norm` and return their norm before clipping; a non-finite norm stops
    the run before the optimizer step (the gradients are dropped), so no NaN or inf reaches the
    weights, even from a finite loss. Under DDP or FSDP2 the norm is of the whole model's gradient,
    the same on every process, so every process stops alike."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
    if not math.isfinite(norm):
        for parameter in model.parameters():
            parameter.grad = None
        raise UserError(f"non-finite gradient norm ({norm}) {where}; stopped before the update, nothing saved from this "
                        "run past the last checkpoint. Lower lr, or check the cache with `pipeline verify`")
    return norm
