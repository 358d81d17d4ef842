"""Stage: the teacher answers prompts; its answers are written as chat records, a shard at a time.

OUT/generate.json records what the answers are (the teacher's identity, the prompts' fingerprint, the
settings); OUT/answers/part-NNNNN.jsonl holds a shard's answers, written whole (a temporary name,
then renamed), so a killed run resumes at the first shard not written and a shard is never half
there. `prepare-corpus --source OUT/answers` reads them as any chat corpus (the loss mask covers the
teacher's answers).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import click
import torch
from tqdm import tqdm

from pipeline.config import as_dict
from pipeline.distributed import Claims, Counter, gather, init, on_main, run_on_main, shutdown
from pipeline.errors import UserError, require
from pipeline.generate.answers import answer_shard, chat_tokenizer, shard_count
from pipeline.generate.prompts import prompts_fingerprint, read_prompts
from pipeline.io import storage
from pipeline.io.locks import writer_lock
from pipeline.io.outputs import check_not_an_input
from pipeline.io.storage import Location, display
from pipeline.model_source import check_model_source
from pipeline.models import load_causal_lm, resolve_dtype, resolve_teacher, weights_fingerprint
from pipeline.settings.generate import GenerateConfig

MANIFEST = "generate.json"
ANSWERS = "answers"


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.jsonl"


def identity(teacher_id: dict, prompts: str, cfg: GenerateConfig, device: torch.device) -> dict:
    """What the answers are a function of: a rerun with the same identity resumes, another is refused.
    Not how many processes write them (each shard's answers depend on the shard alone), but the kind
    of device: sampling on another one gives other answers."""
    settings = {k: v for k, v in as_dict(cfg).items() if k not in ("device", "processes")}
    return {"teacher": teacher_id, "prompts": prompts, "settings": settings, "device_type": device.type}


def main(teacher: str, prompts_source: str, out: Location, cfg: GenerateConfig, overwrite: bool = False,
         progress: bool = True, stop_after: int | None = None) -> None:
    """Answer every prompt of `prompts_source` (`stop_after`: at most that many shards per process now,
    for tests). Under torchrun every process loads the teacher and claims shards until none is left;
    rank 0 takes the writer lock, checks the output and prints the summary."""
    process, device = init(cfg.device)
    with contextlib.ExitStack() as held:
        held.callback(shutdown)
        _generate(process, device, held, teacher, prompts_source, out, cfg, overwrite, progress, stop_after)


def _generate(process, device, held, teacher, prompts_source, out, cfg, overwrite, progress, stop_after) -> None:
    check_not_an_input(out, {"--prompts": prompts_source, "--teacher": teacher})
    prompts = read_prompts(prompts_source, cfg.text_field)
    template_text = None
    if cfg.chat_template is not None:
        require(Path(cfg.chat_template).is_file(), f"--chat-template {cfg.chat_template}: no such file")
        template_text = Path(cfg.chat_template).read_text()
    check_model_source(teacher, "--teacher")
    run_on_main(process, lambda: held.enter_context(writer_lock(out)))  # before the teacher loads
    source = resolve_teacher(teacher)
    tokenizer = chat_tokenizer(source, template_text)
    model = load_causal_lm(source, device, resolve_dtype(cfg.dtype, device), role="--teacher")
    teacher_id = {"source": teacher, "fingerprint": on_main(process, lambda: weights_fingerprint(source, model))}
    wanted = identity(teacher_id, prompts_fingerprint(prompts), cfg, device)
    shards = shard_count(len(prompts), cfg.prompts_per_shard)
    # rank 0's view of what is left, for every rank (a rank looking later could see a part just written)
    done = on_main(process, lambda: _open_output(out, wanted, overwrite, shards))
    todo = [s for s in range(shards) if s not in done]
    already = sum(_answers_in(s, len(prompts), cfg) for s in done)
    bar = tqdm(total=len(prompts) * cfg.n, initial=already, desc="generate", unit="answer",
               disable=not (progress and process.is_main))
    job_answers, job_tokens = Counter("generate-answers"), Counter("generate-tokens")
    start, tokens, truncated, written = time.monotonic(), 0, 0, 0

    def advance(answers: int, new_tokens: int) -> None:  # after each batch: the whole job's answers and tok/s
        bar.update(already + job_answers.add(answers) - bar.n)
        bar.set_postfix(tok_s=f"{job_tokens.add(new_tokens) / max(time.monotonic() - start, 1e-9):.0f}")

    with bar:
        for item in Claims("generate-shards", len(todo)):
            if stop_after is not None and written >= stop_after:
                break
            shard = todo[item]
            lo = shard * cfg.prompts_per_shard
            records, generated = answer_shard(model, tokenizer, prompts[lo : lo + cfg.prompts_per_shard], lo, shard,
                                              cfg, device, teacher_id, advance)
            truncated += sum(r["truncated"] for r in records)
            _write_part(out, shard, [r for r in records if cfg.keep_truncated or not r["truncated"]])
            tokens, written = tokens + generated, written + 1
    seconds = time.monotonic() - start
    runs = gather(process, {"shards": written, "tokens": tokens, "truncated": truncated, "seconds": seconds})
    if not process.is_main:
        return
    written, tokens, truncated = (sum(r[key] for r in runs) for key in ("shards", "tokens", "truncated"))
    left = shards - len(done) - written
    if not written and not left:
        click.echo(f"generate: {display(storage.child(out, ANSWERS))} is already complete ({len(prompts) * cfg.n:,} "
                   f"answers in {shards} shards): nothing to generate")
        return
    rate = sum(r["tokens"] / max(r["seconds"], 1e-9) for r in runs)
    click.echo(f"generate: {len(prompts):,} prompts x {cfg.n} = {len(prompts) * cfg.n:,} answers; {written} shards "
               f"written now ({tokens:,} tokens, ~{rate:,.0f} tok/s on {len(runs)} x {device.type}), "
               f"{len(done)} already there" + (f", {left} left" if left else "")
               + f"; {truncated} truncated at max_new_tokens {cfg.max_new_tokens} "
               + ("(kept, marked)" if cfg.keep_truncated else "(dropped)")
               + f" -> {display(storage.child(out, ANSWERS))}")


def _open_output(out: Location, wanted: dict, overwrite: bool, shards: int) -> list[int]:
    """Rank 0, the lock held: check (or start over, or create) the output; the shards already written."""
    manifest = storage.child(out, MANIFEST)
    if storage.exists(manifest):
        found = json.loads(storage.read_text(manifest))
        if found.get("identity") != wanted:
            require(overwrite, f"{display(out)} holds answers of another teacher, prompts or settings: use "
                               "--overwrite to start over, or choose another --out")
            storage.remove(storage.child(out, ANSWERS))
    elif not storage.is_vacant(out):
        raise UserError(f"{display(out)} exists and holds no answers of `pipeline generate`; choose another --out")
    _write(manifest, json.dumps({"identity": wanted}, indent=1).encode())
    return [s for s in range(shards) if storage.exists(storage.child(out, ANSWERS, part_name(s)))]


def _answers_in(shard: int, prompts: int, cfg: GenerateConfig) -> int:
    return (min(prompts, (shard + 1) * cfg.prompts_per_shard) - shard * cfg.prompts_per_shard) * cfg.n


def _write_part(out: Location, shard: int, records: list[dict]) -> None:
    """The shard's records, whole: written under a temporary name, then renamed."""
    temporary = _write(storage.child(out, ANSWERS, part_name(shard) + ".partial"),
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    fs, _ = storage.filesystem(str(out))
    fs.mv(temporary, storage.filesystem(str(storage.child(out, ANSWERS, part_name(shard))))[1])


def _write(where: Location, data: bytes) -> str:
    """`data` at `where` (a path or a URL), its folder made where needed; the path inside its filesystem."""
    fs, path = storage.filesystem(str(where))
    if "/" in path:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)
    return path
