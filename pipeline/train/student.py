"""Train a student from the cache alone: stream batches, distillation loss, checkpoint, resume."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from pipeline.distill.batch import linear_distillation_loss, loss_counts, step_counts
from pipeline.distill.losses import dense_teacher_targets
from pipeline.distributed import Process
from pipeline.errors import UserError, say_to_stderr
from pipeline.models.head import HEAD_CHECK_POSITIONS, check_head, hidden_and_head
from pipeline.optim import finite_grad_norm, lr_at, make_optimizer, set_lr
from pipeline.settings.student import StudentConfig
from pipeline.train.checkpoint import CHECKPOINT, TrainState, global_batch, load_checkpoint, save_checkpoint
from pipeline.train.heldout import HeldOut
from pipeline.train.loader import StreamSpec, make_loader, move
from pipeline.train.log import write_log
from pipeline.train.parallel import gradient_sync, reduce_mean, reduce_sum, unwrap, wrap


def train_student(model: PreTrainedModel, stream: StreamSpec, cfg: StudentConfig, device: torch.device, out: Path,
                  cache_id: str, process: Process = Process(), progress: bool = True, stop_after: int | None = None,
                  online_teacher: PreTrainedModel | None = None, checkpoints: Path | None = None,
                  held_out: HeldOut | None = None, restart_on_mismatch: bool = False,
                  start_fresh: Callable[[bool], None] | None = None, resume: bool = True,
                  say: Callable[[str], None] = say_to_stderr) -> dict[str, Any]:
    """Train until cfg.max_steps, resuming from checkpoints/checkpoint.pt (checkpoints: default out) when present.

    On one process or many (torchrun): `stream.batch_size` is per process, a step consumes one global
    batch (processes x batch_size x grad_accum sequences, the same ones for any process count), and
    rank 0 alone writes checkpoints and logs (losses and tokens/s are reduced over processes).

    With `online_teacher`, the cached targets are ignored and the teacher's full distribution on the
    same batches is the target (the online-KD reference, same loss code). With `held_out`, the
    validation loss and KL to its cached targets are logged every cfg.eval_every steps.

    `cache_id` (the cache's identity digest) goes into every checkpoint: a resume against another
    cache is refused. A non-finite loss stops the run before the optimizer step, so no NaN reaches
    the weights and the last checkpoint stays as it was.

    `stop_after` ends the run early after that many steps of this call (used to test resuming).
    `start_fresh(discarded)` runs on rank 0 before a run that starts at step 0 (see load_checkpoint);
    `resume=False` starts at step 0 whatever checkpoint there is (--overwrite).
    """
    checkpoints = checkpoints or out
    trained = wrap(model, process, device, cfg.parallelism)
    optimizer = make_optimizer(unwrap(trained), cfg.lr, cfg.weight_decay)
    state = load_checkpoint(checkpoints / CHECKPOINT, trained, optimizer, cfg, cache_id, process, restart_on_mismatch,
                            start_fresh, resume, say)
    micro_batches = iter(make_loader(stream, cfg.num_workers, skip_batches=state.step))
    if state.step < cfg.max_steps:  # the head is the student's own (an unknown family transform refused), once
        first = next(micro_batches)
        check_head(unwrap(trained), first["input_ids"][:1, :HEAD_CHECK_POSITIONS].long().to(device), "the student",
                   "the students' loss")
        micro_batches = itertools.chain([first], micro_batches)
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train-student", unit="step",
               disable=not (progress and process.is_main))
    with bar:  # closed (its line ended) also when the run stops with an error
        start_step = state.step
        while state.step < cfg.max_steps and (stop_after is None or state.step - start_step < stop_after):
            train_step(trained, optimizer, micro_batches, state, cfg, device, process, online_teacher)
            if held_out is not None and (state.step % cfg.eval_every == 0 or state.step == cfg.max_steps):
                state.log[-1].update(held_out.losses(unwrap(trained), cfg, process))
            bar.set_postfix(loss=f"{state.log[-1]['loss']:.3f}", kd=f"{state.log[-1]['kd']:.3f}",
                            tok_s=f"{state.log[-1]['tokens_per_s']:.0f}")
            bar.update()
            if state.step % cfg.checkpoint_every == 0 and state.step < cfg.max_steps:
                save_checkpoint(checkpoints, out, trained, optimizer, state, cfg, cache_id, process)
    model.eval()
    if process.is_main:
        write_log(out, state.log)
    seconds = time.monotonic() - state.started
    recent = state.log[-min(20, len(state.log)):] if state.log else [{"loss": float("nan"), "kd": float("nan"), "ce": float("nan")}]
    return {
        "steps": state.step,
        "finished": state.step >= cfg.max_steps,
        "processes": process.world_size,
        "global_batch": global_batch(cfg, process),
        "train_loss": sum(r["loss"] for r in recent) / len(recent),
        "train_kd": sum(r["kd"] for r in recent) / len(recent),
        "train_ce": sum(r["ce"] for r in recent) / len(recent),
        **{name: state.log[-1][name] for name in ("val_loss", "val_kd", "val_ce") if state.log and name in state.log[-1]},
        "seconds_this_run": seconds,
        "tokens_per_s": state.tokens_this_run / max(seconds, 1e-9),
    }


def train_step(trained: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches, state: TrainState,
               cfg: StudentConfig, device: torch.device, process: Process, online_teacher) -> None:
    """One optimizer step on one global batch: grad_accum micro-batches here, the others on the other processes."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    trained.train()
    lr = lr_at(state.step, cfg.max_steps, cfg.warmup_steps, cfg.lr)
    set_lr(optimizer, lr)
    step_start, tokens = time.monotonic(), 0
    sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0}  # device tensors until the step ends: one sync per step
    batches = [move(next(micro_batches), device) for _ in range(cfg.grad_accum)]  # input_ids (B, T) and its k-sparse targets
    # Each term is a mean over the whole step's positions (a chat mask counts a different number in each
    # micro-batch and process): a micro-batch divides its sums by the step's count / (processes x grad_accum),
    # and the gradients' average over processes and micro-batches is then that mean's gradient. Without a
    # mask every micro-batch counts the same and its own mean is that already (no collective needed).
    counts = None
    if "loss_mask" in batches[0]:
        counts = step_counts(reduce_sum(process, loss_counts(batches)), process.world_size * cfg.grad_accum)  # (2,)
    for micro, batch in enumerate(batches):
        input_ids = batch["input_ids"].long()
        if online_teacher is not None:  # the teacher's full distribution instead: k = V
            batch = {**{k: v for k, v in batch.items() if k in ("input_ids", "loss_mask")},
                     **dense_teacher_targets(online_teacher, input_ids, cfg.temperature).as_batch(),
                     "temperature": torch.full(input_ids.shape[:1], cfg.temperature, device=device)}
        with gradient_sync(trained, enabled=micro == cfg.grad_accum - 1):  # one all-reduce per step, not per micro-batch
            with autocast:  # the loss from the hidden states (B, T, d) and the head, a chunk of positions at a time
                hidden, head = hidden_and_head(trained, input_ids=input_ids)
                losses = linear_distillation_loss(hidden, head, batch, cfg.kd_weight, cfg.temperature, cfg.loss,
                                                  counts)  # the public API's
            (losses.loss / cfg.grad_accum).backward()
        for name in sums:
            sums[name] = sums[name] + getattr(losses, name).detach() / cfg.grad_accum
        tokens += input_ids.numel()
    sums = reduce_mean(process, sums)  # every process the same numbers: the same decision below
    if not math.isfinite(sums["loss"]):
        raise UserError(f"non-finite training loss ({sums['loss']}) at step {state.step + 1} "
                        f"(kd {sums['kd']}, ce {sums['ce']}); stopped before the update, nothing saved "
                        "from this run past the last checkpoint. Lower lr, or check the cache with `pipeline verify`")
    norm = finite_grad_norm(trained, cfg.grad_clip, f"at step {state.step + 1} (loss {sums['loss']:.4g})")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    tokens *= process.world_size  # every process takes the same number of tokens per step
    state.tokens_this_run += tokens
    state.log.append({"step": state.step, "lr": lr, **sums, "grad_norm": norm,
                      "tokens_per_s": tokens / (time.monotonic() - step_start)})
