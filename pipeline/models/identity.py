"""A model's content identity: what a cache or the teacher's answers record of the model that made them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# config.json keys that say how or where a model was saved, not what it computes
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")


def weights_fingerprint(name_or_path: str, config) -> str:
    """The teacher's content identity: sha256 of a local model dir's weight files and its config
    (without the keys that only record how it was saved), else the hub commit of the weights its
    `config` (a transformers config, loaded from it) carries. How the path is spelled (relative,
    absolute, a symlink, a trailing /) does not enter."""
    path = Path(name_or_path)
    if path.is_dir():
        digest = hashlib.sha256()
        config_file = path / "config.json"
        saved = json.loads(config_file.read_text()) if config_file.is_file() else config.to_dict()
        saved = {key: value for key, value in saved.items() if key not in VOLATILE_CONFIG_KEYS}
        digest.update(json.dumps(saved, sort_keys=True, default=str).encode())
        for file in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")):
            digest.update(file.name.encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return f"hub:{commit}"
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return "config:" + hashlib.sha256(text.encode()).hexdigest()[:16]
