"""Prompts in: records (JSONL lines, parquet or `datasets` rows) with a prompt string (`text_field`) or
`messages` (a trailing assistant turn, an original answer, is left out: the teacher answers instead)."""

from __future__ import annotations

import hashlib
import json

from pipeline.corpus.sources import RECORD_KINDS, list_units, read_records
from pipeline.errors import UserError, require
from pipeline.io import storage


def prompt_messages(record: object, text_field: str) -> tuple[list[dict] | None, str | None]:
    """(the prompt as chat messages, None), or (None, what is wrong with the record)."""
    if not isinstance(record, dict):
        return None, f"expected an object with a string field {text_field!r}, or chat messages"
    if isinstance(record.get("messages"), list):
        messages = record["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in messages):
            return None, "each message must be an object with string fields 'role' and 'content'"
        # role and content first, whatever order the source kept (pyarrow before 15 sorts struct fields)
        messages = [{"role": m["role"], "content": m["content"], **m} for m in messages]
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            return None, "no message before the assistant's: nothing to answer"
        return messages, None
    if isinstance(record.get(text_field), str) and record[text_field].strip():
        return [{"role": "user", "content": record[text_field]}], None
    has = f"it has {', '.join(map(repr, list(record)[:12]))}" if record else "it is empty"
    return None, f"no prompt: no string field {text_field!r} and no `messages` ({has}); set --text-field"


def read_prompts(source: str, text_field: str) -> list[list[dict]]:
    """Every prompt of the source, in order: JSONL, parquet or a `datasets` directory (files, a
    directory, a glob, a URL), as prepare-corpus reads them."""
    skipped: list[str] = []
    units = list_units(source, skipped=skipped)
    if skipped:
        raise UserError(f"--prompts {source}: {len(skipped)} files are not prompts (JSONL, parquet), e.g. {skipped[0]}")
    prompts = []
    for unit in units:
        require(unit.kind in RECORD_KINDS, f"--prompts {storage.display(unit.path)}: prompts are read from JSONL "
                                           "(.jsonl, .jsonl.gz, .jsonl.zst), parquet or a `datasets` directory")
        for record, where in read_records(unit):
            messages, problem = prompt_messages(record, text_field)
            if problem:
                raise UserError(f"{where()}: {problem}")
            prompts.append(messages)
    require(prompts, f"--prompts {source}: no prompt found")
    return prompts


def prompts_fingerprint(prompts: list[list[dict]]) -> str:
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:16]
