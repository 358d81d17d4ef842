"""Stage: evaluate the teacher and all students on the validation split; write metrics, plots, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from pipeline.errors import require
from pipeline.evaluate.scores import evaluate_models
from pipeline.settings.evaluate import EvalConfig
from pipeline.models.devices import resolve_device
from pipeline.models.load import count_parameters, load_causal_lm, output_vocab_size, resolve_teacher
from pipeline.io.outputs import full_disk_named, staged_output, write_json
from pipeline.evaluate.report import comparison_chart, markdown_table, training_chart
from pipeline.io.storage import Location, display
from pipeline.corpus.loss_mask import learned_positions
from pipeline.corpus.token_store import SplitRows, open_token_store
from pipeline.corpus.tokenizer import check_model_tokenizer
from pipeline.train.log import LOG_NAME, read_log


def find_students(students_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """What `--students DIR` names: DIR itself when it is one trained student, else every trained student
    directly in it. Returns (name -> directory, a note per directory skipped and why)."""
    require(students_dir.is_dir(), f"--students {students_dir}: not a directory")
    if (students_dir / "metrics.json").is_file():
        return {students_dir.name: students_dir}, []
    require(not (students_dir / LOG_NAME).is_file(),  # a student's log starts with its first step
            f"--students {students_dir} is a student that is not trained yet (no metrics.json): let its "
            "train-student finish (it resumes from its checkpoint), or name the directory that holds students")
    found, skipped = {}, []
    for path in sorted(p for p in students_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (path / "metrics.json").is_file():
            found[path.name] = path
        elif (path / LOG_NAME).is_file():
            skipped.append(f"{path.name} (not trained yet: no metrics.json)")
        else:
            skipped.append(f"{path.name} (not a student directory)")
    listed = f"; skipped: {', '.join(skipped)}" if skipped else ""
    require(found, f"no trained students in {students_dir} (a student's directory holds metrics.json once "
                   f"train-student finishes){listed}")
    return found, skipped


REPORT = "report.md"


def is_reports_dir(path: Path) -> bool:
    """A reports directory this tool wrote: its report and its metrics of the teacher and the students
    (a student's own metrics.json has neither)."""
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return (path / REPORT).is_file() and isinstance(metrics, dict) and {"teacher", "students"} <= metrics.keys()


def main(teacher: str, corpus: Location, students_dir: Path, out: Path, cfg: EvalConfig, progress: bool = True) -> dict:
    """Evaluate into a reports directory built aside and swapped in when complete: it replaces only reports
    this tool wrote (a rerun's), never another directory, one evaluation at a time."""
    inputs = {"--teacher": teacher, "--corpus": corpus, "--students": students_dir}
    with full_disk_named(out, rerun="the previous reports are as they were; the same command writes them again"), \
            staged_output(out, True, is_reports_dir, "reports directory", inputs) as staging:
        return _evaluate(teacher, corpus, students_dir, staging, cfg, progress)


def _evaluate(teacher: str, corpus: Location, students_dir: Path, out: Path, cfg: EvalConfig, progress: bool) -> dict:
    """Score and write the reports into `out` (the staging directory: it is empty)."""
    store = open_token_store(corpus)
    # (N, T) each, checked against their digests; a chat corpus is scored on the assistant's tokens only
    rows, loss_mask = SplitRows(store, "validation", display(corpus)).rows(0, cfg.max_sequences or None)
    student_dirs, skipped = find_students(students_dir)
    for note in skipped:
        click.echo(f"evaluate: skipping {note}", err=True)
    device = resolve_device(cfg.device)
    source = resolve_teacher(teacher)
    teacher_model = load_causal_lm(source, device, role="--teacher")
    fingerprint = store.attrs["tokenizer_fingerprint"]
    known = {"vocab_size": store.attrs["vocab_size"], "eos_id": store.attrs["eos_id"]}  # for models without tokenizer files
    check_model_tokenizer(source, fingerprint, "teacher", "corpus", **known)
    students = {}
    for name, path in student_dirs.items():
        students[name] = load_causal_lm(str(path), device)
        check_model_tokenizer(str(path), fingerprint, f"student {name}", "corpus", **known)
    require(rows.size == 0 or int(rows.max()) < output_vocab_size(teacher_model),
            f"the corpus holds token ids >= the teacher vocab {output_vocab_size(teacher_model)}: another tokenizer")
    if len(rows):
        results = evaluate_models(teacher_model, students, rows, cfg.batch_size, device, progress, loss_mask=loss_mask)
    else:  # nothing to score: the report still lists the students, with their training curves
        click.echo("evaluate: the corpus has no validation split (validation_fraction 0): nothing scored; the report "
                   "lists the students and their training curves only", err=True)
        nothing = dict.fromkeys(("perplexity", "cross_entropy", "kl_to_teacher", "top1_agreement"), float("nan"))
        results = {name: dict(nothing) for name in ["teacher", *students]}

    metrics = {"teacher": {**results["teacher"], "params": count_parameters(teacher_model)}, "students": {}}
    curves = out / "curves"
    curves.mkdir(parents=True)
    for name, path in student_dirs.items():
        trained = json.loads((path / "metrics.json").read_text())
        config = trained["config"]
        metrics["students"][name] = {
            **results[name], "params": count_parameters(students[name]), "steps": trained["steps"],
            "kd_weight": config["kd_weight"], "temperature": config["temperature"], "loss": config["loss"],
            "d_model": config["d_model"], "n_layers": config["n_layers"], "train_tokens_per_s": trained["tokens_per_s"],
        }
        shutil.copy(path / LOG_NAME, curves / f"{name}.tsv")
    scored = int(rows.size) if loss_mask is None else int(learned_positions(loss_mask).sum())
    metrics["evaluated_tokens"] = scored
    write_json(out / "metrics.json", metrics)
    table = markdown_table(metrics)
    what = "validation tokens" if loss_mask is None else "validation positions predicting an assistant token"
    (out / REPORT).write_text(f"# Students vs teacher on held-out data\n\n{scored:,} {what}.\n\n{table}")
    comparison_chart(metrics, out / "comparison.png")
    training_chart({name: read_log(path) for name, path in student_dirs.items()}, out / "training.png")
    click.echo(table)
    return metrics
