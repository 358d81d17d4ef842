"""What the teacher's answers are a function of, by content: a rerun with the same identity resumes,
another is refused (or starts over), and a refusal names the parts that differ
(pipeline.generate.output compares them).

    teacher      the teacher's weights and config (`weights_fingerprint`, the cache's teacher identity)
    prompts      the prompts as read (`prompts_fingerprint`)
    template     the chat template's text: the teacher's own or --chat-template's
    tokenizer    the teacher's tokenizer files, without the chat template (its own part)
    settings     every setting the answers depend on (not how the run is spread, not file names)
    device_type  sampling on another kind of device gives other answers (CPU, or one GPU model and stack)

How a path is spelled (`data/teacher`, `./data/teacher`, an absolute path, a pretrained-teacher
pointer) never enters: only what is read from it. Torch-free (the teacher's fingerprint imports the
models' identity only when it is computed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.config import as_dict
from pipeline.errors import UserError
from pipeline.settings.generate import GenerateConfig

# settings that name a file whose content the identity holds instead (the template's text; the
# prompts the text field picks out): renaming or moving the file changes no answer
NAMED_BY_CONTENT = ("chat_template", "text_field")

# the files a Hugging Face tokenizer is read from (whichever of them a teacher has); the chat template
# (chat_template.jinja / .json, tokenizer_config.json's `chat_template`) is left out: it is the
# identity's `template`, so an edited template is named as such
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def answers_identity(teacher: str, prompts: str, template: str | dict | None, tokenizer: str, cfg: GenerateConfig,
                     device_type: str) -> dict:
    """The identity `generate.json` records: fingerprints of what was read, and the settings that decide
    the answers (each shard's answers are a function of the shard alone, so not the process count)."""
    left_out = (*GenerateConfig.RUN_ONLY_SETTINGS, *NAMED_BY_CONTENT)
    settings = {k: v for k, v in as_dict(cfg).items() if k not in left_out}
    return {"teacher": teacher, "prompts": prompts, "template": template_fingerprint(template),
            "tokenizer": tokenizer, "settings": settings, "device_type": device_type}


def template_fingerprint(template: str | dict | None) -> str | None:
    """The chat template by its text (a dict of named templates by all of them)."""
    if template is None:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tokenizer_fingerprint(source: str) -> str:
    """sha256 of the teacher's tokenizer files (a model dir's, or a hub model's in the local cache, where
    loading its tokenizer put them), JSON files by their parsed content, without the chat template."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = _tokenizer_file(source, name)
        if path is None:
            continue
        digest.update(name.encode() + b"\0")
        if name.endswith(".json"):
            content = json.loads(path.read_text(encoding="utf-8"))
            if name == "tokenizer_config.json" and isinstance(content, dict):
                content.pop("chat_template", None)
            digest.update(json.dumps(content, sort_keys=True).encode())
        else:
            digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _tokenizer_file(source: str, name: str) -> Path | None:
    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, name)
    return Path(found) if isinstance(found, str) else None


def teacher_fingerprint(source: str) -> str:
    """The teacher's `weights_fingerprint` (the cache's teacher identity) before its weights load: it
    needs a model dir's files and config.json, or a hub model's commit, which its config carries."""
    from transformers import AutoConfig

    from pipeline.models.identity import weights_fingerprint

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as error:  # OSError, ValueError (an unknown model type), JSON errors
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot load a causal LM's config from {source!r}: {first_line}") from None
    return weights_fingerprint(source, config)

