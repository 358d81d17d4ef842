"""Where a model comes from: a local directory, or an id on the Hugging Face hub. Checked before
anything is loaded, so a typo is one line at once, and a hub that cannot be reached is one line after
one attempt (not a series of retries)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def source_problem(name_or_path: str, is_dir: bool, is_file: bool, has_config: bool) -> str | None:
    """What is wrong with a model source before it is loaded, or None: an existing directory must hold
    a config.json; anything else must look like a hub id (NAME or ORG/NAME)."""
    if is_dir:
        return None if has_config else "is a directory without config.json (not a saved model)"  # (or `needs`)
    if is_file:
        return "is a file, not a model directory"
    if not HUB_ID.match(name_or_path) or ".." in name_or_path or "--" in name_or_path or name_or_path.endswith("."):
        return "is neither an existing directory nor a hub id (ORG/NAME)"
    return None


def check_model_source(name_or_path: str, role: str, needs: tuple[str, ...] = ("config.json",)) -> None:
    """Refuse, in one line, a source that is neither a model directory (holding one of `needs`: a
    tokenizer's directory holds tokenizer.json or tokenizer_config.json) nor a hub id; for a hub id not
    in the local cache, refuse when offline or when the hub cannot be reached (one attempt)."""
    path = Path(name_or_path)
    problem = source_problem(name_or_path, path.is_dir(), path.is_file(), any((path / n).is_file() for n in needs))
    if problem and path.is_dir():
        problem = f"is a directory without {' or '.join(needs)} (not a saved model)"
    if problem:
        raise UserError(f"{role} {name_or_path} {problem}")
    if path.is_dir() or _in_local_cache(name_or_path):
        return
    if any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in OFFLINE_ENV):
        raise UserError(f"{role} {name_or_path} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                        "download it on a machine with network, or give its local directory")
    if not _hub_reachable():
        raise UserError(f"{role} {name_or_path}: the Hugging Face hub cannot be reached (no network?) and the model "
                        "is not in the local cache: give a local directory, or set HF_HUB_OFFLINE=1 to use the "
                        "cache only")


def _in_local_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return any(isinstance(try_to_load_from_cache(repo_id, name), str)
                   for name in ("config.json", "tokenizer_config.json", "tokenizer.json"))
    except Exception:
        return False


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False
