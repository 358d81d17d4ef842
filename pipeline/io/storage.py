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

import contextlib
import email.utils
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


# the protocols that can hold a cache, a corpus or an output: object stores, shared, persistent, listable and
# writable object by object (s3fs; gcsfs; adlfs; ossfs, ocifs, tosfs), each usable where its package is installed
STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "oci", "ocilake", "tos", "tosfs")
# why the usual others cannot (any other protocol: "is not a store this tool supports")
NOT_A_STORE = {
    "memory": "lives inside one process and is gone when the command ends",
    "zip": "is an archive, not a store of separate objects",
    "tar": "is an archive, not a store of separate objects",
    "libarchive": "is an archive, not a store of separate objects",
    "http": "is read-only (fsspec can neither write nor reliably list over plain HTTP)",
    "https": "is read-only (fsspec can neither write nor reliably list over plain HTTP)",
    "hdfs": "is not supported (untested here; its client needs a JVM and libhdfs)",
    "arrow_hdfs": "is not supported (untested here; its client needs a JVM and libhdfs)",
    "webhdfs": "is not supported (untested here)",
}
_CHAINED = re.compile(r"^[a-zA-Z][a-zA-Z0-9+._-]*::")  # fsspec's "simplecache::s3://...": a layer in front of a store


def output_problem(where: str) -> str | None:
    """Why `where` cannot hold an output of this tool (a cache, a corpus, a model, reports, ...), or None: a
    local path, or a URL of an object store in STORES. Decided from the text alone, before any filesystem
    is made (the hdfs client alone prints pages of JVM noise). Inputs are not held to this: a source may
    be any URL fsspec reads (hf://, https://, zip://...)."""
    hint = "use a local path or an object store URL (s3://, gs://, az://, ...)"
    if _CHAINED.match(where):
        return (f"{display(where)}: a chained URL ({where.split('::', 1)[0]}::...) writes to a local copy in front "
                f"of the store, not to the store itself; {hint}")
    if not is_url(where):
        return None
    protocol = where.split("://", 1)[0].lower()
    if protocol in STORES:
        return None
    return f"{display(where)}: {protocol}:// {NOT_A_STORE.get(protocol, 'is not a store this tool supports')}; {hint}"


def locate(where: Location, output: bool = False) -> Location:
    """A URL stays a string (without a trailing slash); anything else is a local Path. With `output`
    (where something is to be written), a location that cannot hold it (`output_problem`) is refused in
    one line."""
    problem = output_problem(str(where)) if output else None
    require(problem is None, problem or "")
    if is_url(str(where)):
        return str(where).rstrip("/")
    return Path(str(where).removeprefix("file://"))


def display(where: Location) -> str:
    """How a location is shown and recorded: a URL loses any user:password@ part."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", str(where))


SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN")
SECRET_OPTIONS = ("secret", "token", "password", "session_token", "account_key", "sas_token", "key")


def redact(text: str) -> str:
    """`text` (an error from a store, say) without any credential: no `user:password@` part anywhere (a
    URL, or a bucket name made of one), no value of a secret variable or storage option."""
    text = re.sub(r"[^\s/@'\"]+:[^\s/@'\"]*@", "", text)
    try:
        given = options()
    except UserError:
        given = {}
    secrets = [os.environ.get(name, "") for name in SECRET_ENV] + [str(v) for k, v in given.items() if k in SECRET_OPTIONS]
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


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


def _s3(where: str):
    """(filesystem, bucket, key) when `where` is in an S3-compatible store (conditional requests), else None."""
    fs, path = filesystem(where)
    if "s3" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return None
    bucket, key, _ = fs.split_path(path)
    return fs, bucket, key


def _error_code(error: Exception) -> str:
    """The S3 error code behind an error ("PreconditionFailed", "NoSuchKey", ...): s3fs translates botocore's
    ClientError into an OSError and keeps it as the cause; "" when there is none."""
    response = getattr(error.__cause__, "response", None) or getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _precondition_failed(error: Exception) -> bool:
    """The store refused a conditional write: 412 (the condition does not hold), or 409 (another
    conditional write on the same key was under way and won)."""
    text = str(error)
    return (isinstance(error, FileExistsError) or "pre-condition" in text or "PreconditionFailed" in text
            or _error_code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"))


@_store_call
def read_versioned(where: str) -> tuple[bytes, str, float] | None:
    """(content, version, age in seconds) of an object, None when there is none. In S3 the version is
    the ETag and the age is measured in the store's own clock (the response's Date minus the object's
    Last-Modified), never against this machine's; elsewhere (no conditional requests) the
    modification time and the local clock stand in."""
    import datetime

    from fsspec.asyn import sync

    s3 = _s3(where)
    if s3 is None:
        fs, path = filesystem(where)
        try:
            content, info = fs.cat_file(path), fs.info(path)
        except FileNotFoundError:
            return None
        modified = fs.modified(path)
        modified = modified if modified.tzinfo else modified.replace(tzinfo=datetime.timezone.utc)
        age = (datetime.datetime.now(datetime.timezone.utc) - modified).total_seconds()
        return content, str(info.get("ETag") or info.get("generation") or modified.isoformat()), age
    fs, bucket, key = s3

    async def get():
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        async with response["Body"] as body:
            content = await body.read()
        sent = response["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = email.utils.parsedate_to_datetime(sent) if sent else response["LastModified"]
        return content, response["ETag"], (now - response["LastModified"]).total_seconds()

    return sync(fs.loop, get)


@_store_call
def write_if(where: str, data: bytes, version: str | None) -> str | None:
    """Write the object only if it is still at `version` (None: only if there is none): its new version,
    or None when it is not (another writer got there first).

    In S3 this is one conditional PUT (If-Match: version, or If-None-Match: *), so of two writers with
    the same `version` exactly one wins, provided the store enforces the condition (see
    `enforces_conditional_writes`). Elsewhere (fsspec's gcs, azure, ...: no conditional requests here)
    it reads, compares, then writes: two writers that read at the same moment can both write, the
    last one's content stays and both are told they won; nothing keeps them apart there."""
    from fsspec.asyn import sync

    s3 = _s3(where)
    if s3 is None:
        found = read_versioned(where)
        if (found is None) != (version is None) or (found is not None and found[1] != version):
            return None
        fs, path = filesystem(where)
        fs.pipe_file(path, data)
        return read_versioned(where)[1]
    fs, bucket, key = s3
    condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
    try:
        response = sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except (OSError, ValueError) as error:
        # an If-Match on an object that is gone (a store may answer 404): it is not at `version` either
        if _precondition_failed(error) or (version is not None and _error_code(error) == "NoSuchKey"):
            return None
        raise
    return response["ETag"]


# an If-Match no object's ETag can equal (an ETag is a quoted hex digest, with a -N suffix for multipart)
NO_SUCH_VERSION = '"logit-cache-probe-no-object-has-this-version"'


@_store_call
def enforces_conditional_writes(probe: str) -> bool | None:
    """Whether the store refuses a write whose If-Match names a version the object does not have, on an
    object that exists (what a renewal or a takeover of the lease sends): `probe` (an object of the
    caller's own, never one holding data) is written, written again with an If-Match no ETag can equal,
    and removed: three requests. True: the second write was refused (412). False: the store wrote it,
    ignoring the condition, or answered that it does not implement it. None: not an S3-compatible
    store, where `write_if` sends no condition at all (it checks, then writes)."""
    from fsspec.asyn import sync

    s3 = _s3(probe)
    if s3 is None:
        return None
    fs, bucket, key = s3
    sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=b"probe")
    try:
        sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=b"probe again", IfMatch=NO_SUCH_VERSION)
        enforced = False
    except (OSError, ValueError) as error:
        if not (_precondition_failed(error) or _error_code(error) == "NotImplemented"):
            raise
        enforced = _precondition_failed(error)
    finally:
        with contextlib.suppress(OSError):  # a probe left behind matters less than the answer
            sync(fs.loop, fs._call_s3, "delete_object", Bucket=bucket, Key=key)
    return enforced


@_store_call
def write_bytes(where: str, data: bytes) -> None:
    fs, path = filesystem(where)
    fs.pipe_file(path, data)
