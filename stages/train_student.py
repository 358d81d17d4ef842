"""Stage: train one student variant from the cache alone."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from pipeline.api import LogitCache
from pipeline.cache import identity_digest
from pipeline.config import as_dict
from pipeline.errors import require
from pipeline.models import build_llama, count_parameters, load_causal_lm, output_vocab_size, resolve_device, resolve_teacher
from pipeline.outputs import check_output, replace_dir, write_json
from pipeline.storage import Location, display
from pipeline.student import CHECKPOINT, train_student
from pipeline.settings.student import StudentConfig
from pipeline.tokenizer import check_model_tokenizer, save_for_model


def build_student(cfg: StudentConfig, attrs, device: torch.device):
    """The student: from --init-from, or a Llama of the configured size; vocab must match the cache."""
    if cfg.init_from:
        model = load_causal_lm(cfg.init_from, device).float()
        check_model_tokenizer(cfg.init_from, attrs["tokenizer_fingerprint"], "student", "cache")
    else:
        torch.manual_seed(cfg.seed)
        model = build_llama(attrs["vocab_size"], cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, attrs["seq_len"],
                            eos_id=attrs["eos_id"]).to(device)
    vocab = output_vocab_size(model)
    require(vocab == attrs["vocab_size"], f"student vocab {vocab} != cache vocab {attrs['vocab_size']}")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    require(max_positions is None or attrs["seq_len"] <= max_positions,
            f"cache seq_len {attrs['seq_len']} exceeds the student's max_position_embeddings {max_positions}")
    return model


def is_student_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / CHECKPOINT).is_file()


def main(cache: Location, out: Path, cfg: StudentConfig, overwrite: bool = False, progress: bool = True,
         stop_after: int | None = None) -> dict:
    inputs = {"--cache": cache, "--init-from": cfg.init_from, "--online-teacher": cfg.online_teacher}
    resuming = (out / CHECKPOINT).exists() and not overwrite
    if not resuming:
        check_output(out, overwrite, is_student_dir, "student directory", inputs)
    logits = LogitCache.open(cache)  # the public API's checks: format, completeness, every object present
    attrs = logits.attrs
    if cfg.temperature not in attrs["temperatures"]:
        click.echo(f"note: temperature {cfg.temperature} is not among the cache's stored temperatures "
                   f"{attrs['temperatures']}; the tempered teacher tail is approximated", err=True)
    device = resolve_device(cfg.device)
    model = build_student(cfg, attrs, device)  # checked before anything is written
    teacher = None
    if cfg.online_teacher:
        source = resolve_teacher(cfg.online_teacher)
        teacher = load_causal_lm(source, device)
        vocab = output_vocab_size(teacher)
        require(vocab == attrs["vocab_size"], f"online teacher vocab {vocab} != cache vocab {attrs['vocab_size']}")
        check_model_tokenizer(source, attrs["tokenizer_fingerprint"], "online teacher", "cache")
    if not resuming:
        replace_dir(out)  # every check has passed: only now is an old student (with --overwrite) removed
    draws_wanted = cfg.use_tail_samples and attrs["tail_samples"] > 0 and teacher is None
    tail_ids = draws_wanted and cfg.temperature == 1.0 and cfg.loss == "forward_kl"
    if draws_wanted and not tail_ids:
        click.echo("note: the cache's sampled tail ids serve forward KL at temperature 1 only; "
                   "this student uses the tail as one bucket", err=True)
    # the online teacher's tempered distribution is exact anyway: no stored temperature needed
    stream = logits.stream_spec(cfg.batch_size, cfg.seed, cfg.shuffle_window,
                                temperature=cfg.temperature if teacher is None else 1.0, tail_ids=tail_ids)
    metrics = train_student(model, stream, cfg, device, out, identity_digest(attrs), progress=progress,
                            stop_after=stop_after, online_teacher=teacher)
    if not metrics["finished"]:
        return metrics
    model.save_pretrained(out)
    save_for_model(logits.tokenizer(), attrs["eos_id"], out)
    metrics = {**metrics, "params": count_parameters(model), "cache": display(logits.location), "config": as_dict(cfg)}
    write_json(out / "metrics.json", metrics)
    (out / CHECKPOINT).unlink(missing_ok=True)
    click.echo(f"student: {metrics['params']:,} params, {metrics['steps']} steps, train loss {metrics['train_loss']:.3f} "
               f"(kd {metrics['train_kd']:.3f}, ce {metrics['train_ce']:.3f}), {metrics['tokens_per_s']:,.0f} tok/s -> {out}")
    return metrics
