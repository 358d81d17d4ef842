"""What the teacher's answers are a function of, by content: a rerun with the same identity resumes,
another is refused (or starts over), and a refusal names the parts that differ
(pipeline.generate.output compares them).

    teacher      the teacher's weights and config (`weights_fingerprint`, the cache's teacher identity)
    prompts      the prompts as read (`prompts_fingerprint`)
    template     the chat template's text: the teacher's own or --chat-template's
    tokenizer    the teacher's tokenizer as loaded, without the chat template (its own part)
    settings     every setting the answers depend on (not how the run is spread, not file names)
    device_type  sampling on another kind of device gives other answers (CPU, or one GPU model and stack)

How a path is spelled (`data/teacher`, `./data/teacher`, an absolute path, a pretrained-teacher
pointer) never enters: only what is read from it. Torch-free (the teacher's fingerprint imports the
models' identity only when it is computed).
"""

from __future__ import annotations

import hashlib
import json

from pipeline.config import as_dict
from pipeline.errors import UserError
from pipeline.settings.generate import GenerateConfig

# settings that name a file whose content the identity holds instead (the template's text; the
# prompts the text field picks out): renaming or moving the file changes no answer
NAMED_BY_CONTENT = ("chat_template", "text_field")


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


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the teacher's tokenizer as it was loaded, as it tokenizes and decodes: its backend
    (vocabulary, merges, normalizer, pre-tokenizer, decoder, added tokens; a slow tokenizer's
    vocabulary), its special tokens and its settings (clean-up of spaces, ...), without the chat template
    (the identity's own part) or the paths it came from. What was loaded, not which files a local hub
    cache happens to hold."""
    settings = {key: value for key, value in tokenizer.init_kwargs.items()
                if key not in ("chat_template", "name_or_path") and not key.endswith("file")
                and (value is None or isinstance(value, (str, int, float, bool)))}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    text = json.dumps({"settings": settings, "special": tokenizer.special_tokens_map, "backend": content},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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

