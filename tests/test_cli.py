"""The CLI answers --help without loading torch, and settings layer defaults < params.yaml < flags."""

import re
import subprocess
import sys

from pathlib import Path

from pipeline.config import build_config, cli_layer, read_params, section
from pipeline.settings.cache import CacheConfig
from pipeline.settings.corpus import CorpusConfig
from pipeline.settings.evaluate import EvalConfig
from pipeline.settings.generate import GenerateConfig
from pipeline.settings.student import StudentConfig
from pipeline.settings.teacher import TeacherConfig

ROOT = Path(__file__).resolve().parents[1]


def test_help_does_not_import_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom pipeline.cli import main\n"
            "for args in ([], ['cache-logits', '--help'], ['train-student', '--help']):\n"
            "    assert CliRunner().invoke(main, args + ['--help']).exit_code == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_defaults_then_params_then_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert build_config(CacheConfig, section(read_params(None), "cache_logits")) == CacheConfig()  # no params.yaml
    (tmp_path / "params.yaml").write_text("cache_logits:\n  k: 16\n  batch_size: 4\n")
    params = read_params(None)
    cfg = build_config(CacheConfig, section(params, "cache_logits"), cli_layer(k=32, batch_size=None))
    assert (cfg.k, cfg.batch_size, cfg.sequences_per_chunk) == (32, 4, CacheConfig().sequences_per_chunk)


SETTINGS = {"prepare-corpus": CorpusConfig, "train-teacher": TeacherConfig, "cache-logits": CacheConfig,
            "train-student": StudentConfig, "evaluate": EvalConfig, "generate": GenerateConfig}
from tests.test_dvc import DEMO_ONLY  # noqa: E402

PARAMS_SECTION = {"prepare-corpus": "prepare_corpus", "train-teacher": "train_teacher", "cache-logits": "cache_logits",
                  "train-student": "train_student", "evaluate": "evaluate", "generate": "generate"}


def test_every_setting_is_an_option_whose_help_shows_the_default():
    """Each field of each settings class is an option of its command, and the command's --help shows it
    with the default the code uses, which params.yaml repeats (where it names the key)."""
    import dataclasses

    import click
    import yaml
    from click.testing import CliRunner

    from pipeline.cli import main

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for command, cls in SETTINGS.items():
        text = " ".join(CliRunner().invoke(main, [command, "--help"], terminal_width=400).output.split())
        options = {param.name: param for param in main.commands[command].params}
        ctx = click.Context(main.commands[command])
        for field in dataclasses.fields(cls):
            assert field.name in options, f"{command}: no option for {cls.__name__}.{field.name}"
            flags, help_text = options[field.name].get_help_record(ctx)
            assert not help_text.startswith("[default"), f"{cls.__name__}.{field.name} has no help (setting(default, \"help\"))"
            assert f"--{field.name.replace('_', '-')}" in flags
            default = field.default
            written = (params.get(PARAMS_SECTION[command]) or {}).get(field.name, default)
            if (PARAMS_SECTION[command], field.name) in DEMO_ONLY:  # the demo's own value, marked in params.yaml
                written = default
            assert written == (list(default) if isinstance(default, tuple) else default), (command, field.name)
            if isinstance(default, bool) or default is None:  # spelled as in params.yaml
                shown = {True: "true", False: "false", None: "null"}[default]
            else:
                shown = list(default) if isinstance(default, tuple) else default
            assert f"[default: {shown}]" in help_text, (command, field.name, help_text)
            assert " ".join(f"{flags} {help_text}".split()) in text, (command, field.name)


def test_progress_bars_can_be_turned_off_on_every_long_command():
    from pipeline.cli import main

    for command in (*SETTINGS, "verify"):
        assert "progress" in {param.name for param in main.commands[command].params}, command


def test_dvc_stages_pass_no_settings_flags_so_a_bare_command_makes_the_same():
    """dvc.yaml's commands give paths and run flags only (the split aside, which names what a stage
    makes): every setting comes from params.yaml, which repeats the code's defaults."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        cmd = stage.get("do", stage)["cmd"].split()
        command = cmd[cmd.index("pipeline") + 1] if "pipeline" in cmd else cmd[cmd.index("-m") + 2]
        flags = {word[2:].replace("-", "_") for word in cmd if word.startswith("--")}
        settings = {field.name for field in __import__("dataclasses").fields(SETTINGS[command])}
        assert flags & settings <= {"split"}, (name, flags & settings)


def project_imports(path) -> set[str]:
    """The project modules a file imports: `from x import y` and `import x`, at the top or inside
    functions (`from pipeline.cache import store` names pipeline.cache.store where that is a module)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "stages"):
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] in ("pipeline", "stages")}
    return names


def module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (names that are not modules are dropped)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [*root.glob("pipeline/**/*.py"), *root.glob("stages/*.py")]
    names = {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path for path in files}
    return {name: {dep for dep in project_imports(path) if dep in names and dep != name} for name, path in names.items()}


# The layers of pipeline/, bottom first (docs/architecture.md): a module may import its own package
# and the layers below its own, never one beside or above it. The CLI runs the stages (the recipes);
# "pipeline" is the package itself (its version).
LAYERS = [["pipeline", "errors"], ["settings", "config"], ["io"], ["model_source"], ["models", "optim"], ["distributed", "launcher"], ["corpus"], ["teacher", "generate"],
          ["cache"], ["capture"], ["distill"], ["train"], ["evaluate"], ["api", "hf"], ["stages"], ["cli"]]


def unit_of(module: str) -> str:
    """pipeline.cache.store -> cache; pipeline.errors -> errors; stages.x -> stages."""
    parts = module.split(".")
    return parts[0] if parts[0] == "stages" else parts[1] if len(parts) > 1 else "pipeline"


def test_the_library_imports_downwards_only():
    level = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    graph = module_graph()
    library = [name for name in graph if name.startswith("pipeline.") and name != "pipeline.__main__"]
    assert {unit_of(name) for name in library} <= set(level), "a subpackage is missing from LAYERS"
    upward = [(name, dep) for name in library for dep in graph[name]
              if unit_of(dep) != unit_of(name) and (unit_of(dep) not in level or level[unit_of(dep)] >= level[unit_of(name)])]
    assert not upward, upward
    # nothing below the command line imports click, the stages or the public facade
    for name in library:
        if unit_of(name) not in ("cli",):
            source = (ROOT / (name.replace(".", "/") + ".py"))
            source = source if source.exists() else ROOT / name.replace(".", "/") / "__init__.py"
            imported = project_imports(source) | {n for n in _third_party(source)}
            assert "click" not in imported, name
            assert not any(dep.startswith("stages") for dep in imported), name
            if unit_of(name) not in ("api", "hf"):
                assert "pipeline.api" not in imported, name


def _third_party(path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_pipeline_has_few_modules_at_its_top():
    top = sorted(path.name for path in (ROOT / "pipeline").glob("*.py"))
    assert len(top) <= 11, top  # __init__, __main__ and the public API, the CLI and the base modules


def test_no_import_cycles_and_the_capture_does_not_load_training_code():
    graph = module_graph()

    def reaches(start, target, seen=()):
        return any(dep == target or (dep not in seen and reaches(dep, target, (*seen, dep))) for dep in graph.get(start, ()))

    cycles = [name for name in graph if reaches(name, name)]
    assert not cycles, cycles
    code = ("import sys\nimport stages.cache_logits\n"
            "loaded = [m for m in sys.modules if m.startswith(('pipeline.distill', 'pipeline.train'))]\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_dependency_has_a_floor_and_the_lowest_run_pins_each():
    """`make test-lowest` runs the tests on the floors pyproject.toml states: each dependency (dev too)
    must have one, and .ci/lowest_versions.py pins exactly those."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in [*project["dependencies"],
                                                                    *project["optional-dependencies"]["dev"]]]
    pins = subprocess.run([sys.executable, str(ROOT / ".ci" / "lowest_versions.py")], capture_output=True, text=True,
                          check=True).stdout.split()
    assert [pin.split("==")[0] for pin in pins] == names
    assert "torch==2.7" in pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9.a-z]*", pin) for pin in pins)
