"""Stage: run the teacher once over the corpus and write its top-k targets to a Zarr cache.

One process, or many under torchrun (`torchrun --nproc-per-node N -m pipeline cache-logits ...`):
every process loads the teacher and runs the same checks; rank 0 alone takes the writer lock and
creates (or validates) the cache; then every process claims shards until none is left; rank 0
records the run and prints one summary with each process's throughput.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

import click
import numpy as np
import torch

from pipeline.cache.inspect import cache_stats
from pipeline.cache.manifest import check_manifest_output, write_manifest
from pipeline.cache.provenance import record_run, utc_now
from pipeline.cache.store import open_or_create
from pipeline.capture.shards import capture
from pipeline.capture.spec import capture_spec
from pipeline.corpus.token_store import SplitRows, corpus_tokenizer_json, open_token_store
from pipeline.distributed import gather, init, on_main, run_on_main, shutdown
from pipeline.errors import require
from pipeline.io.locks import check_lease, writer_lock
from pipeline.io.outputs import check_not_an_input, full_disk_named
from pipeline.io.storage import Location, display, open_group
from pipeline.models.devices import resolve_dtype
from pipeline.models.head import HEAD_CHECK_POSITIONS, check_head
from pipeline.models.identity import weights_fingerprint
from pipeline.models.load import load_causal_lm, output_device, resolve_teacher
from pipeline.settings.cache import CacheConfig

RERUN = "the complete shards are kept, and the same command captures the others"


def main(teacher: str, corpus: Location, out: Location, cfg: CacheConfig, overwrite: bool = False, progress: bool = True,
         restart_on_mismatch: bool = False, force: bool = False, manifest: Path | None = None) -> None:
    process, device = init(cfg.device, whole_node=cfg.device_map is not None)
    with contextlib.ExitStack() as held:
        held.callback(shutdown)
        held.enter_context(full_disk_named(out, manifest, rerun=RERUN))
        _capture(process, device, held, teacher, corpus, out, cfg, overwrite, progress, restart_on_mismatch, force,
                 manifest)


def _capture(process, device, held, teacher, corpus, out, cfg, overwrite, progress, restart_on_mismatch, force,
             manifest) -> None:
    require(cfg.device_map is None or process.local_world_size == 1,
            f"device_map {cfg.device_map} spreads the teacher over every GPU of a node: start one process per node "
            f"(torchrun --nproc-per-node 1 --nnodes M), not {process.local_world_size}")
    inputs = {"--corpus": corpus, "--teacher": teacher}
    run_on_main(process, lambda: check_not_an_input(out, inputs))  # one line, said by rank 0
    if manifest is not None:  # an output too: never an input, nor inside the cache; replaced only when it is one
        run_on_main(process, lambda: check_manifest_output(manifest, out, inputs))
    store = open_token_store(corpus)
    attrs = store.attrs
    rows = SplitRows(store, cfg.split, display(corpus)).first(cfg.max_sequences)  # each read checked against its digest
    # rank 0 takes the writer locks (the cache's, the manifest's) before the teacher loads (minutes, for a big
    # one) and holds them to the end
    if manifest is not None:
        run_on_main(process, lambda: held.enter_context(writer_lock(manifest)))
    lease = run_on_main(process, lambda: held.enter_context(writer_lock(out)))
    source = resolve_teacher(teacher)
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_causal_lm(source, device, dtype, cfg.device_map, role="--teacher")
    input_device = device  # where the ids go in (with device_map: the first layer's)
    device = output_device(model) if cfg.device_map else device  # where the logits come out
    fingerprint = on_main(process, lambda: weights_fingerprint(source, model.config))  # every weight file hashed once per job
    # the teacher's vocabulary and tokenizer against the corpus's, then its head against its own logits
    spec = capture_spec(cfg, attrs, len(rows), model, source, fingerprint, dtype, device, chat=rows.mask is not None)
    if len(rows):  # the capture's sliced head must give the model's own logits (a family's unknown transform is refused)
        first = torch.from_numpy(rows.rows(0, 1)[0][:, :HEAD_CHECK_POSITIONS].astype(np.int64)).to(input_device)
        check_head(model, first, "the teacher", "the capture")
    elif process.is_main:
        click.echo(f"cache-logits: the corpus's {cfg.split} split is empty (validation_fraction 0): writing an empty "
                   "cache, which train-student --eval-cache skips", err=True)
    tokenizer_json = corpus_tokenizer_json(corpus, attrs["tokenizer_fingerprint"])  # checked before it is embedded
    started, run_id = utc_now(), uuid.uuid4().hex[:12]  # the run's entry in the provenance, at its start and end

    def create() -> int | None:  # rank 0 only, the lock held
        open_or_create(out, spec, tokenizer_json, overwrite, restart_on_mismatch,
                       say=lambda line: click.echo(line, err=True), force_compute=force, row_digests=rows.digests)
        return None if lease is None else lease.token

    token = on_main(process, create)  # the lease's fencing token (object storage), checked before each shard
    running = {"id": run_id, "started": started, "status": "running", "device": device.type, "dtype": spec.teacher_dtype,
               "processes": process.world_size}
    on_main(process, lambda: record_run(out, teacher, running))  # a run that dies stays in the history
    group = open_group(out, mode="r+")
    start = time.monotonic()
    written = capture(model, rows, group, spec, cfg.batch_size, device, progress=progress, process=process,
                      fence=lambda: check_lease(out, token))
    seconds = time.monotonic() - start
    tokens = sum(hi - lo for lo, hi in map(spec.shard_rows, written)) * spec.seq_len
    runs = gather(process, {"rank": process.rank, "device": str(device), "shards_written": len(written),
                            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / max(seconds, 1e-9))})
    if not process.is_main:
        return
    check_lease(out, token)  # the run's record and the manifest only while this writer still holds the lease
    stats = cache_stats(group, out)
    if manifest is not None and stats["shards_complete"] == stats["shards_total"]:
        write_manifest(manifest, group, out)
    job_tokens_per_s = sum(r["tokens_per_s"] for r in runs)
    record_run(out, teacher, {**running, "status": "finished", "device_map": cfg.device_map, "processes": len(runs),
                              "shards_written": sum(r["shards_written"] for r in runs), "seconds": round(seconds, 3),
                              "tokens_per_s": job_tokens_per_s, "per_process": runs})
    if not sum(r["shards_written"] for r in runs) and stats["shards_complete"] == stats["shards_total"]:
        click.echo(f"cache-logits: {display(out)} is already complete ({stats['shards_total']} shards, "
                   f"{stats['tokens']:,} tokens): nothing to capture")
        return
    per_process = "" if len(runs) == 1 else " [" + ", ".join(
        f"rank {r['rank']}: {r['shards_written']} shards, {r['tokens_per_s']:,} tok/s" for r in runs) + "]"
    click.echo(
        f"cache-logits: {stats['tokens']:,} tokens ({sum(r['shards_written'] for r in runs)} shards written now, "
        f"~{job_tokens_per_s:,.0f} tok/s on {len(runs)} x {device.type}{per_process}); "
        f"{stats['bytes_on_disk']:,} bytes, {stats['bytes_per_token']:.1f} B/token, "
        f"{stats['ratio_to_dense_fp16']:.0f}x smaller than dense fp16; "
        f"mean captured top-{spec.k} mass {stats['captured_mass_mean']:.4f} -> {display(out)}"
    )
