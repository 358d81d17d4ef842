"""Creating, opening and regrowing a cache (one Zarr v3 group, written in whole shards).

Creation is marked: the group's attributes say `logit_cache_creating` until every array exists, and
only then are they replaced by the identity (with `format_version`). So a crash during creation
leaves something this tool recognises as its own unfinished work, which the next run replaces.
What the group's attributes hold is the cache's content identity only; when, where and how fast it
was written lives in the `provenance` sub-group, which DVC does not hash (.dvcignore).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.cache.format import (COMPUTE_KEYS, CREATING, DONE, FORMAT_VERSION, GROWABLE_KEYS, PROVENANCE,
                                   ROW_DIGESTS, TOKENIZER, CacheSpec, codecs, array_layout, bookkeeping_layout,
                                   identity_differences, shard_row_digest)
from pipeline.cache.integrity import provenance_problems, repair_in_place, stored_shards, tokenizer_problems
from pipeline.errors import UserError, require, say_to_stderr
from pipeline.io import storage
from pipeline.io.locks import writer_holding
from pipeline.io.storage import Location, display

def create_cache(path: Location, spec: CacheSpec, tokenizer_json: str) -> zarr.Group:
    """Create an empty cache (no shard complete) with all arrays, attributes and the tokenizer.

    `path` must not hold anything that is not this tool's (the caller checks)."""
    group = storage.open_group(path, mode="w", zarr_format=3, attributes={CREATING: True})
    checked = [Crc32cCodec()]
    write_tokenizer(group, tokenizer_json)
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


def write_tokenizer(group: zarr.Group, tokenizer_json: str) -> None:
    """The tokenizer travels inside the cache, so a student needs nothing else (written anew when there)."""
    encoded = np.frombuffer(tokenizer_json.encode("utf-8"), dtype=np.uint8)
    group.create_array(TOKENIZER, data=encoded, chunks=(max(1, encoded.size),), overwrite=True,
                       compressors=[BloscCodec(cname="zstd", clevel=5), Crc32cCodec()])


def restore_tokenizer(group: zarr.Group, tokenizer_json: str, fingerprint: str, say=say_to_stderr) -> None:
    """Rewrite the stored tokenizer from the corpus's when it is damaged or not the cache's (`fingerprint`,
    which the corpus's has: a resume is of the same tokenizer), so `verify` can name this as its fix."""
    problems = tokenizer_problems(group, fingerprint)
    if problems:
        say(f"{problems[0]}: rewriting it from the corpus's tokenizer")
        write_tokenizer(group, tokenizer_json)


def restore_provenance(group: zarr.Group, spec: CacheSpec, say=say_to_stderr) -> None:
    """Reset an unreadable provenance group (the capture history, no data) before a run records itself in it."""
    problems = provenance_problems(group, [])
    if problems:
        say(f"{problems[0]}: starting the history anew")
        repair_in_place(group, spec, problems)


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


@dataclass(frozen=True)
class Found:
    """What lies at a cache's location, as far as opening it needs to know (see `look`)."""

    state: str  # vacant | foreign (not this tool's) | creating (a creation that died) | cache
    attrs: dict[str, Any] = field(default_factory=dict)
    done: np.ndarray | None = None  # (old n_shards,) bool: complete shards (read only when a regrow may follow)
    recorded: np.ndarray | None = None  # (old n_shards,) uint64: the corpus row digest each shard recorded


@dataclass(frozen=True)
class Opening:
    """What to do with a cache's location, and why (said to the user, or raised for `refuse`)."""

    action: str  # create | recreate (remove, then create) | resume | regrow | refuse
    reason: str = ""
    keep: np.ndarray | None = None  # regrow: (old n_shards,) bool, the complete shards kept as they are


def look(path: Location, spec: CacheSpec, growing: bool) -> Found:
    """Read what `decide_opening` needs: the attributes, and (when the corpus may have grown: `growing`
    and only its fingerprint and size differ) which shards are complete and the rows they recorded."""
    if storage.is_vacant(path):
        return Found("vacant")
    if not made_by_this_tool(path):
        return Found("foreign")
    attrs = _attrs(path) or {}
    if "format_version" not in attrs:
        return Found("creating", attrs)
    differs = {key for key, *_ in identity_differences(attrs, spec)}
    if growing and differs and differs <= set(GROWABLE_KEYS):
        group = storage.open_group(path, mode="r")
        return Found("cache", attrs, complete_shards(group), group[ROW_DIGESTS][:])
    return Found("cache", attrs)


def decide_opening(found: Found, spec: CacheSpec, row_digests: np.ndarray | None, shown: str, overwrite: bool = False,
                   restart_on_mismatch: bool = False, force_compute: bool = False) -> Opening:
    """Create, resume, regrow, start over or refuse: a pure function of what is there (`found`), what is
    asked (`spec`, and the corpus split's `row_digests` when it may have grown) and the flags.

    Only something this tool made is ever replaced: a cache (with --overwrite, or with
    restart_on_mismatch when another capture made it), an unfinished creation, or an empty directory.
    A cache that differs only in the teacher's dtype or device kind is resumed with `force_compute`
    (keeping the identity it was created with). A cache of a corpus that grew (or otherwise changed)
    keeps each complete shard whose rows are the same (`regrow`); a complete *full* shard whose rows
    changed means another corpus, not a grown one."""
    if found.state == "vacant":
        return Opening("create")
    if found.state == "foreign":
        return Opening("refuse", f"{shown} exists and is not a logit cache (or its zarr.json is damaged); refusing to replace it "
                                 "(choose another --out or remove it yourself)")
    if found.state == "creating":
        return Opening("recreate", f"{shown}: an earlier capture died while creating the cache; creating it again")
    if overwrite:
        return Opening("recreate")
    differs = identity_differences(found.attrs, spec)
    if not differs:
        return Opening("resume")
    keys = {key for key, *_ in differs}
    listed = "; ".join(f"{key}: cache has {theirs!r}, this run has {ours!r}" for key, theirs, ours in differs)
    first = "{}: cache has {!r}, this run has {!r}".format(*differs[0]) + ("; ..." if len(differs) > 1 else "")
    restart = Opening("recreate", f"{shown} was made by another capture ({first}): starting over")
    if keys <= set(GROWABLE_KEYS) and row_digests is not None:
        keep, changed = kept_shards(found, spec, row_digests)
        if not changed:
            return Opening("regrow", f"{shown}: the corpus now has {spec.n_sequences} sequences (was "
                                     f"{found.attrs['n_sequences']}); keeping {int(keep.sum())} complete shards, "
                                     f"capturing {spec.n_shards - int(keep.sum())}", keep)
        if restart_on_mismatch:
            return Opening("recreate", f"{shown} was captured from other corpus rows (shard {changed[0]} differs): "
                                       "starting over")
        return Opening("refuse", f"{shown} was captured from other corpus rows ({len(changed)} complete shards "
                                 f"differ, the first is shard {changed[0]}): not a grown corpus; use --overwrite to "
                                 "start over or choose another --out")
    if keys <= set(COMPUTE_KEYS):
        if force_compute:
            return Opening("resume", f"{shown}: resuming with another teacher dtype or device as forced ({listed}); "
                                     "the shards written now may differ from the others in their low bits")
        if not restart_on_mismatch:
            return Opening("refuse", f"{shown} was captured with another teacher dtype or device ({listed}): "
                                     "resuming would mix shards that differ in their low bits; use the same "
                                     "--dtype/--device, --force to resume anyway, or --overwrite to start over")
    if restart_on_mismatch:
        return restart
    return Opening("refuse", f"{shown} was made by another capture ({listed}); use --overwrite to start over or "
                             "choose another --out")


def kept_shards(found: Found, spec: CacheSpec, row_digests: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """(which complete shards of the old cache a regrow keeps (old n_shards,) bool, the complete full
    shards whose rows changed): a shard is kept when its recorded row digest is the corpus's now, over
    the same rows. Shards past the end of a corpus that shrank are dropped, not compared."""
    old = CacheSpec.from_attrs(found.attrs)
    keep = np.zeros(len(found.done), bool)
    changed = []
    for shard in np.flatnonzero(found.done[: spec.n_shards]):
        lo, hi = old.shard_rows(int(shard))
        same_rows = hi <= len(row_digests) and shard_row_digest(row_digests[lo:hi]) == int(found.recorded[shard])
        keep[shard] = same_rows and spec.shard_rows(int(shard)) == (lo, hi)
        if not same_rows and hi - lo == old.sequences_per_shard:
            changed.append(int(shard))
    return keep, changed


def open_or_create(path: Location, spec: CacheSpec, tokenizer_json: str, overwrite: bool = False,
                   restart_on_mismatch: bool = False, say=say_to_stderr, force_compute: bool = False,
                   row_digests: np.ndarray | None = None) -> zarr.Group:
    """Carry out `decide_opening` (call with the writer lock held): the cache to write into, or a
    UserError leaving `path` untouched."""
    found = look(path, spec, row_digests is not None)
    opening = decide_opening(found, spec, row_digests, display(path), overwrite, restart_on_mismatch, force_compute)
    if opening.action == "refuse":
        raise UserError(opening.reason)
    if opening.reason:
        say(opening.reason)
    if opening.action == "resume":
        open_cache(path, tokenizer=False)  # every array there, readable: damage is one line, before any work
        group = storage.open_group(path, mode="r+")
    elif opening.action == "regrow":
        group = storage.open_group(path, mode="r+")
        regrow(group, spec, found.done, opening.keep)
    else:
        if opening.action == "recreate":
            storage.remove(path)
        return create_cache(path, spec, tokenizer_json)
    # what a resume can rewrite from the corpus, or start anew: the stored tokenizer, the history
    restore_tokenizer(group, tokenizer_json, spec.tokenizer_fingerprint, say)
    restore_provenance(group, spec, say)
    return group


def regrow(group: zarr.Group, spec: CacheSpec, done: np.ndarray, keep: np.ndarray) -> None:
    """Fit a cache to a corpus that grew or changed: mark the complete shards not kept incomplete,
    resize every array to the new number of sequences, then record the new identity. Each step can be
    repeated, so a capture killed half-way through this simply does it again."""
    for shard in np.flatnonzero(done & ~keep):
        group[DONE][int(shard)] = 0  # first: a crash from here on leaves these incomplete
    shapes = {name: shape for name, (shape, *_) in {**array_layout(spec), **bookkeeping_layout(spec)}.items()}
    for name, shape in shapes.items():
        group[name].resize(shape)
    group.attrs.update({key: getattr(spec, key) for key in GROWABLE_KEYS})


def open_cache(where: Location, tokenizer: bool = True) -> zarr.Group:
    """Open an existing cache for reading, checking that it is one, of a known format, with every array
    (the stored tokenizer's metadata too, unless not `tokenizer`: a capture resuming rewrites it)."""
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
    try:
        if tokenizer:
            group[TOKENIZER]
    except Exception:
        raise UserError(f"{path}: array {TOKENIZER} is missing or its zarr.json is unreadable; the cache is "
                        "damaged: rerun `pipeline cache-logits` with the same settings (it rewrites it from the "
                        "corpus)") from None
    return group


def complete_shards(group: zarr.Group) -> np.ndarray:
    """(n_shards,) bool: which shards were fully written: those whose flag has an object (a flag set back
    to 0 has none), from one listing, whatever the number of shards."""
    return stored_shards(group, DONE)


def require_complete(group: zarr.Group, path: Location) -> None:
    done = complete_shards(group)
    if done.all():
        return
    holder = writer_holding(path)
    missing = f"{display(path)}: {int((~done).sum())} of {done.size} shards are not written yet"
    require(holder is None, f"{missing}: a capture is running ({holder}); wait for it to finish")
    raise UserError(f"{missing}; re-run `pipeline cache-logits` to finish the capture")


def disk_bytes(path: Location) -> int:
    """Bytes of the cache's content (the provenance record excluded), on disk or in the object store."""
    return storage.total_bytes(path, skip=PROVENANCE)


def cache_tokenizer(group: zarr.Group):
    """The tokenizer (a `tokenizers.Tokenizer`) stored in the cache."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(group[TOKENIZER][:].tobytes().decode("utf-8"))
    except Exception:  # a checksum mismatch, or bytes that are not a tokenizer
        raise UserError("the cache's tokenizer_json is corrupted; rerun `pipeline cache-logits` with the same settings "
                        "(it rewrites it from the corpus)") from None
