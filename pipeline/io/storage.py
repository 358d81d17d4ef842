"""Where a cache or corpus lives: a local path, or a URL of any fsspec store (s3://, gs://, az://, ...).

A location is a `Path` (local) or a `str` URL. Everything that reads or writes a cache or a corpus
goes through here, so the rest of the code does not care which it is.

Reaching a store is the store's business: credentials and endpoint come from its own environment
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`,
...) or config files. The one thing this tool adds is a JSON object of fsspec storage options
(`--storage-options`, or the LOGIT_CACHE_STORAGE_OPTIONS environment variable, which the CLI sets so
that torchrun and DataLoader workers see the same). Options are never written anywhere, and a URL
is shown without any user:password part.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Union

import zarr

from pipeline.errors import UserError, require

OPTIONS_ENV = "LOGIT_CACHE_STORAGE_OPTIONS"
Location = Union[Path, str]  # a local path, or a URL string
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(where: Location | None) -> bool:
    return isinstance(where, str) and bool(_URL.match(where)) and not where.startswith("file://")


def locate(where: Location) -> Location:
    """A URL stays a string (without a trailing slash); anything else is a local Path."""
    if is_url(str(where)):
        return str(where).rstrip("/")
    return Path(str(where).removeprefix("file://"))


def display(where: Location) -> str:
    """How a location is shown and recorded: a URL loses any user:password@ part."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", str(where))


def options() -> dict[str, Any]:
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"storage options ({OPTIONS_ENV} / --storage-options) are not valid JSON") from None
    require(isinstance(parsed, dict), "storage options must be a JSON object, e.g. '{\"endpoint_url\": \"http://...\"}'")
    return parsed


def set_options(raw: str | None) -> None:
    """Use these storage options in this process and every process it starts."""
    if raw is not None:
        previous = os.environ.get(OPTIONS_ENV)
        os.environ[OPTIONS_ENV] = raw
        try:
            options()  # refuse bad JSON now, in one line
        except UserError:
            os.environ.pop(OPTIONS_ENV) if previous is None else os.environ.update({OPTIONS_ENV: previous})
            raise


def child(where: Location, *names: str) -> Location:
    where = locate(where)
    return "/".join([where, *names]) if isinstance(where, str) else where.joinpath(*names)


def parent_and_name(where: Location) -> tuple[Location, str]:
    where = locate(where)
    if isinstance(where, str):
        head, _, name = where.rpartition("/")
        return head, name
    return where.parent, where.name


def _denied(where: Location, error: Exception) -> UserError:
    return UserError(f"{display(where)}: access denied ({error}); check the store's credentials (its own environment "
                     "or config, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and permissions")


def _store_call(function):
    """Name the location in a refusal by the store (bad or missing credentials, no permission)."""

    @functools.wraps(function)
    def wrapper(where, *args, **kwargs):
        try:
            return function(where, *args, **kwargs)
        except PermissionError as error:
            if not is_url(str(where)):
                raise
            raise _denied(where, error) from None

    return wrapper


def filesystem(where: str):
    """(fsspec filesystem, path inside it) for a URL, with listings re-read (another process may have written)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(where, **options())
    except (ImportError, ValueError) as error:  # an unknown protocol, or its package is not installed
        raise UserError(f"{display(where)}: cannot open this kind of store ({error})") from None
    fs.invalidate_cache()
    return fs, path


@_store_call
def open_group(where: Location, mode: str, **kwargs: Any) -> zarr.Group:
    """zarr.open_group on a path or URL (mode "r", "r+", "a" or "w")."""
    where = locate(where)
    if isinstance(where, str):
        kwargs["storage_options"] = options()
    return zarr.open_group(where, mode=mode, **kwargs)


@_store_call
def exists(where: Location) -> bool:
    where = locate(where)
    if isinstance(where, Path):
        return where.exists()
    fs, path = filesystem(where)
    return fs.exists(path)


@_store_call
def is_vacant(where: Location) -> bool:
    """Nothing there, or an empty directory (an object store has no empty directories)."""
    where = locate(where)
    if isinstance(where, Path):
        return not where.exists() or (where.is_dir() and not any(where.iterdir()))
    fs, path = filesystem(where)
    return not fs.exists(path)


@_store_call
def is_file(where: Location) -> bool:
    where = locate(where)
    if isinstance(where, Path):
        return where.is_file()
    fs, path = filesystem(where)
    return fs.isfile(path)


@_store_call
def remove(where: Location) -> None:
    where = locate(where)
    if isinstance(where, Path):
        shutil.rmtree(where) if where.is_dir() else where.unlink()
        return
    fs, path = filesystem(where)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@_store_call
def read_text(where: Location) -> str:
    where = locate(where)
    if isinstance(where, Path):
        return where.read_text("utf-8")
    fs, path = filesystem(where)
    return fs.cat_file(path).decode("utf-8")


@_store_call
def total_bytes(where: Location, skip: str | None = None) -> int:
    """Bytes of every file under `where`, leaving out those under a sub-directory named `skip`."""
    where = locate(where)
    if isinstance(where, Path):
        files = ((f.relative_to(where).parts, f.stat().st_size) for f in where.rglob("*") if f.is_file())
    else:
        fs, path = filesystem(where)
        files = ((name[len(path):].strip("/").split("/"), info["size"])
                 for name, info in fs.find(path, detail=True).items())
    return sum(size for parts, size in files if skip not in parts)


def upload(local_dir: Path, where: str) -> None:
    """Copy a finished local directory to `where` (which the caller has checked may be replaced)."""
    fs, path = filesystem(where)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.put(f"{local_dir}/", path, recursive=True)


@_store_call
def create_exclusive(where: str, data: bytes) -> bool:
    """Create an object only if none exists (an atomic If-None-Match PUT); False when one does."""
    fs, path = filesystem(where)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as error:
        if "pre-condition" in str(error) or "PreconditionFailed" in str(error):
            return False
        raise
    except TypeError:  # a filesystem without exclusive create: exists-then-put, not atomic
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
    return True


@_store_call
def write_bytes(where: str, data: bytes) -> None:
    fs, path = filesystem(where)
    fs.pipe_file(path, data)


@_store_call
def modified_age_s(where: str) -> float | None:
    """Seconds since the object was last written (None if there is none)."""
    import datetime

    fs, path = filesystem(where)
    try:
        modified = fs.modified(path)
    except FileNotFoundError:
        return None
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=datetime.timezone.utc)
    return (datetime.datetime.now(datetime.timezone.utc) - modified).total_seconds()
