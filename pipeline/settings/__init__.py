"""The typed, frozen settings of each stage: one module per stage, torch-free.

These dataclasses are the one source of every setting. Each field is declared once, on its line: its
type (a `Literal` for a choice), its default and its help, `name: type = setting(default, "help")`;
the command's options follow from them (`pipeline X --help` shows every field with its help and
default, see `field_help`), params.yaml repeats the defaults (a test checks that it does) and each
stage's logic imports its own. They import nothing heavy, so the CLI builds its help from them
without loading torch, and each DVC stage depends on exactly its own settings module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DEVICES = ("auto", "cpu", "cuda")


def setting(default: Any, help: str) -> Any:
    """A settings field: its default and its help, declared together. The help is data (the field's
    metadata), so `--help` needs no source files, only the classes."""
    return dataclasses.field(default=default, metadata={"help": help})


def field_help(cls: type) -> dict[str, str]:
    """field name -> its help, as declared with `setting` ("" for a field declared without one)."""
    return {field.name: field.metadata.get("help", "") for field in dataclasses.fields(cls)}
