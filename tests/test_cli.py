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
