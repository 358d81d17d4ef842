"""The CLI answers --help without loading torch, and settings layer defaults < params.yaml < flags."""

import subprocess
import sys

from pipeline.settings.cache import CacheConfig
from pipeline.config import build_config, cli_layer, read_params, section


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
