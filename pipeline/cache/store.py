"""Creating, opening and regrowing a cache (one Zarr v3 group, written in whole shards).

Creation is marked: the group's attributes say `logit_cache_creating` until every array exists, and
only then are they replaced by the identity (with `format_version`). So a crash during creation
leaves something this tool recognises as its own unfinished work, which the next run replaces.
What the group's attributes hold is the cache's content identity only; when, where and how fast it
was written lives in the `provenance` sub-group, which DVC does not hash (.dvcignore).
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.cache.format import (COMPUTE_KEYS, CREATING, DONE, FORMAT_VERSION, GROWABLE_KEYS, PROVENANCE,
                                   ROW_DIGESTS, TOKENIZER, CacheSpec, codecs, array_layout, bookkeeping_layout,
                                   identity_differences, shard_row_digest)
from pipeline.errors import UserError, require
from pipeline.io import storage
from pipeline.io.storage import Location, display

def create_cache(path: Location, spec: CacheSpec, tokenizer_json: str) -> zarr.Group:
    """Create an empty cache (no shard complete) with all arrays, attributes and the tokenizer.

    `path` must not hold anything that is not this tool's (the caller checks)."""
    group = storage.open_group(path, mode="w", zarr_format=3, attributes={CREATING: True})
    checked = [Crc32cCodec()]
    # The tokenizer travels inside the cache, so a student needs nothing else.
    encoded = np.frombuffer(tokenizer_json.encode("utf-8"), dtype=np.uint8)
    group.create_array(TOKENIZER, data=encoded, chunks=(max(1, encoded.size),),
                       compressors=[BloscCodec(cname="zstd", clevel=5), *checked])
    layout = array_layout(spec)
    for name, (shape, dtype, kind) in layout.items():
        chunk = (spec.sequences_per_chunk, *shape[1:])
        shard = (spec.sequences_per_shard, *shape[1:])
        with warnings.catch_warnings():  # "numcodecs codecs are not in the v3 spec": zarr-python reads them
            warnings.simplefilter("ignore")
            group.create_array(name, shape=shape, dtype=dtype, chunks=chunk, shards=shard, fill_value=0,
                               **codecs(kind, dtype))
    # One object per shard's flag and checksum row, so each writer sets its own without touching another's.
    for name, (shape, dtype) in bookkeeping_layout(spec).items():
        group.create_array(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]), fill_value=0, compressors=checked)
    codec_names = {name: str(group[name].metadata.to_dict().get("codecs")) for name in layout}
    # Written last: from here on the directory is a cache (format_version present).
    group.attrs.put({**spec.identity(), "eos_id": spec.eos_id, "codecs": codec_names, "shard_arrays": list(layout)})
    return group


def _attrs(path: Location) -> dict[str, Any] | None:
    try:
        return dict(storage.open_group(path, mode="r").attrs)
    except Exception:  # not a Zarr group, unreadable or corrupt metadata
        return None


def is_cache(path: Location) -> bool:
    return "format_version" in (_attrs(path) or {})


def made_by_this_tool(path: Location) -> bool:
    """A complete cache, or one whose creation was interrupted: safe for this tool to replace."""
    attrs = _attrs(path) or {}
    return "format_version" in attrs or attrs.get(CREATING) is True


def open_or_create(path: Location, spec: CacheSpec, tokenizer_json: str, overwrite: bool = False,
                   restart_on_mismatch: bool = False, say=print, force_compute: bool = False,
                   row_digests: np.ndarray | None = None) -> zarr.Group:
    """Resume into a matching cache, create a new one, or refuse (leaving `path` untouched).

    Only something this tool made is ever replaced: a cache (with --overwrite, or with
    restart_on_mismatch when it was made by another capture), an unfinished creation, or an empty
    directory. With `force_compute` a cache that differs only in the teacher's dtype or device kind
    is resumed (its identity keeps the values it was created with). A cache of a corpus that grew
    (or otherwise changed) is resized and keeps each complete shard whose rows are unchanged
    (`row_digests`: the corpus split's, see `regrow`). Call with the writer lock held.
    """
    shown = display(path)
    if not storage.is_vacant(path):
        require(made_by_this_tool(path), f"{shown} exists and is not a logit cache; refusing to replace it "
                                         "(choose another --out or remove it yourself)")
        attrs = _attrs(path)
        if "format_version" not in attrs:
            say(f"{shown}: an earlier capture died while creating the cache; creating it again")
        elif not overwrite:
            differs = identity_differences(attrs, spec)
            grown = [line for line in differs if line.split(":")[0] in GROWABLE_KEYS]
            if grown and row_digests is not None and len(grown) == len(differs):
                group = storage.open_group(path, mode="r+")
                if regrow(group, spec, attrs, row_digests, restart_on_mismatch, shown, say):
                    return group
                storage.remove(path)
                return create_cache(path, spec, tokenizer_json)
            compute_only = bool(differs) and all(line.split(":")[0] in COMPUTE_KEYS for line in differs)
            if compute_only and force_compute:
                say(f"{shown}: resuming with another teacher dtype or device as forced ({'; '.join(differs)}); "
                    "the shards written now may differ from the others in their low bits")
            if not differs or (compute_only and force_compute):
                return storage.open_group(path, mode="r+")
            if compute_only and not restart_on_mismatch:
                raise UserError(f"{shown} was captured with another teacher dtype or device ({'; '.join(differs)}): "
                                "resuming would mix shards that differ in their low bits; use the same --dtype/--device, "
                                "--force to resume anyway, or --overwrite to start over")
            if not restart_on_mismatch:
                raise UserError(f"{shown} was made by another capture ({'; '.join(differs)}); "
                                "use --overwrite to start over or choose another --out")
            say(f"{shown} was made by another capture ({differs[0]}{'; ...' if len(differs) > 1 else ''}): starting over")
        storage.remove(path)
    return create_cache(path, spec, tokenizer_json)


def regrow(group: zarr.Group, spec: CacheSpec, attrs: dict[str, Any], row_digests: np.ndarray,
           restart_on_mismatch: bool, shown: str, say) -> bool:
    """Fit a cache to a corpus that grew or changed: keep each complete shard whose corpus rows are
    the same (recorded shard row digest == the corpus's now, over the same rows), mark the others
    incomplete, resize every array to the new number of sequences, then record the new identity.

    Each step can be repeated, so a capture killed half-way through this simply does it again. A
    complete *full* shard whose rows changed means another corpus, not a grown one: refused (False
    returned with restart_on_mismatch: the caller starts over)."""
    old = CacheSpec.from_attrs(attrs)
    done = group[DONE][:].astype(bool)
    recorded = group[ROW_DIGESTS][:]
    keep = np.zeros(spec.n_shards, bool)
    changed = []
    for shard in np.flatnonzero(done[: spec.n_shards]):
        lo, hi = old.shard_rows(int(shard))
        same_rows = hi <= len(row_digests) and shard_row_digest(row_digests[lo:hi]) == int(recorded[shard])
        keep[shard] = same_rows and spec.shard_rows(int(shard)) == (lo, hi)
        if not same_rows and hi - lo == old.sequences_per_shard:
            changed.append(int(shard))
    if changed:
        if not restart_on_mismatch:
            raise UserError(f"{shown} was captured from other corpus rows ({len(changed)} complete shards differ, "
                            f"the first is shard {changed[0]}): not a grown corpus; use --overwrite to start over "
                            "or choose another --out")
        say(f"{shown} was captured from other corpus rows (shard {changed[0]} differs): starting over")
        return False
    for shard in np.flatnonzero(done):
        if shard >= spec.n_shards or not keep[shard]:
            group[DONE][int(shard)] = 0  # first: a crash from here on leaves these incomplete
    shapes = {name: shape for name, (shape, *_) in {**array_layout(spec), **bookkeeping_layout(spec)}.items()}
    for name, shape in shapes.items():
        group[name].resize(shape)
    group.attrs.update({key: getattr(spec, key) for key in GROWABLE_KEYS})
    say(f"{shown}: the corpus now has {spec.n_sequences} sequences (was {old.n_sequences}); keeping "
        f"{int(keep.sum())} complete shards, capturing {spec.n_shards - int(keep.sum())}")
    return True


def open_cache(where: Location) -> zarr.Group:
    """Open an existing cache for reading, checking that it is one, of a known format, with every array."""
    path = display(where)
    require(storage.exists(where), f"cache not found: {path}")
    attrs = _attrs(where)
    require(attrs is not None, f"{path} is not a readable Zarr group (corrupt or missing zarr.json)")
    require(attrs.get(CREATING) is not True, f"{path}: the capture died while creating it; re-run `pipeline cache-logits`")
    require("format_version" in attrs, f"{path} is not a logit cache (no format_version attribute)")
    version = attrs["format_version"]
    require(version == FORMAT_VERSION, f"{path}: cache format {version} is not supported (this version reads "
                                       f"{FORMAT_VERSION}); recapture it with `pipeline cache-logits --overwrite`")
    missing = [f.name for f in fields(CacheSpec) if f.name not in attrs]
    require(not missing, f"{path}: attributes missing from the cache's zarr.json: {', '.join(missing)}")
    group = storage.open_group(where, mode="r")
    spec = CacheSpec.from_attrs(attrs)
    expected = {name: (shape, dtype) for name, (shape, dtype, _) in array_layout(spec).items()} | bookkeeping_layout(spec)
    for name, (shape, dtype) in expected.items():
        try:
            array = group[name]
        except Exception:  # KeyError when absent; JSON or metadata errors when zarr.json is damaged
            raise UserError(f"{path}: array {name} is missing or its zarr.json is unreadable; "
                            "the cache is damaged (see `pipeline verify`)") from None
        require(array.shape == shape and array.dtype == dtype,
                f"{path}: array {name} has shape {array.shape} {array.dtype}, expected {shape} {dtype}")
    return group


def complete_shards(group: zarr.Group) -> np.ndarray:
    """(n_shards,) bool: which shards were fully written."""
    return group[DONE][:].astype(bool)


def require_complete(group: zarr.Group, path: Location) -> None:
    done = complete_shards(group)
    require(done.all(), f"{display(path)}: {int((~done).sum())} of {done.size} shards are incomplete; "
                        "re-run `pipeline cache-logits` to finish the capture")


def disk_bytes(path: Location) -> int:
    """Bytes of the cache's content (the provenance record excluded), on disk or in the object store."""
    return storage.total_bytes(path, skip=PROVENANCE)


def cache_tokenizer(group: zarr.Group):
    """The tokenizer (a `tokenizers.Tokenizer`) stored in the cache."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(group[TOKENIZER][:].tobytes().decode("utf-8"))
    except Exception:  # a checksum mismatch, or bytes that are not a tokenizer
        raise UserError("the cache's tokenizer_json is corrupted; recapture with `pipeline cache-logits --overwrite`") from None
