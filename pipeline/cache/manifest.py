"""A cache's manifest: a small local JSON file that stands for a cache living elsewhere (an object
store), for DVC to track instead of the remote directory.

It holds where the cache lives, its identity and its content digest (of every shard's checksums),
and nothing run-specific, so an identical recapture writes an identical manifest. Commands that read
a cache accept the manifest in its place and refuse a cache that no longer matches it.

It is an output like any other (`check_manifest_output`): never an input of the capture nor inside
the cache, and it replaces only a manifest (its own `kind`), whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import zarr

from pipeline.cache.format import CHECKSUMS, CHUNK_CHECKSUMS, DONE, identity_digest
from pipeline.errors import UserError, require
from pipeline.io.outputs import check_not_an_input, write_json
from pipeline.io.locks import output_location
from pipeline.io.storage import Location, display, locate

KIND = "logit-cache manifest"


def content_digest(group: zarr.Group) -> str:
    """A digest of which shards are complete and the checksums of their objects and of their chunks (a
    whole object's crc32c cannot tell two contents of the same chunk lengths apart: its chunks' can)."""
    digest = hashlib.sha256()
    digest.update(group[DONE][:].tobytes())
    digest.update(group[CHECKSUMS][:].tobytes())
    digest.update(group[CHUNK_CHECKSUMS][:].tobytes())
    return digest.hexdigest()[:32]


def describe(group: zarr.Group, where: Location) -> dict[str, Any]:
    attrs = dict(group.attrs)
    done = group[DONE][:]
    return {"kind": KIND, "location": display(where), "identity_digest": identity_digest(attrs),
            "content_digest": content_digest(group), "shards_complete": int(done.sum()), "shards_total": int(done.size),
            "identity": {key: attrs[key] for key in sorted(attrs) if key not in ("codecs",)}}


def write_manifest(path: Path, group: zarr.Group, where: Location) -> None:
    """Write (or replace, whole) the manifest at `path`: at what a symbolic link `path` points to, which
    the writer lock is about (`output_location`), not over the link."""
    write_json(output_location(path), describe(group, where))


def names_a_manifest(where: Location) -> bool:
    """Whether a cache location is given as a manifest file (a local .json file) rather than the cache."""
    return isinstance(where, Path) and where.suffix == ".json" and where.is_file()


def is_manifest(where: Location) -> bool:
    """Whether `where` is a manifest this tool wrote: a local JSON file of its `kind`."""
    if not names_a_manifest(where):
        return False
    try:
        found = json.loads(Path(where).read_text("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(found, dict) and found.get("kind") == KIND


def check_manifest_output(manifest: Path, cache: Location, inputs: dict[str, Location | None]) -> None:
    """Refuse a --manifest that is (or lies inside) an input, lies inside the cache it describes, or is
    an existing path that is not a manifest this tool wrote (a corpus's tokenizer.json, a teacher's
    config.json, a directory): never written into. Touches nothing."""
    check_not_an_input(manifest, inputs, "--manifest")
    target, cache_at = output_location(manifest), output_location(cache)
    require(isinstance(cache_at, str) or not target.is_relative_to(cache_at),
            f"--manifest {manifest} lies inside --out {display(cache)}, the cache it describes; choose a path outside it")
    require(not target.exists() or is_manifest(target),
            f"--manifest {manifest} exists and is not a logit-cache manifest (written by `pipeline cache-logits "
            "--manifest`): it is never overwritten; choose another path")


def follow(where: Location) -> tuple[Location, dict[str, Any] | None]:
    """(the cache's location, the manifest) for a manifest file; (where, None) for a cache itself."""
    where = locate(where)
    if not names_a_manifest(where):
        return where, None
    try:
        manifest = json.loads(where.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{where}: not a readable manifest (invalid JSON)") from None
    require(isinstance(manifest, dict) and manifest.get("kind") == KIND and "location" in manifest,
            f"{where}: not a logit-cache manifest (written by `pipeline cache-logits --manifest`)")
    return locate(manifest["location"]), manifest


def check(group: zarr.Group, manifest: dict[str, Any] | None, manifest_path: Location) -> None:
    """The cache is still the one the manifest describes."""
    if manifest is None:
        return
    now = describe(group, manifest["location"])
    require(now["identity_digest"] == manifest["identity_digest"],
            f"{manifest['location']} is no longer the cache {manifest_path} describes (another teacher, corpus or "
            "settings); rerun `pipeline cache-logits` to bring the manifest up to date")
    require(now["content_digest"] == manifest["content_digest"],
            f"{manifest['location']} has changed since {manifest_path} was written (shards rewritten or repaired); "
            "rerun `pipeline cache-logits` to bring the manifest up to date")
