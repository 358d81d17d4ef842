"""Sequence-level vs token-level distillation on the plays (issue 25): four students of the same size,
steps and seed, trained on

    (a) the original answers, hard labels          (c) the teacher's answers, hard labels (sequence-level KD)
    (b) the original answers, KD from the cache    (d) the teacher's answers, KD from the cache

where a prompt is a speech of a play and its original answer the speech that follows it
(examples/plays_chat/make_prompts.py), and the teacher's answer is what `pipeline generate` samples
from the default teacher (data/teacher). Each student is scored on the held-out plays' prompts
(plays neither the teacher nor a student read): perplexity on the teacher's answers to them, KL(teacher
|| student) on those answers (the full vocabulary), and perplexity on their original answers.

    python bench/sequence_kd.py [--teacher data/teacher] [--work data/chat] [--steps 300]

Every step is the real CLI with examples/plays_chat/params.yaml (the chat demo's commands, printed as
they run); a step whose output exists is not run again. Needs the default teacher first: `make repro`
or `dvc repro train-teacher`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import header  # noqa: E402

PARAMS = "examples/plays_chat/params.yaml"
STUDENTS = {  # name: (the corpus its cache holds, the variant of PARAMS)
    "a-original-hard": ("original", "hard"),
    "b-original-kd": ("original", "kd"),
    "c-teacher-hard": ("teacher", "hard"),
    "d-teacher-kd": ("teacher", "kd"),
}


def run(*args: str, done: Path | None = None) -> None:
    """One command of the demo (`pipeline ...` or a script), shown; skipped when `done` exists."""
    if done is not None and done.exists():
        print(f"# (done already: {done})", flush=True)
        return
    command = [sys.executable, "-m", "pipeline", *args[1:]] if args[0] == "pipeline" else [sys.executable, *args]
    print("$ " + shlex.join(args), flush=True)
    start = time.monotonic()
    subprocess.run(command, cwd=ROOT, check=True)
    print(f"# {time.monotonic() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="data/teacher")
    parser.add_argument("--work", default="data/chat")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every student")
    args = parser.parse_args()
    if not (ROOT / args.teacher).is_dir():
        sys.exit(f"sequence_kd: no teacher at {args.teacher}: run `make repro` (or `dvc repro train-teacher`) first")
    work, p = Path(args.work), ("--params", PARAMS)
    teacher = ("--teacher", args.teacher)
    run("examples/plays_chat/make_prompts.py", "--out", f"{work}/prompts", done=ROOT / work / "prompts" / "heldout.jsonl")
    for split in ("train", "heldout"):  # the teacher answers the prompts of its plays and of the held-out ones
        run("pipeline", "generate", *p, *teacher, "--prompts", f"{work}/prompts/{split}.jsonl",
            "--out", f"{work}/answers-{split}", "--no-progress")
    corpora = {"original": ("--source", f"{work}/prompts/train.jsonl"), "teacher": ("--answers", f"{work}/answers-train"),
               "heldout-teacher": ("--answers", f"{work}/answers-heldout"),
               "heldout-original": ("--source", f"{work}/prompts/heldout.jsonl")}
    for name, source in corpora.items():
        run("pipeline", "prepare-corpus", *p, *source, "--out", f"{work}/corpus-{name}", "--no-progress",
            done=ROOT / work / f"corpus-{name}" / "tokens.zarr")
    for name in ("original", "teacher"):
        run("pipeline", "cache-logits", *p, *teacher, "--corpus", f"{work}/corpus-{name}",
            "--out", f"{work}/logits-{name}.zarr", "--no-progress", done=ROOT / work / f"logits-{name}.zarr")
    for student, (corpus, variant) in STUDENTS.items():
        run("pipeline", "train-student", *p, "--variant", variant, "--cache", f"{work}/logits-{corpus}.zarr",
            "--out", f"{work}/students/{student}", "--max-steps", str(args.steps), "--no-progress",
            done=ROOT / work / "students" / student / "metrics.json")
    print(score(ROOT / args.teacher, ROOT / work, args.steps))


def score(teacher_dir: Path, work: Path, steps: int) -> str:
    """The table: every student (and the teacher) on both held-out corpora."""
    from pipeline.corpus.loss_mask import learned_positions
    from pipeline.corpus.token_store import SplitRows, open_token_store
    from pipeline.evaluate.scores import evaluate_models
    from pipeline.models.devices import resolve_device
    from pipeline.models.load import load_causal_lm, resolve_teacher

    device = resolve_device("auto")
    teacher = load_causal_lm(resolve_teacher(str(teacher_dir)), device)
    students = {name: load_causal_lm(str(work / "students" / name), device) for name in STUDENTS}
    results, positions = {}, {}
    for name in ("heldout-teacher", "heldout-original"):
        corpus = work / f"corpus-{name}"
        rows, mask = SplitRows(open_token_store(corpus), "train", str(corpus)).rows(0, None)
        results[name] = evaluate_models(teacher, students, rows, 16, device, progress=False, loss_mask=mask)
        positions[name] = int(learned_positions(mask).sum())
    trained = {name: json.loads((work / "students" / name / "metrics.json").read_text()) for name in STUDENTS}
    lines = [header("Sequence-level vs token-level distillation on the plays (bench/sequence_kd.py)"),
             f"# {steps} steps x 16 sequences, d_model 128, 4 layers, seed 0; held out: "
             f"{positions['heldout-teacher']:,} answer positions of the teacher's answers, "
             f"{positions['heldout-original']:,} of the original answers",
             "", "| student | trained on | targets | ppl, teacher's answers | KL to teacher | ppl, original answers |",
             "|---|---|---|---:|---:|---:|"]
    for name, (corpus, variant) in STUDENTS.items():
        on_teacher, on_original = results["heldout-teacher"][name], results["heldout-original"][name]
        lines.append(f"| {name} | {corpus} answers | {'hard labels' if variant == 'hard' else 'KD 0.8 + hard 0.2'} "
                     f"| {on_teacher['perplexity']:.2f} | {on_teacher['kl_to_teacher']:.3f} "
                     f"| {on_original['perplexity']:.2f} |")
        assert trained[name]["steps"] == steps, (name, trained[name]["steps"])
    lines.append(f"| teacher | | | {results['heldout-teacher']['teacher']['perplexity']:.2f} | 0 "
                 f"| {results['heldout-original']['teacher']['perplexity']:.2f} |")
    (work / "sequence_kd.json").write_text(json.dumps(results, indent=1))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
