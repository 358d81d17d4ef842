"""Train a student from the cache alone: stream batches, distillation loss, checkpoint, resume."""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from pipeline.config import as_dict
from pipeline.errors import UserError, require
from pipeline.api import distillation_loss
from pipeline.loader import StreamSpec, batches, make_loader, move
from pipeline.losses import dense_teacher_targets
from pipeline.optim import lr_at, make_optimizer, set_lr
from pipeline.settings.student import StudentConfig

CHECKPOINT = "checkpoint.pt"
LOG_FIELDS = ("step", "lr", "loss", "kd", "ce", "tokens_per_s")


@dataclass
class TrainState:
    """Everything a resumed run needs, saved in one file."""

    step: int = 0  # optimizer steps done
    batches_consumed: int = 0  # micro-batches taken from the loader
    log: list[dict[str, float]] = field(default_factory=list)
    # of this run only (not saved): for its tokens/s
    started: float = field(default_factory=time.monotonic)
    tokens_this_run: int = 0


def save_checkpoint(out: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer, state: TrainState,
                    cfg: StudentConfig, cache_id: str) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": as_dict(cfg),
               "cache_identity": cache_id, "step": state.step, "batches_consumed": state.batches_consumed,
               "log": state.log}
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out / CHECKPOINT)  # atomic: a kill leaves the previous checkpoint intact
    write_log(out, state.log)


def load_checkpoint(out: Path, model: PreTrainedModel, optimizer: torch.optim.Optimizer, cfg: StudentConfig,
                    cache_id: str) -> TrainState:
    path = out / CHECKPOINT
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        config, identity = payload["config"], payload.get("cache_identity")
    except Exception as error:  # truncated or not a checkpoint at all
        raise UserError(f"{path} is not a readable checkpoint ({str(error).splitlines()[0][:80]}); "
                        "use --overwrite to start over") from None
    require(identity == cache_id, f"{path} was trained on another cache (identity {identity}, this cache {cache_id}); "
                                  "use --overwrite to start over or choose another --out")
    require(config == as_dict(cfg), f"{path} was made with other settings; use --overwrite to start over")
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"{path} does not fit this student ({str(error).splitlines()[0][:80]}); "
                        "use --overwrite to start over") from None
    return TrainState(payload["step"], payload["batches_consumed"], payload["log"])


def write_log(out: Path, rows: list[dict[str, float]]) -> None:
    with (out / "train_log.tsv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def train_student(model: PreTrainedModel, stream: StreamSpec, cfg: StudentConfig, device: torch.device, out: Path,
                  cache_id: str, progress: bool = True, stop_after: int | None = None,
                  online_teacher: PreTrainedModel | None = None) -> dict[str, Any]:
    """Train until cfg.max_steps, resuming from out/checkpoint.pt when present.

    With `online_teacher`, the cached targets are ignored and the teacher's full distribution on the
    same batches is the target (the online-KD reference, same loss code).

    `cache_id` (the cache's identity digest) goes into every checkpoint: a resume against another
    cache is refused. A non-finite loss stops the run before the optimizer step, so no NaN reaches
    the weights and the last checkpoint stays as it was.

    `stop_after` ends the run early after that many steps of this call (used to test resuming).
    """
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    state = load_checkpoint(out, model, optimizer, cfg, cache_id) if (out / CHECKPOINT).exists() else TrainState()
    stream_of_batches = batches(make_loader(stream, cfg.num_workers, skip_batches=state.batches_consumed))
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train-student", unit="step", disable=not progress)
    with bar:  # closed (its line ended) also when the run stops with an error
        train_steps(model, optimizer, stream_of_batches, state, cfg, device, out, cache_id, bar, stop_after, online_teacher)
    model.eval()
    write_log(out, state.log)
    seconds = time.monotonic() - state.started
    recent = state.log[-min(20, len(state.log)):] if state.log else [{"loss": float("nan"), "kd": float("nan"), "ce": float("nan")}]
    return {
        "steps": state.step,
        "finished": state.step >= cfg.max_steps,
        "train_loss": sum(r["loss"] for r in recent) / len(recent),
        "train_kd": sum(r["kd"] for r in recent) / len(recent),
        "train_ce": sum(r["ce"] for r in recent) / len(recent),
        "seconds_this_run": seconds,
        "tokens_per_s": state.tokens_this_run / max(seconds, 1e-9),
    }


def train_steps(model, optimizer, stream_of_batches, state: TrainState, cfg: StudentConfig, device: torch.device,
                out: Path, cache_id: str, bar, stop_after: int | None, online_teacher) -> None:
    """The training loop: optimizer steps until max_steps (or stop_after steps of this call)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    start_step = state.step
    while state.step < cfg.max_steps and (stop_after is None or state.step - start_step < stop_after):
        lr = lr_at(state.step, cfg.max_steps, cfg.warmup_steps, cfg.lr)
        set_lr(optimizer, lr)
        step_start, tokens = time.monotonic(), 0
        sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0}  # device tensors until the step ends: one sync per step
        for _ in range(cfg.grad_accum):
            batch = move(next(stream_of_batches), device)  # input_ids (B, T) and its k-sparse targets
            input_ids = batch["input_ids"].long()
            if online_teacher is not None:  # the teacher's full distribution instead: k = V
                batch = {"input_ids": input_ids,
                         **dense_teacher_targets(online_teacher, input_ids, cfg.temperature).as_batch()}
            state.batches_consumed += 1
            with autocast:
                logits = model(input_ids=input_ids).logits  # (B, T, V)
            losses = distillation_loss(logits, batch, cfg.kd_weight, cfg.temperature, cfg.loss)  # the public API's
            (losses.loss / cfg.grad_accum).backward()
            for name in sums:
                sums[name] = sums[name] + getattr(losses, name).detach() / cfg.grad_accum
            tokens += input_ids.numel()
        sums = {name: float(value) for name, value in sums.items()}
        if not math.isfinite(sums["loss"]):
            raise UserError(f"non-finite training loss ({sums['loss']}) at step {state.step + 1} "
                            f"(kd {sums['kd']}, ce {sums['ce']}); stopped before the update, nothing saved "
                            "from this run past the last checkpoint. Lower lr, or check the cache with `pipeline verify`")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_this_run += tokens
        state.log.append({"step": state.step, "lr": lr, **sums, "tokens_per_s": tokens / (time.monotonic() - step_start)})
        bar.set_postfix(loss=f"{sums['loss']:.3f}", kd=f"{sums['kd']:.3f}", tok_s=f"{state.log[-1]['tokens_per_s']:.0f}")
        bar.update()
        if state.step % cfg.checkpoint_every == 0 and state.step < cfg.max_steps:
            save_checkpoint(out, model, optimizer, state, cfg, cache_id)

