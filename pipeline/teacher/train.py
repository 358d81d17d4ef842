"""Train the default teacher: a small Llama on the corpus's train split, within a time budget."""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from pipeline.optim import finite_grad_norm, lr_at, make_optimizer, set_lr
from pipeline.settings.teacher import TeacherConfig


def train_teacher(model: PreTrainedModel, rows: np.ndarray, cfg: TeacherConfig, device: torch.device,
                  progress: bool = True) -> dict[str, float]:
    """Plain next-token training on random rows (N, T) until max_steps or max_minutes."""
    generator = np.random.default_rng(cfg.seed)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    model.train()
    start, step, loss_ema = time.monotonic(), 0, None
    bar = tqdm(total=cfg.max_steps, desc="train-teacher", unit="step", disable=not progress)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for step in range(cfg.max_steps):
        if time.monotonic() - start > cfg.max_minutes * 60:
            tqdm.write(f"train-teacher: max_minutes={cfg.max_minutes:g} reached after {step} of {cfg.max_steps} steps; "
                       "stopping early (raise train_teacher.max_minutes for a reproducible teacher)")
            break
        set_lr(optimizer, lr_at(step, cfg.max_steps, cfg.warmup_steps, cfg.lr))
        batch = torch.from_numpy(rows[generator.integers(0, len(rows), cfg.batch_size)].astype(np.int64)).to(device)  # (B, T)
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        finite_grad_norm(model, cfg.grad_clip, f"at step {step + 1} (loss {loss.item():.4g})")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}")
        bar.update()
    else:
        step = cfg.max_steps
    bar.close()
    model.eval()
    return {"steps": step, "train_loss": float(loss_ema or float("nan")), "minutes": (time.monotonic() - start) / 60}
