"""Stage: the teacher answers prompts; its answers are written as chat records, a shard at a time
(pipeline.generate.output: the layout, resumable by whole shards). `prepare-corpus --source OUT/answers`
(or `--answers OUT`) reads them as any chat corpus: the loss mask covers the teacher's answers.
"""

from __future__ import annotations

import contextlib
import time

import click
from tqdm import tqdm

from pipeline.distributed import Claims, Counter, broadcast, gather, init, on_main, run_on_main, shutdown
from pipeline.errors import require, say_to_stderr
from pipeline.corpus.chat import read_chat_template
from pipeline.generate.answers import answer_shard, generation_tokenizer, rendered_prompts, shard_count, teacher_context
from pipeline.generate.identity import answers_identity, teacher_fingerprint, tokenizer_fingerprint
from pipeline.generate.output import ANSWERS, check_output, open_output, write_off, write_part
from pipeline.generate.prompts import prompts_fingerprint, read_prompts
from pipeline.io import storage
from pipeline.io.locks import check_lease, writer_lock
from pipeline.io.outputs import check_not_an_input, full_disk_named
from pipeline.io.storage import Location, display
from pipeline.model_source import check_model_source
from pipeline.models.devices import resolve_dtype
from pipeline.models.load import load_causal_lm, resolve_teacher
from pipeline.settings.generate import GenerateConfig

NO_PROMPTS = "no prompts: give --prompts (JSONL, parquet or a `datasets` directory) or set generate.prompts"
NO_TEACHER = ("no teacher to answer: give --teacher (an HF dir or hub id) or set generate.teacher; in dvc.yaml a "
              "pretrained one (the pipeline's own teacher is trained on the corpus the answers make)")


def main(out: Location, cfg: GenerateConfig, overwrite: bool = False, progress: bool = True,
         stop_after: int | None = None, off_without_prompts: bool = False, restart_on_mismatch: bool = False) -> None:
    """Answer every prompt of cfg.prompts with cfg.teacher (`stop_after`: at most that many shards per
    process now, for tests). Under torchrun every process loads the teacher and claims shards until
    none is left; rank 0 takes the writer lock, checks the output and prints the summary.
    The same answers (pipeline.generate.identity) resume; `overwrite` starts over, `restart_on_mismatch`
    starts over only when OUT holds other answers (else they are refused).
    `off_without_prompts` (the DVC stage): with no prompts set, write only a note that generate is off."""
    if cfg.prompts is None and off_without_prompts:
        with writer_lock(out):
            write_off(out)
        click.echo(f"generate: off (generate.prompts is null): {display(out)} says so; prepare-corpus prepares "
                   "prepare_corpus.source")
        return
    require(cfg.prompts is not None, NO_PROMPTS)
    require(cfg.teacher is not None, NO_TEACHER)
    process, device = init(cfg.device)
    with contextlib.ExitStack() as held:
        held.callback(shutdown)
        _generate(process, device, held, out, cfg, overwrite, restart_on_mismatch, progress, stop_after)


def _generate(process, device, held, out, cfg, overwrite, restart_on_mismatch, progress, stop_after) -> None:
    run_on_main(process, lambda: check_not_an_input(out, {"--prompts": cfg.prompts, "--teacher": cfg.teacher}))
    prompts = read_prompts(cfg.prompts, cfg.text_field)
    template_text = None if cfg.chat_template is None else read_chat_template(cfg.chat_template, "--chat-template")
    source = resolve_teacher(cfg.teacher)  # a train-teacher dir of a pretrained model: that model
    check_model_source(source, "--teacher")
    lease = run_on_main(process, lambda: held.enter_context(writer_lock(out)))  # before the teacher loads
    held.enter_context(full_disk_named(out))  # a full disk: one line naming it, once per job
    token = broadcast(process, None if lease is None else lease.token)  # object storage: checked before each part
    tokenizer = generation_tokenizer(source, template_text)
    # every prompt renders and fits the teacher's context with its answer, before any work (one line if not)
    on_main(process, lambda: rendered_prompts(tokenizer, prompts, cfg.max_new_tokens, teacher_context(source)))
    # what the answers are, by content (rank 0 hashes the weights once), checked before the teacher loads
    wanted = on_main(process, lambda: answers_identity(teacher_fingerprint(source), prompts_fingerprint(prompts),
                                                       tokenizer.chat_template, tokenizer_fingerprint(tokenizer), cfg,
                                                       device.type))
    opening = on_main(process, lambda: check_output(out, wanted, overwrite, restart_on_mismatch))
    model = load_causal_lm(source, device, resolve_dtype(cfg.dtype, device), role="--teacher")
    if opening.reason and process.is_main:
        say_to_stderr(f"generate: {opening.reason}")
    shards = shard_count(len(prompts), cfg.prompts_per_shard)
    # rank 0's view of what is left, for every rank (a rank looking later could see a part just written)
    done = on_main(process, lambda: open_output(out, opening, wanted, shards))
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
                                              cfg, device, {"fingerprint": wanted["teacher"]}, advance)
            truncated += sum(r["truncated"] for r in records)
            check_lease(out, token)  # a writer whose lease was taken over stops before its next part
            write_part(out, shard, [r for r in records if cfg.keep_truncated or not r["truncated"]])
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
    click.echo(f"generate: {len(prompts):,} prompts x {cfg.n} = {len(prompts) * cfg.n:,} answers; {written} shard{'s' * (written != 1)} "
               f"written now ({tokens:,} tokens, ~{rate:,.0f} tok/s on {len(runs)} x {device.type}), "
               f"{len(done)} already there" + (f", {left} left" if left else "")
               + f"; {truncated} truncated at max_new_tokens {cfg.max_new_tokens} "
               + ("(kept, marked)" if cfg.keep_truncated else "(dropped)")
               + f" -> {display(storage.child(out, ANSWERS))}")


def _answers_in(shard: int, prompts: int, cfg: GenerateConfig) -> int:
    return (min(prompts, (shard + 1) * cfg.prompts_per_shard) - shard * cfg.prompts_per_shard) * cfg.n
