"""What `pipeline generate` writes, and how prepare-corpus finds the answers in it (torch-free).

    OUT/generate.json                 {"identity": what the answers are a function of, "shards": N}
                                      or {"off": why} (the DVC stage with no prompts set)
    OUT/answers/part-NNNNN.jsonl      one shard's chat records, written whole (.partial, then renamed)

A killed run resumes at the shards not written; a shard is never half there.
"""

from __future__ import annotations

import json

from pipeline.errors import UserError, require
from pipeline.io import storage
from pipeline.io.storage import Location, display

MANIFEST = "generate.json"
ANSWERS = "answers"
OFF = "generate.prompts is null: prepare-corpus prepares prepare_corpus.source"


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.jsonl"


def written_shards(out: Location, shards: int) -> list[int]:
    return [s for s in range(shards) if storage.exists(storage.child(out, ANSWERS, part_name(s)))]


def open_output(out: Location, identity: dict, shards: int, overwrite: bool) -> list[int]:
    """Check (or start over, or create) the output for answers with this identity; the shards already
    written. Another identity is refused unless `overwrite` (then the old answers are removed)."""
    manifest = storage.child(out, MANIFEST)
    if storage.exists(manifest):
        found = json.loads(storage.read_text(manifest))
        if found.get("identity") != identity:
            require(overwrite or "off" in found, f"{display(out)} holds answers of another teacher, prompts or "
                                                 "settings: use --overwrite to start over, or choose another --out")
            _remove_answers(out)
    elif not storage.is_vacant(out):
        raise UserError(f"{display(out)} exists and holds no answers of `pipeline generate`; choose another --out")
    write_file(manifest, json.dumps({"identity": identity, "shards": shards}, indent=1).encode())
    return written_shards(out, shards)


def write_off(out: Location) -> None:
    """The DVC stage with generate switched off: no answers, a note saying so (the old answers removed)."""
    manifest = storage.child(out, MANIFEST)
    require(storage.is_vacant(out) or storage.exists(manifest),
            f"{display(out)} exists and holds no answers of `pipeline generate`; choose another --out")
    _remove_answers(out)
    write_file(manifest, json.dumps({"off": OFF}, indent=1).encode())


def _remove_answers(out: Location) -> None:
    if storage.exists(storage.child(out, ANSWERS)):
        storage.remove(storage.child(out, ANSWERS))


def write_part(out: Location, shard: int, records: list[dict]) -> None:
    """The shard's records, whole: written under a temporary name, then renamed."""
    temporary = write_file(storage.child(out, ANSWERS, part_name(shard) + ".partial"),
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    fs, _ = storage.filesystem(str(out))
    fs.mv(temporary, storage.filesystem(str(storage.child(out, ANSWERS, part_name(shard))))[1])


def write_file(where: Location, data: bytes) -> str:
    """`data` at `where` (a path or a URL), its folder made where needed; the path inside its filesystem."""
    fs, path = storage.filesystem(str(where))
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)
    return path


def answers_source(out: Location) -> str | None:
    """The answers of a finished `pipeline generate` OUT, as a corpus source; None when it was off."""
    manifest = storage.child(out, MANIFEST)
    require(storage.exists(manifest), f"--answers {display(out)}: not an output of `pipeline generate` (no {MANIFEST})")
    found = json.loads(storage.read_text(manifest))
    if "off" in found:
        return None
    written = len(written_shards(out, found["shards"]))
    require(written == found["shards"], f"--answers {display(out)}: the answers are incomplete ({written} of "
                                        f"{found['shards']} shards): run `pipeline generate` again to finish them")
    return str(storage.child(out, ANSWERS))
