"""The `pipeline` command. Stage modules (and so torch) are imported inside each command,
so `pipeline --help` answers at once. Each command's settings options are made from its torch-free
settings class (`settings_options`): every field is an option, with the type, choices, default and
help written once next to the field, the same values the stages run with."""

from __future__ import annotations

import errno
import dataclasses
import functools
import os
import re
import types
import typing
import sys
from pathlib import Path

import click

from pipeline.errors import SaidByAnother, UserError, require
from pipeline.settings.cache import CacheConfig
from pipeline.settings.corpus import CorpusConfig
from pipeline.settings.evaluate import EvalConfig
from pipeline.settings.generate import GenerateConfig
from pipeline.settings.student import StudentConfig
from pipeline.settings.teacher import TeacherConfig

PATH = click.Path(path_type=Path)
DEBUG_ENV = "LOGIT_CACHE_DEBUG"  # set to 1 to see the traceback of an unexpected error
STORAGE_ERROR_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google.auth", "google.api_core",
                         "adlfs", "azure")


class LocationType(click.ParamType):
    """A local path or a store URL (s3://bucket/cache.zarr, gs://..., any fsspec protocol)."""

    name = "PATH|URL"

    def convert(self, value, param, ctx):
        from pipeline.io.storage import locate

        return locate(value)


LOCATION = LocationType()


class LocalPathType(click.ParamType):
    """A local path: models, reports and manifests are written to local disk. A URL stays a string,
    which `local_paths` refuses inside the command (as one line, like every user error)."""

    name = "PATH"

    def convert(self, value, param, ctx):
        from pipeline.io.storage import is_url

        return str(value) if is_url(str(value)) else Path(value)


def local_paths(**flags) -> None:
    """Refuse a URL given where only a local path works: local_paths(out=out) names the flag --out."""
    for name, value in flags.items():
        if isinstance(value, str):
            raise UserError(f"--{name} {value}: must be a local path (models, reports and manifests live on "
                            "local disk; caches and corpora may be URLs)")


LOCAL = LocalPathType()


def _is_storage_error(error: Exception) -> bool:
    return any(cls.__module__.startswith(STORAGE_ERROR_MODULES) for cls in type(error).__mro__)


def _os_error_line(error: OSError) -> str:
    where = f": {error.filename}" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        quota = " (disk quota exceeded)" if error.errno == errno.EDQUOT else ""
        return f"no space left on the device{where}{quota}; free space and rerun"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write or read{where} ({error.strerror}); choose another path or fix its permissions"
    return f"{error.strerror or error}{where}"


def user_errors(command):
    """Print a user error, an OS error (full disk, read-only output, ...) or an unexpected error as one
    line on stderr and exit non-zero (2 for the user's mistakes, 1 otherwise), without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SaidByAnother:  # another process of the job prints the same line
            sys.exit(2)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if int(os.environ.get("RANK", 0)) == 0:
                click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as error:
            if os.environ.get(DEBUG_ENV):
                raise
            click.echo(f"error: {_os_error_line(error)}", err=True)
            sys.exit(2)
        except Exception as error:  # a bug or an unforeseen input: one line, the traceback on request
            if os.environ.get(DEBUG_ENV):
                raise
            from pipeline.io.storage import redact

            message = (str(error).strip().splitlines() or [""])[0][:300]
            if _is_storage_error(error):  # no endpoint, no credentials, refused: the store's own words, all of
                # them on one line (botocore puts the reason after "Parameter validation failed:"), no secret
                reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
                hint = (" (a URL's user:password@ part is not read as credentials: set them in the store's "
                        "environment or --storage-options)") if re.search(r"[^\s/@]+:[^\s/@]*@", reason) else ""
                click.echo(f"error: object storage: {redact(reason)[:500]}{hint}", err=True)
                sys.exit(2)
            message = redact(message)
            click.echo(f"error: unexpected {type(error).__name__}: {message} (set {DEBUG_ENV}=1 for the traceback)", err=True)
            sys.exit(1)

    return wrapper


def _set_storage_options(value: str | None) -> None:
    from pipeline.io.storage import set_options

    try:
        set_options(value)
    except UserError as error:
        raise click.BadParameter(str(error), param_hint="--storage-options") from None


def shown_default(value) -> str:
    """A default as `--help` shows it, spelled as in params.yaml: `[default: 64]`, `[default: [1.0]]`,
    `[default: false]`, `[default: null]` (unset)."""
    if isinstance(value, bool) or value is None:
        shown = {True: "true", False: "false", None: "null"}[value]
    else:
        shown = list(value) if isinstance(value, tuple) else value
    return f"[default: {shown}]"


def _field_option(field: dataclasses.Field, hint, help_text: str) -> click.Option:
    """The option of one settings field: `--name-with-dashes`; a bool is a --x/--no-x pair, a tuple a
    repeatable option, a Literal a choice. Unset options stay None (the field's default, or params.yaml's
    value, applies)."""
    flag = "--" + field.name.replace("_", "-")
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    help_text = f"{help_text} {shown_default(field.default)}"
    if hint is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", field.name], default=None, help=help_text)
    if typing.get_origin(hint) is tuple:
        return click.Option([flag, field.name], type=typing.get_args(hint)[0], multiple=True, help=help_text)
    kind = click.Choice(typing.get_args(hint)) if typing.get_origin(hint) is typing.Literal else hint
    return click.Option([flag, field.name], type=kind, default=None, help=help_text)


def settings_options(cls):
    """Add an option for every field of the settings class `cls`, in field order, its help the one
    declared with the field (`setting(default, "help")`)."""
    from pipeline.settings import field_help

    hints, helps = typing.get_type_hints(cls), field_help(cls)

    def decorate(command):
        params = getattr(command, "__click_params__", [])
        params.extend(_field_option(field, hints[field.name], helps[field.name])
                      for field in reversed(dataclasses.fields(cls)))
        command.__click_params__ = params
        return command

    return decorate


def setting_flags(cls, given: dict) -> dict:
    """Pop the settings of `cls` from a command's arguments: those given on the command line."""
    names = [field.name for field in dataclasses.fields(cls)]
    return {name: value for name in names if (value := given.pop(name)) not in (None, ())}


params_option = click.option("--params", "params_path", type=PATH, default=None,
                             help="params file (default: ./params.yaml when present)")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="replace an existing output made by this tool (only once every check has passed)")
progress_option = click.option("--progress/--no-progress", default=True, show_default=True,
                               help="progress bars on stderr")
storage_option = click.option(
    "--storage-options", metavar="JSON", default=None, expose_value=False, envvar="LOGIT_CACHE_STORAGE_OPTIONS",
    callback=lambda ctx, param, value: _set_storage_options(value),
    help="fsspec options for a URL's store, e.g. '{\"endpoint_url\": \"http://host:8333\"}' "
         "(credentials belong in the store's own environment, e.g. AWS_ACCESS_KEY_ID)")


def quiet_third_parties() -> None:
    """The commands' own output only: no progress bars or advisory warnings from transformers and the
    hub (`Loading weights`, `Writing model shards`); the environment can still turn them back on."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # imported already (the public API, tests): tell it directly
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="logit-cache")
def main() -> None:
    """logit-cache: run a teacher once, cache its top-k predictions, distil many students."""
    quiet_third_parties()


def say_params_file(params_path) -> None:
    """Which params file the settings come from, once, at the start."""
    from pipeline.config import DEFAULT_PARAMS

    path = params_path or DEFAULT_PARAMS
    if path.is_file():
        click.echo(f"settings: {path.resolve()} (then the flags given)", err=True)
    else:
        click.echo(f"settings: the defaults (no {path} here) and the flags given", err=True)


def launch_processes(command: str, processes: int) -> int:
    """`processes` > 1 and not under torchrun: run this very command line on that many processes of this
    machine (pipeline.launcher.launch); its exit status."""
    from pipeline.launcher import launch

    argv = sys.argv[1:]
    require(argv[:1] == [command], f"processes={processes} starts this command line on {processes} processes: run it "
                                   "as `pipeline ...` or `python -m pipeline ...` (or under torchrun)")
    return launch(processes, argv)


def stage_command(name: str, cls, section: str, overwrite: bool = True):
    """A command that runs a stage: after its own options, an option for every setting of `cls`, then
    --progress, --params, --overwrite and --storage-options; errors as one line. The command function
    receives `cfg`: the code's defaults, the params file's `section` (and a student `variant`'s), then
    the settings given as flags."""

    def decorate(function):
        @functools.wraps(function)
        def run(params_path, **kwargs):
            from pipeline.config import LAUNCHED_ENV, stage_config

            flags = setting_flags(cls, kwargs)
            cfg = stage_config(cls, section, params_path, flags, kwargs.get("variant"))
            first_to_speak = int(os.environ.get("RANK", 0)) == 0 and not os.environ.get(LAUNCHED_ENV)
            if first_to_speak:
                say_params_file(params_path)
            if getattr(cfg, "processes", 1) > 1 and "LOCAL_RANK" not in os.environ:
                sys.exit(launch_processes(name, cfg.processes))
            return function(cfg=cfg, params_path=params_path, **kwargs)

        own = getattr(function, "__click_params__", [])
        run.__click_params__ = []
        wrapped = user_errors(run)
        for option in (storage_option, *([overwrite_option] if overwrite else []), params_option, progress_option,
                       settings_options(cls)):
            wrapped = option(wrapped)
        wrapped.__click_params__ += own  # displayed first: click lists the last added first
        return main.command(name)(wrapped)

    return decorate


@stage_command("prepare-corpus", CorpusConfig, "prepare_corpus")
@click.option("--out", type=LOCATION, required=True, help="output corpus directory (a path or a URL)")
@click.option("--append", is_flag=True,
              help="keep the rows of an existing --out and add the source's units it does not hold yet "
                   "(when a setting or an old unit changed: prepare everything again, saying why)")
@click.option("--answers", type=LOCATION, default=None,
              help="an output of `pipeline generate`: prepare its answers instead of `source` (when that generate "
                   "was off, `source` still)")
def prepare_corpus(cfg, out, append, answers, progress, params_path, overwrite):
    """Tokenize a corpus, streaming, into train/validation rows (tokens.zarr) plus tokenizer.json: text
    packed into rows, conversations (messages, or prompt/completion) one per row with a loss mask."""
    from stages import prepare_corpus as stage

    stage.main(out, cfg, overwrite, progress, append, answers=answers)


@stage_command("generate", GenerateConfig, "generate")
@click.option("--out", type=LOCATION, required=True, help="output directory: answers/part-NNNNN.jsonl + generate.json")
@click.option("--off-without-prompts", is_flag=True,
              help="the DVC stage: with no prompts set (generate.prompts null), write only a note that generate is "
                   "off (prepare-corpus --answers then prepares prepare_corpus.source)")
@click.option("--restart-on-mismatch", is_flag=True,
              help="start over (instead of refusing) when OUT holds answers of another teacher, prompts, template "
                   "or settings; the same answers resume")
def generate(cfg, out, off_without_prompts, restart_on_mismatch, progress, params_path, overwrite):
    """The teacher answers prompts (sequence-level distillation): chat records with its answers, which
    prepare-corpus reads like any chat corpus; resumable, a shard of answers at a time."""
    from stages import generate as stage

    stage.main(out, cfg, overwrite, progress, off_without_prompts=off_without_prompts,
               restart_on_mismatch=restart_on_mismatch)


@stage_command("train-teacher", TeacherConfig, "train_teacher")
@click.option("--corpus", type=LOCATION, required=True, help="a prepared corpus (a path or a URL)")
@click.option("--out", type=LOCAL, required=True, help="output model directory (save_pretrained)")
def train_teacher(cfg, corpus, out, progress, params_path, overwrite):
    """Train the default teacher (or record the pretrained one named in params)."""
    local_paths(out=out)
    from stages import train_teacher as stage

    stage.main(corpus, out, cfg, overwrite, progress)


@stage_command("cache-logits", CacheConfig, "cache_logits")
@click.option("--teacher", required=True, help="HF model dir or hub id (or a train-teacher output)")
@click.option("--corpus", type=LOCATION, required=True, help="a prepared corpus (a path or a URL)")
@click.option("--out", type=LOCATION, required=True, help="the cache, e.g. data/logits.zarr or s3://bucket/logits.zarr")
@click.option("--restart-on-mismatch", is_flag=True,
              help="start over (instead of refusing) when OUT was made by another teacher, corpus or settings")
@click.option("--manifest", type=LOCAL, default=None,
              help="also write a small local JSON manifest of the finished cache (for DVC when --out is a URL); "
                   "it replaces only a manifest, never an input or another file")
@click.option("--force", is_flag=True,
              help="resume a cache captured with another teacher dtype or device kind (new shards differ in low bits)")
def cache_logits(cfg, teacher, corpus, out, restart_on_mismatch, manifest, force, progress, params_path, overwrite):
    """Run the teacher over the corpus and cache its top-k log-probs (resumable)."""
    local_paths(manifest=manifest)
    from stages import cache_logits as stage

    stage.main(teacher, corpus, out, cfg, overwrite, progress=progress, restart_on_mismatch=restart_on_mismatch,
               force=force, manifest=manifest)


@stage_command("train-student", StudentConfig, "train_student")
@click.option("--cache", type=LOCATION, required=True,
              help="the logit cache written by cache-logits (a path, a URL, or its --manifest file)")
@click.option("--out", type=LOCAL, required=True, help="output model directory (save_pretrained)")
@click.option("--variant", default=None, help="name of a variant under `students:` in params.yaml")
@click.option("--eval-cache", type=LOCATION, default=None,
              help="a cache of the validation split (same teacher): validation loss and KL logged every eval_every steps")
@click.option("--checkpoints", type=LOCAL, default=None,
              help="directory for the resumable checkpoint (default: OUT); outside a DVC output it survives `dvc repro`; "
                   "one writer at a time, and a checkpoint there of another --out is refused, never resumed or removed")
@click.option("--restart-on-mismatch", is_flag=True,
              help="discard a checkpoint of other settings or another cache (with a note) instead of refusing")
def train_student(cfg, cache, out, variant, eval_cache, checkpoints, restart_on_mismatch, progress, params_path,
                  overwrite):
    """Train a student from the cached soft targets (resumes from its checkpoint). Under
    `torchrun --nproc-per-node N -m pipeline train-student ...` every process trains on its part of each
    global batch (N x batch_size x grad_accum sequences)."""
    local_paths(out=out, checkpoints=checkpoints)
    from stages import train_student as stage

    stage.main(cache, out, cfg, overwrite, progress=progress, checkpoints=checkpoints, eval_cache=eval_cache,
               restart_on_mismatch=restart_on_mismatch)


@stage_command("evaluate", EvalConfig, "evaluate", overwrite=False)
@click.option("--teacher", required=True, help="HF model dir or hub id (or a train-teacher output)")
@click.option("--corpus", type=LOCATION, required=True, help="a prepared corpus (a path or a URL)")
@click.option("--students", "students_dir", type=LOCAL, required=True,
              help="a directory of students (every trained one in it is evaluated) or one student's directory")
@click.option("--out", type=LOCAL, required=True, help="reports directory")
def evaluate(cfg, teacher, corpus, students_dir, out, progress, params_path):
    """Evaluate teacher and students on the validation split (metrics.json, report.md, comparison.png,
    training.png)."""
    local_paths(students=students_dir, out=out)
    from stages import evaluate as stage

    stage.main(teacher, corpus, students_dir, out, cfg, progress)


@main.command("inspect")
@click.argument("cache", type=LOCATION)
@click.option("--json", "as_json", is_flag=True, help="print the statistics as JSON")
@storage_option
@user_errors
def inspect(cache, as_json):
    """Describe a cache: metadata, completeness, bytes/token, captured mass."""
    import json

    from pipeline.cache.inspect import describe_cache, format_stats

    stats = describe_cache(cache)
    click.echo(json.dumps(stats, indent=2) if as_json else format_stats(stats))


@main.command("verify")
@click.argument("path", metavar="CACHE_OR_CORPUS", type=LOCATION)
@click.option("--repair", is_flag=True,
              help="(a cache) remove the shards that fail and mark them not written, so `pipeline cache-logits` "
                   "recaptures just those")
@progress_option
@storage_option
@user_errors
def verify(path, repair, progress):
    """Check a cache (every complete shard against its recorded checksums) or a prepared corpus (every
    row against its recorded digest); exit 1 if anything fails. Only `--repair` writes."""
    from pipeline.cache.verify import verify_cache
    from pipeline.corpus.token_store import STORE_NAME
    from pipeline.corpus.verify import verify_corpus
    from pipeline.io import storage

    check = verify_corpus if storage.exists(storage.child(path, STORE_NAME)) else verify_cache
    sys.exit(check(path, repair, progress, echo=click.echo))


if __name__ == "__main__":
    main()
