"""Train a student from the cache alone: stream batches, distillation loss, checkpoint, resume."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from pipeline.config import as_dict
from pipeline.errors import require
from pipeline.loader import StreamSpec, make_loader, to_device
from pipeline.losses import LOSS_KINDS, distillation_loss
from pipeline.optim import lr_at, make_optimizer, set_lr
from pipeline.topk import dense_teacher_targets

@dataclass(frozen=True)
class StudentConfig:
    init_from: str | None = None  # HF dir or hub id to start from; else a Llama built from the sizes below
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 344
    kd_weight: float = 0.8  # loss = kd_weight * KD + (1 - kd_weight) * hard-label CE; 0 = baseline
    temperature: float = 1.0  # applied to teacher and student; KD scaled by T^2
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    use_tail_samples: bool = True  # use the cache's sampled tail ids when it has them (forward KL at T = 1)
    max_steps: int = 300
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    shuffle_window: int = 1024  # sequences shuffled together (whole chunks, in a seeded order)
    num_workers: int = 1  # DataLoader worker processes decoding the cache
    checkpoint_every: int = 100  # steps between resumable checkpoints
    seed: int = 0
    device: str = "auto"
    online_teacher: str | None = None  # reference: run this teacher in the loop, full-vocabulary targets

    def __post_init__(self) -> None:
        require(0.0 <= self.kd_weight <= 1.0, f"kd_weight must be in [0, 1], got {self.kd_weight}")
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(self.loss in LOSS_KINDS, f"loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss!r}")
        require(self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads")
        for name in ("max_steps", "batch_size", "grad_accum", "shuffle_window", "checkpoint_every"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1")
        require(self.num_workers >= 0, "num_workers must be >= 0")
        require(self.device in ("auto", "cpu", "cuda"), f"device must be auto|cpu|cuda, got {self.device!r}")


CHECKPOINT = "checkpoint.pt"
LOG_FIELDS = ("step", "lr", "loss", "kd", "ce", "tokens_per_s")


@dataclass
class TrainState:
    """Everything a resumed run needs, saved in one file."""

    step: int = 0  # optimizer steps done
    batches_consumed: int = 0  # micro-batches taken from the loader
    log: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(out: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer, state: TrainState,
                    cfg: StudentConfig) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": as_dict(cfg),
               "step": state.step, "batches_consumed": state.batches_consumed, "log": state.log}
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out / CHECKPOINT)  # atomic: a kill leaves the previous checkpoint intact
    write_log(out, state.log)


def load_checkpoint(out: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer, cfg: StudentConfig) -> TrainState:
    payload = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    require(payload["config"] == as_dict(cfg),
            f"{out / CHECKPOINT} was made with other settings; use --overwrite to start over")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    return TrainState(payload["step"], payload["batches_consumed"], payload["log"])


def write_log(out: Path, rows: list[dict[str, float]]) -> None:
    with (out / "train_log.tsv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def train_student(model: PreTrainedModel, stream: StreamSpec, cfg: StudentConfig, device: torch.device, out: Path,
                  progress: bool = True, stop_after: int | None = None,
                  online_teacher: PreTrainedModel | None = None) -> dict[str, Any]:
    """Train until cfg.max_steps, resuming from out/checkpoint.pt when present.

    With `online_teacher`, the cached targets are ignored and the teacher's full distribution on the
    same batches is the target (the online-KD reference, same loss code).

    `stop_after` ends the run early after that many steps of this call (used to test resuming).
    """
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    state = load_checkpoint(out, model, optimizer, cfg) if (out / CHECKPOINT).exists() else TrainState()
    batches = iter(make_loader(stream, cfg.num_workers, skip_batches=state.batches_consumed))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train-student", unit="step", disable=not progress)
    model.train()
    start_step, started, tokens_this_run = state.step, time.monotonic(), 0
    while state.step < cfg.max_steps and (stop_after is None or state.step - start_step < stop_after):
        lr = lr_at(state.step, cfg.max_steps, cfg.warmup_steps, cfg.lr)
        set_lr(optimizer, lr)
        step_start, tokens = time.monotonic(), 0
        sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0}  # device tensors until the step ends: one sync per step
        for _ in range(cfg.grad_accum):
            input_ids, targets, mask = to_device(next(batches), device)  # (B, T), k-sparse targets, (B, T)
            if online_teacher is not None:
                targets = dense_teacher_targets(online_teacher, input_ids, cfg.temperature)  # k = V
            state.batches_consumed += 1
            with autocast:
                logits = model(input_ids=input_ids).logits  # (B, T, V)
            losses = distillation_loss(logits, input_ids, targets, mask, cfg.kd_weight, cfg.temperature, cfg.loss)
            (losses["loss"] / cfg.grad_accum).backward()
            for name in sums:
                sums[name] = sums[name] + losses[name].detach() / cfg.grad_accum
            tokens += input_ids.numel()
        sums = {name: float(value) for name, value in sums.items()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        tokens_this_run += tokens
        state.log.append({"step": state.step, "lr": lr, **sums, "tokens_per_s": tokens / (time.monotonic() - step_start)})
        bar.set_postfix(loss=f"{sums['loss']:.3f}", kd=f"{sums['kd']:.3f}", tok_s=f"{state.log[-1]['tokens_per_s']:.0f}")
        bar.update()
        if state.step % cfg.checkpoint_every == 0 and state.step < cfg.max_steps:
            save_checkpoint(out, model, optimizer, state, cfg)
    bar.close()
    model.eval()
    write_log(out, state.log)
    seconds = time.monotonic() - started
    recent = state.log[-min(20, len(state.log)):] if state.log else [{"loss": float("nan"), "kd": float("nan"), "ce": float("nan")}]
    return {
        "steps": state.step,
        "finished": state.step >= cfg.max_steps,
        "train_loss": sum(r["loss"] for r in recent) / len(recent),
        "train_kd": sum(r["kd"] for r in recent) / len(recent),
        "train_ce": sum(r["ce"] for r in recent) / len(recent),
        "seconds_this_run": seconds,
        "tokens_per_s": tokens_this_run / max(seconds, 1e-9),
    }
