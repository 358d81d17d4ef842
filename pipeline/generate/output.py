"""What `pipeline generate` writes, and how prepare-corpus finds the answers in it (torch-free).

    OUT/generate.json                 {"identity": what the answers are a function of (by content:
                                      pipeline.generate.identity), "shards": N}
                                      or {"off": why} (the DVC stage with no prompts set)
    OUT/answers/part-NNNNN.jsonl      one shard's chat records, written whole (.partial, then renamed)
    OUT/checksums/part-NNNNN.json     {"sha256", "bytes", "records"} of that part, written before it is renamed
                                      into place: a part is never there without the record of its bytes

A killed run resumes at the shards not written; a shard is never half there. A part whose bytes are not
those recorded (damaged, cut, edited, or of no record) is not written: `generate` answers it again, saying
so, and prepare-corpus refuses the answers naming it. Opening OUT is one pure
decision (`decide_opening`: create, resume, start over or refuse), then its execution (`open_output`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from pipeline.errors import require, say_to_stderr
from pipeline.io import storage
from pipeline.io.storage import Location, display

MANIFEST = "generate.json"
ANSWERS = "answers"
CHECKSUMS = "checksums"
OFF = "generate.prompts is null: prepare-corpus prepares prepare_corpus.source"

# how a refusal names each part that differs: "OUT holds answers of another teacher, other settings (...)"
PART_NAMES = {"teacher": "another teacher (its weights or config)", "prompts": "other prompts",
              "template": "another chat template", "tokenizer": "other tokenizer files", "settings": "other settings",
              "device_type": "another device type"}


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.jsonl"


def checksum_name(shard: int) -> str:
    return f"part-{shard:05d}.json"


def part_record(data: bytes) -> dict:
    """What is recorded of a part's bytes when it is written."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "records": data.count(b"\n")}


def part_problem(out: Location, shard: int) -> str | None:
    """What is wrong with a written part (None: its bytes are those recorded when it was written)."""
    fs, path = storage.filesystem(str(storage.child(out, ANSWERS, part_name(shard))))
    _, record_path = storage.filesystem(str(storage.child(out, CHECKSUMS, checksum_name(shard))))
    try:
        recorded = json.loads(fs.cat_file(record_path))
        assert isinstance(recorded, dict) and {"sha256", "bytes", "records"} <= set(recorded)
    except FileNotFoundError:
        return "no checksum recorded for it"
    except Exception:  # not JSON, or not our record
        return "its checksum record is damaged"
    found = part_record(fs.cat_file(path))
    if found == recorded:
        return None
    if found["bytes"] != recorded["bytes"] or found["records"] != recorded["records"]:
        return (f"{found['records']} records in {found['bytes']} bytes, {recorded['records']} in {recorded['bytes']} "
                "when written")
    return "its bytes differ from those written"


def intact_shards(out: Location, shards: int, say=say_to_stderr) -> list[int]:
    """The written shards (`written_shards`) whose parts are the bytes recorded when they were written;
    each other one is said (it will be answered again)."""
    intact = []
    for shard in written_shards(out, shards):
        problem = part_problem(out, shard)
        if problem is None:
            intact.append(shard)
        else:
            say(f"generate: {display(storage.child(out, ANSWERS, part_name(shard)))} is damaged ({problem}): "
                "answering its prompts again")
    return intact


def written_shards(out: Location, shards: int) -> list[int]:
    """The shards whose answers are written (of 0..shards-1): one listing of OUT/answers, whatever the
    count (a `.partial` is a shard not written)."""
    fs, path = storage.filesystem(str(storage.child(out, ANSWERS)))
    try:
        names = {name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False)}
    except FileNotFoundError:  # no answers yet
        return []
    return [s for s in range(shards) if part_name(s) in names]


def identity_differences(found: dict, wanted: dict) -> list[str]:
    """What differs between a recorded identity and this run's, in words: "another chat template",
    "other settings (seed 7 -> 8)", ... (empty: the same answers)."""
    differences = []
    for key in ("teacher", "prompts", "template", "tokenizer"):
        if found.get(key) != wanted.get(key):
            differences.append(PART_NAMES[key])
    old, new = found.get("settings") or {}, wanted.get("settings") or {}
    changed = [f"{name} {old.get(name)!r} -> {new.get(name)!r}" for name in sorted(set(old) | set(new))
               if old.get(name) != new.get(name)]
    if changed:
        differences.append(f"{PART_NAMES['settings']} ({', '.join(changed)})")
    if found.get("device_type") != wanted.get("device_type"):
        differences.append(f"{PART_NAMES['device_type']} ({found.get('device_type')} -> {wanted.get('device_type')})")
    if not differences and found != wanted:  # recorded by another version of this tool
        differences.append("another version of logit-cache")
    return differences


@dataclass(frozen=True)
class Opening:
    action: Literal["create", "resume", "restart", "refuse"]
    reason: str = ""  # why (restart: said to the user; refuse: the error)


def decide_opening(found: dict | None, vacant: bool, identity: dict, shown: str, overwrite: bool = False,
                   restart_on_mismatch: bool = False) -> Opening:
    """Create, resume, start over or refuse: a pure function of what OUT holds (`found`: its manifest,
    None without one; `vacant`: nothing there), the answers' identity and the flags. Only answers of
    `pipeline generate` are ever removed: with --overwrite (always), or with `restart_on_mismatch`
    (the DVC stage) when they are of another identity."""
    if found is None:
        return Opening("create") if vacant else Opening(
            "refuse", f"{shown} exists and holds no answers of `pipeline generate`; choose another --out")
    if "off" in found:  # the DVC stage switched off: a note, no answers
        return Opening("create")
    if overwrite:
        return Opening("restart", f"{shown}: --overwrite: the answers there are removed, starting over")
    differences = identity_differences(found.get("identity") or {}, identity)
    if not differences:
        return Opening("resume")
    what = f"{shown} holds answers of {', '.join(differences)}"
    if restart_on_mismatch:
        return Opening("restart", f"{what}: starting over")
    return Opening("refuse", f"{what}: use --overwrite to start over, or choose another --out")


def check_output(out: Location, identity: dict, overwrite: bool = False, restart_on_mismatch: bool = False) -> Opening:
    """`decide_opening` on what OUT holds now (call with the writer lock held); a refusal as a UserError,
    nothing touched."""
    opening = decide_opening(read_manifest(out), storage.is_vacant(out), identity, display(out), overwrite,
                             restart_on_mismatch)
    require(opening.action != "refuse", opening.reason)
    return opening


def open_output(out: Location, opening: Opening, identity: dict, shards: int) -> list[int]:
    """Carry out `check_output`'s opening (the lock still held): the shards already written (none when
    it starts over, the old answers removed)."""
    if opening.action in ("create", "restart"):
        _remove_answers(out)
    write_file(storage.child(out, MANIFEST), json.dumps({"identity": identity, "shards": shards}, indent=1).encode())
    return intact_shards(out, shards) if opening.action == "resume" else []


def read_manifest(out: Location) -> dict | None:
    """OUT's generate.json, or None when there is none."""
    manifest = storage.child(out, MANIFEST)
    if not storage.exists(manifest):
        return None
    try:
        found = json.loads(storage.read_text(manifest))
    except ValueError:
        found = None
    require(isinstance(found, dict), f"{display(manifest)} is damaged (not a JSON object): remove {display(out)} "
                                     "yourself, or choose another --out")
    return found


def write_off(out: Location) -> None:
    """The DVC stage with generate switched off: no answers, a note saying so (the old answers removed)."""
    manifest = storage.child(out, MANIFEST)
    require(storage.is_vacant(out) or storage.exists(manifest),
            f"{display(out)} exists and holds no answers of `pipeline generate`; choose another --out")
    _remove_answers(out)
    write_file(manifest, json.dumps({"off": OFF}, indent=1).encode())


def _remove_answers(out: Location) -> None:
    for name in (ANSWERS, CHECKSUMS):
        if storage.exists(storage.child(out, name)):
            storage.remove(storage.child(out, name))


def write_part(out: Location, shard: int, records: list[dict]) -> None:
    """The shard's records, whole: written under a temporary name, the record of its bytes written, then
    renamed into place."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    temporary = write_file(storage.child(out, ANSWERS, part_name(shard) + ".partial"), data)
    write_file(storage.child(out, CHECKSUMS, checksum_name(shard)), json.dumps(part_record(data)).encode())
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
    found = read_manifest(out)
    require(found is not None, f"--answers {display(out)}: not an output of `pipeline generate` (no {MANIFEST})")
    if "off" in found:
        return None
    written = written_shards(out, found["shards"])
    require(len(written) == found["shards"], f"--answers {display(out)}: the answers are incomplete ({len(written)} "
                                             f"of {found['shards']} shards): run `pipeline generate` again to finish them")
    for shard in written:  # what is prepared is what generate wrote
        problem = part_problem(out, shard)
        require(problem is None, f"--answers {display(out)}: {display(storage.child(out, ANSWERS, part_name(shard)))} "
                                 f"is damaged ({problem}): run `pipeline generate` again with the same settings to "
                                 "answer it again")
    return str(storage.child(out, ANSWERS))
