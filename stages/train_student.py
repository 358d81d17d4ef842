"""Stage: train one student variant from the cache alone, on one process or every process of a torchrun job."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from pipeline.cache.format import identity_digest, tail_draws_apply
from pipeline.config import as_dict
from pipeline.corpus.tokenizer import check_model_tokenizer, save_for_model
from pipeline.distributed import init, on_main, shutdown
from pipeline.errors import require
from pipeline.io.locks import output_location, writer_lock
from pipeline.io.outputs import check_not_an_input, check_ours, check_output, full_disk_named, replace_dir, write_json
from pipeline.io.storage import Location, display
from pipeline.models.load import count_parameters, load_causal_lm, output_vocab_size, resolve_teacher
from pipeline.settings.student import StudentConfig
from pipeline.train.checkpoint import CHECKPOINT, PARTIAL, check_owner, global_batch
from pipeline.train.data import LogitCache
from pipeline.train.heldout import HeldOut
from pipeline.train.log import LOG_NAME
from pipeline.train.model import build_student
from pipeline.train.parallel import full_model_state
from pipeline.train.student import train_student


def is_student_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("metrics.json", CHECKPOINT, PARTIAL, LOG_NAME))


def is_checkpoints_dir(path: Path) -> bool:
    """What --checkpoints may name when it holds anything: a directory of a student's checkpoint."""
    return any((path / name).is_file() for name in (CHECKPOINT, PARTIAL))


RERUN = "the same command resumes from the last checkpoint"


def main(cache: Location, out: Path, cfg: StudentConfig, overwrite: bool = False, progress: bool = True,
         stop_after: int | None = None, checkpoints: Path | None = None, eval_cache: Location | None = None,
         restart_on_mismatch: bool = False) -> dict:
    """Train one student (on this process, or on every process of a torchrun job: rank 0 decides and writes)."""
    process, device = init(cfg.device)
    inputs = {"--cache": cache, "--init-from": cfg.init_from, "--online-teacher": cfg.online_teacher,
              "--eval-cache": eval_cache}
    with contextlib.ExitStack() as held:
        held.callback(shutdown)

        def guard() -> bool:  # rank 0: --out and --checkpoints are outputs, each locked until the job ends
            check_not_an_input(out, inputs)
            held.enter_context(writer_lock(out))
            check_ours(out, is_student_dir, "student directory", overwrite=overwrite)
            if checkpoints is None or output_location(checkpoints) == output_location(out):
                return False
            check_not_an_input(checkpoints, inputs, "--checkpoints")
            held.enter_context(writer_lock(checkpoints))
            check_ours(checkpoints, is_checkpoints_dir, "checkpoint directory", "--checkpoints", overwrite)
            check_owner(checkpoints / CHECKPOINT, out)  # another student's is never resumed, nor replaced
            return True

        separate = on_main(process, guard)  # whether the checkpoint lives apart from --out
        held.enter_context(full_disk_named(out, checkpoints, rerun=RERUN))
        return _train(process, device, cache, out, cfg, overwrite, progress, stop_after,
                      checkpoints if separate else out, eval_cache, restart_on_mismatch, inputs)


def _train(process, device, cache, out, cfg, overwrite, progress, stop_after, checkpoints, eval_cache,
           restart_on_mismatch, inputs) -> dict:
    say = (lambda line: click.echo(line, err=True)) if process.is_main else (lambda line: None)
    # the public API's checks (format, completeness, every object present), once per job: rank 0 opens it
    logits = on_main(process, lambda: LogitCache.open(cache))
    attrs = logits.attrs
    tokenizer = logits.tokenizer()  # saved beside the student at the end: a damaged one is refused now, not then
    if cfg.temperature not in attrs["temperatures"]:
        say(f"note: temperature {cfg.temperature} is not among the cache's stored temperatures "
            f"{attrs['temperatures']}; the tempered teacher tail is approximated")
    model = build_student(cfg, attrs, device)  # checked before anything is written; the same weights on every process
    teacher = None
    if cfg.online_teacher:
        source = resolve_teacher(cfg.online_teacher)
        teacher = load_causal_lm(source, device, role="--online-teacher")
        vocab = output_vocab_size(teacher)
        require(vocab == attrs["vocab_size"], f"online teacher vocab {vocab} != cache vocab {attrs['vocab_size']}")
        check_model_tokenizer(source, attrs["tokenizer_fingerprint"], "online teacher", "cache",
                              vocab_size=attrs["vocab_size"], eos_id=attrs["eos_id"])
    held_out = HeldOut.open(eval_cache, attrs, cfg, device, process) if eval_cache is not None else None
    if eval_cache is not None and held_out is None:
        say(f"note: --eval-cache {display(eval_cache)} holds no sequences (a corpus without a validation split): "
            "no held-out check")
    elif held_out is not None and held_out.split == "train":
        say(f"note: --eval-cache {display(eval_cache)} is a capture of the train split: its loss is not a held-out one")
    if logits.attrs.get("split") == "validation":
        say(f"note: --cache {display(cache)} is a capture of the validation split: this student trains on held-out data")

    def start_fresh(discarded: bool) -> None:  # rank 0, when no checkpoint is resumed: the output directory
        check_output(out, overwrite or discarded, is_student_dir, "student directory", inputs)
        # every check has passed: only now are an old student and its checkpoint (with --overwrite) removed
        (checkpoints / CHECKPOINT).unlink(missing_ok=True)
        replace_dir(out)
    tail_draws = cfg.use_tail_samples and teacher is None  # the online teacher's targets are its whole distribution
    if tail_draws and attrs["tail_samples"] > 0 and not tail_draws_apply(cfg.loss, cfg.temperature):
        say("note: the cache's sampled tail ids serve forward KL at temperature 1 only; "
            "this student uses the tail as one bucket")
    # the online teacher's tempered distribution is exact anyway: no stored temperature needed
    stream = logits.stream_spec(cfg.batch_size, cfg.seed, cfg.shuffle_window,
                                temperature=cfg.temperature if teacher is None else 1.0, tail_ids=tail_draws,
                                grad_accum=cfg.grad_accum, loss=cfg.loss)
    tokens = global_batch(cfg, process) * attrs["seq_len"]
    say(f"train-student: {process.world_size} process{'es' if process.distributed else ''} x batch_size {cfg.batch_size} "
        f"x grad_accum {cfg.grad_accum} = global batch {global_batch(cfg, process)} sequences ({tokens:,} tokens) "
        f"per step{f', {cfg.parallelism}' if process.distributed else ''} on {device.type}")
    metrics = train_student(model, stream, cfg, device, out, identity_digest(attrs), process, progress=progress,
                            stop_after=stop_after, online_teacher=teacher, checkpoints=checkpoints, held_out=held_out,
                            restart_on_mismatch=restart_on_mismatch, start_fresh=start_fresh, resume=not overwrite,
                            say=say)
    if not metrics["finished"]:
        return metrics
    state = full_model_state(model, process) if cfg.parallelism == "fsdp" else None  # gathered by every process
    if not process.is_main:
        return metrics
    model.save_pretrained(out, **({"state_dict": state} if state is not None else {}))
    save_for_model(tokenizer, attrs["eos_id"], out)
    metrics = {**metrics, "params": count_parameters(model), "cache": display(logits.location), "config": as_dict(cfg)}
    write_json(out / "metrics.json", metrics)
    (checkpoints / CHECKPOINT).unlink(missing_ok=True)
    (checkpoints / PARTIAL).unlink(missing_ok=True)  # a kill's, not overwritten when the run resumed at its last step
    if checkpoints != out and checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    val = f", val CE {metrics['val_ce']:.3f}, val KL {metrics['val_kd']:.4f}" if "val_ce" in metrics else ""
    click.echo(f"student: {metrics['params']:,} params, {metrics['steps']} steps, train loss {metrics['train_loss']:.3f} "
               f"(kd {metrics['train_kd']:.3f}, ce {metrics['train_ce']:.3f}){val}, {metrics['tokens_per_s']:,.0f} tok/s "
               f"-> {out}")
    return metrics
