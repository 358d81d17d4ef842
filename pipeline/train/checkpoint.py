"""A student's resumable checkpoint: written atomically by rank 0, read and checked by rank 0, loaded
by every process (on any process count with the same global batch).

Whether a run resumes is one decision (`decide_resume`: fresh, resume, discard or refuse, with its
reason), made from what was found and what is asked, and then carried out (`load_checkpoint`).

A checkpoint records which student output (--out) it belongs to: kept in another directory
(--checkpoints), it is never resumed, discarded or replaced by a run for another --out
(`owner_problem`). A checkpoint is written whole or not at all (`checkpoint.pt.tmp`, then renamed):
the temporary file a kill or a full disk leaves is nothing to resume from, and never stops a rerun.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.config import as_dict
from pipeline.distributed import Process, broadcast, run_on_main
from pipeline.errors import UserError, say_to_stderr
from pipeline.settings.student import RUN_ONLY_SETTINGS, StudentConfig
from pipeline.train.log import write_log
from pipeline.train.parallel import full_state, load_full_state, unwrap

CHECKPOINT = "checkpoint.pt"
PARTIAL = CHECKPOINT + ".tmp"  # a checkpoint being written; left behind only by a kill
OVERWRITE_HINT = "use --overwrite to start over"


@dataclass
class TrainState:
    """Everything a resumed run needs, saved in one file."""

    step: int = 0  # optimizer steps done = global batches consumed (on any number of processes)
    log: list[dict[str, float]] = field(default_factory=list)
    # of this run only (not saved): for its tokens/s
    started: float = field(default_factory=time.monotonic)
    tokens_this_run: int = 0


def global_batch(cfg: StudentConfig, process: Process) -> int:
    return process.world_size * cfg.batch_size * cfg.grad_accum


def student_identity(out: Path) -> str:
    """Which student output a checkpoint belongs to: its --out, absolute, its symbolic links resolved."""
    return str(Path(os.path.abspath(out)).resolve())


def save_checkpoint(where: Path, out: Path, trained: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, cfg: StudentConfig, cache_id: str, process: Process) -> None:
    """Gather the full (unsharded) state on every process; rank 0 alone writes it."""
    model_state, optimizer_state = full_state(unwrap(trained), optimizer, process)
    if not process.is_main:
        return
    payload = {"model": model_state, "optimizer": optimizer_state, "config": as_dict(cfg), "cache_identity": cache_id,
               "global_batch": global_batch(cfg, process), "processes": process.world_size, "step": state.step,
               "log": state.log, "out": student_identity(out)}
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / PARTIAL
    try:
        with open(tmp, "wb") as file:  # a Python file: a full disk stays an OSError (ENOSPC) in the error's context
            torch.save(payload, file)
        tmp.replace(where / CHECKPOINT)  # atomic: a kill leaves the previous checkpoint intact
    except BaseException:  # a full disk, say: the part written is of no use, and frees its space
        tmp.unlink(missing_ok=True)
        raise
    write_log(out, state.log)


def read_checkpoint(path: Path) -> dict[str, Any] | str | None:
    """The checkpoint's payload; None when there is none; why it cannot be read (a str) when it is
    truncated or not a checkpoint at all."""
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        return f"{path} is not a readable checkpoint ({str(error).splitlines()[0][:80]})"
    if not isinstance(payload, dict) or "config" not in payload:
        return f"{path} is not a readable checkpoint (no config in it)"
    return payload


def owner_problem(recorded: str | None, out: str, path: Path) -> str | None:
    """Why the checkpoint at `path` is another student's (`recorded`: the --out it belongs to, None in a
    checkpoint older than this record; `out`: this run's, as `student_identity` gives them), or None."""
    if recorded is None or recorded == out:
        return None
    return (f"{path} belongs to the student {recorded}, not to --out {out}: it is left as it is (neither resumed "
            f"nor replaced); give this student its own --checkpoints, or rerun that student with --out {recorded}")


def check_owner(path: Path, out: Path) -> None:
    """Refuse, in one line, a checkpoint at `path` that belongs to another student output than `out`
    (`owner_problem`); one that cannot be read is left to `decide_resume`. The tensors are mapped, not
    read: only the record of its owner is."""
    if not path.is_file():
        return
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return
    recorded = payload.get("out") if isinstance(payload, dict) else None
    problem = owner_problem(recorded, student_identity(out), path)
    if problem is not None:
        raise UserError(problem)


def mismatch(payload: dict[str, Any], cfg: StudentConfig, cache_id: str, batch: int, processes: int,
             path: Path) -> str | None:
    """Why this checkpoint is of another run (cache, settings, global batch), or None when it is this run's."""
    identity = payload.get("cache_identity")
    if identity != cache_id:
        return f"{path} was trained on another cache (identity {identity}, this cache {cache_id})"
    ours = {name: value for name, value in as_dict(cfg).items() if name not in RUN_ONLY_SETTINGS}
    theirs = {name: value for name, value in payload["config"].items() if name not in RUN_ONLY_SETTINGS}
    if theirs != ours:
        changed = sorted(name for name in ours if theirs.get(name) != ours[name])
        return f"{path} was made with other settings ({', '.join(changed)})"
    if payload.get("global_batch") != batch:
        return (f"{path} was trained with a global batch of {payload.get('global_batch')} sequences "
                f"({payload.get('processes')} processes); this run's is {batch} ({processes} processes x batch_size "
                f"{cfg.batch_size} x grad_accum {cfg.grad_accum}): keep processes x batch_size x grad_accum equal "
                "to resume")
    return None


@dataclass(frozen=True)
class Resume:
    action: str  # fresh | resume | discard (start over, deleting it) | refuse
    reason: str


def decide_resume(found: dict[str, Any] | str | None, why_not: str | None, resume: bool,
                  restart_on_mismatch: bool, partial: bool = False) -> Resume:
    """What a run does with what it found: `found` is read_checkpoint's answer, `why_not` the
    mismatch of a payload (None: it is this run's), `resume` False for --overwrite (start over
    whatever is there), `restart_on_mismatch` discards another run's checkpoint instead of refusing,
    `partial` whether a checkpoint's temporary file is there (a run killed while writing one: nothing
    to resume from, removed unless the run resumes, which overwrites it with its next checkpoint)."""
    if not resume:
        return Resume("fresh", "--overwrite: starting over")
    if found is None:
        return Resume("fresh", f"the previous run was stopped writing its first checkpoint ({PARTIAL}, incomplete): "
                               "starting cleanly" if partial else "no checkpoint")
    problem = found if isinstance(found, str) else why_not
    if problem is None:
        return Resume("resume", f"resuming at step {found.get('step')}")
    if restart_on_mismatch:
        return Resume("discard", problem)
    return Resume("refuse", f"{problem}; {OVERWRITE_HINT}")


def load_checkpoint(path: Path, trained: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: StudentConfig,
                    cache_id: str, process: Process, restart_on_mismatch: bool,
                    start_fresh: Callable[[bool], None] | None = None, resume: bool = True,
                    say: Callable[[str], None] = say_to_stderr) -> TrainState:
    """Rank 0 reads the checkpoint and decides (decide_resume); every process loads it (another
    process count included). When the run starts fresh (no checkpoint, another run's discarded, or
    --overwrite), rank 0 calls `start_fresh(discarded)` first (the stage checks and empties the output
    directory there)."""

    def read() -> dict | None:
        found = read_checkpoint(path) if resume else None
        why_not = mismatch(found, cfg, cache_id, global_batch(cfg, process), process.world_size, path) \
            if isinstance(found, dict) else None
        partial = path.with_name(PARTIAL)
        decision = decide_resume(found, why_not, resume, restart_on_mismatch, partial.exists())
        if decision.action == "refuse":
            raise UserError(decision.reason)
        if decision.action == "discard":
            path.unlink()
            say(f"note: starting over: {decision.reason}")
        if decision.action != "resume" and partial.exists():  # an interrupted write: nothing in it to keep
            partial.unlink()
            if resume and found is None:
                say(f"note: {decision.reason}")
        if decision.action != "resume" and start_fresh is not None:
            start_fresh(decision.action == "discard")
        return found if decision.action == "resume" else None

    payload = run_on_main(process, read)
    if not broadcast(process, payload is not None):
        return TrainState()
    payload = payload or {}
    try:
        load_full_state(unwrap(trained), optimizer, process, payload.get("model"), payload.get("optimizer"))
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"{path} does not fit this student ({str(error).splitlines()[0][:80]}); "
                        f"{OVERWRITE_HINT}") from None
    step, log = broadcast(process, (payload.get("step"), payload.get("log")))
    if process.is_main:
        say(f"train-student: resuming at step {step} of {cfg.max_steps} from {path}")
    return TrainState(step, log)
