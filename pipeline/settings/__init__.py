"""The typed, frozen settings of each stage: one module per stage, torch-free.

These dataclasses are the one source of every setting. Each field is declared once: its type (a
`Literal` for a choice), its default, and its help as the comment beside it; the command's options
follow from them (`pipeline X --help` shows every field with its help and default, see
`field_help`), params.yaml repeats the defaults (a test checks that it does) and each stage's logic
imports its own. They import nothing heavy, so the CLI builds its help from them without loading
torch, and each DVC stage depends on exactly its own settings module.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import sys
import tokenize

DEVICES = ("auto", "cpu", "cuda")


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """field name -> its help: the comment on the field's line, and the comment lines right under it."""
    source = inspect.getsource(sys.modules[cls.__module__])
    lines = source.splitlines()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    body = next(node for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ClassDef) and node.name == cls.__name__).body
    helps = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line, parts = node.end_lineno, []
            while line in comments and (not parts or lines[line - 1].lstrip().startswith("#")):
                parts.append(comments[line])
                line += 1
            helps[node.target.id] = " ".join(parts)
    return helps
