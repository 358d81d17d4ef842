"""A setting's help is data declared with its field, so `--help` needs only the compiled classes: it
answers where the package's .py files are absent (a wheel or an image holding only .pyc)."""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from pipeline.settings import field_help
from pipeline.settings.cache import CacheConfig
from pipeline.settings.corpus import CorpusConfig
from pipeline.settings.evaluate import EvalConfig
from pipeline.settings.generate import GenerateConfig
from pipeline.settings.student import StudentConfig
from pipeline.settings.teacher import TeacherConfig

SETTINGS = {"prepare-corpus": CorpusConfig, "train-teacher": TeacherConfig, "cache-logits": CacheConfig,
            "train-student": StudentConfig, "evaluate": EvalConfig, "generate": GenerateConfig}


@pytest.fixture(scope="module")
def sourceless(tmp_path_factory) -> Path:
    """A copy of the `pipeline` package compiled to .pyc beside each module, every .py removed."""
    root = tmp_path_factory.mktemp("sourceless")
    package = root / "pipeline"
    shutil.copytree(Path(pipeline.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-b", str(package)], check=True)
    for source in package.rglob("*.py"):
        source.unlink()
    assert not list(package.rglob("*.py")) and (package / "settings" / "cache.pyc").is_file()
    return root


def _run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_every_field_declares_its_help():
    for cls in SETTINGS.values():
        for field in dataclasses.fields(cls):
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name}: declare it as setting(default, \"help\")"
            assert field_help(cls)[field.name] == field.metadata["help"]


def test_help_answers_without_the_settings_source(sourceless):
    """`pipeline X --help` from the .pyc-only copy shows every setting's help."""
    where = _run(sourceless, "-c", "import pipeline.settings.cache as m; print(m.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == sourceless / "pipeline" / "settings" / "cache.pyc"  # the copy, not the tree
    for command, cls in SETTINGS.items():
        result = _run(sourceless, "-m", "pipeline", command, "--help")
        assert result.returncode == 0, (command, result.stderr[-2000:])
        shown = "".join(result.stdout.split())  # click wraps lines (and may break at hyphens)
        for name, help_text in field_help(cls).items():
            assert f"--{name.replace('_', '-')}" in shown, (command, name)
            assert "".join(help_text.split()) in shown, (command, name, help_text)
