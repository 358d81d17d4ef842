"""Fill a logit cache: teacher forward per batch, top-k on the device, one shard written at a time.

Shards are the unit of work and of resumption: a shard's flag is set only after all of its
arrays and their checksums are written, so a rerun after a crash recomputes exactly the shards that
are not flagged. Non-finite teacher outputs are refused before anything of that shard is written.
Writing (compression + disk) runs in a background thread, overlapped with the next shard's forward;
on a GPU the device-to-host copies are asynchronous too (HostCopies), so the host never waits for
the device between batches.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
import zarr
from tqdm import tqdm
from transformers import PreTrainedModel

from pipeline.cache.format import (CHECKSUMS, CHUNK_CHECKSUMS, DONE, LOGPROB_FLOOR, ROW_DIGESTS, CacheSpec,
                                   array_layout, shard_row_digest)
from pipeline.cache.provenance import record_shard, utc_now
from pipeline.cache.store import complete_shards
from pipeline.distributed import Claims, Counter, Process, broadcast
from pipeline.errors import UserError
from pipeline.cache.integrity import remove_shard_objects, shard_records, stored_shards
from pipeline.corpus.loss_mask import learned_positions
from pipeline.corpus.token_store import SplitRows
from pipeline.capture.topk import teacher_topk


class HostCopies:
    """Device -> host copies that do not block the host (GPU): each batch's results are copied into
    one of `slots` reusable pinned buffers behind a CUDA event, and read back only once the *next*
    batch's work is queued, so the GPU never waits for the host. On the CPU: plain numpy views.

    A slot is reused `slots` batches later; its arrays must be consumed (copied out) before that.
    """

    def __init__(self, device: torch.device, slots: int = 2):
        self.device = device
        self.buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(slots)]
        self.turn = 0

    def start(self, tensors: dict[str, torch.Tensor]) -> Callable[[], dict[str, np.ndarray]]:
        """Begin the copy; the returned function waits for it and gives the host arrays."""
        if self.device.type != "cuda":
            arrays = {name: t.numpy() for name, t in tensors.items()}
            return lambda: arrays
        slot = self.buffers[self.turn % len(self.buffers)]
        self.turn += 1
        host = {}
        for name, t in tensors.items():
            if name not in slot or slot[name].numel() < t.numel():
                slot[name] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
            host[name] = slot[name][: t.numel()].view(t.shape)
            host[name].copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def wait() -> dict[str, np.ndarray]:
            done.synchronize()
            return {name: h.numpy() for name, h in host.items()}

        return wait


def refuse_non_finite(finite: np.ndarray, out: dict[str, np.ndarray], lo: int, b: int, first_row: int) -> None:
    """Raise, naming the first bad position, when rows lo..lo+b hold a non-finite teacher output.

    finite (b, T): the positions whose top-k log-probs and tail are finite (checked on the device)."""
    for name in ("log_partition", "tempered_tail_logprob"):
        if name in out:
            finite = finite & np.isfinite(out[name][lo : lo + b]).all(-1)
    if not finite.all():
        row, position = np.argwhere(~finite)[0]
        raise UserError(f"the teacher produced non-finite logits (NaN or inf) at sequence {first_row + lo + row}, "
                        f"position {position}; nothing of that shard was stored. Check the teacher's weights and dtype")


def compute_shard(model: PreTrainedModel, rows: np.ndarray, spec: CacheSpec, batch_size: int,
                  device: torch.device, on_batch=lambda n: None, shard: int = 0,
                  loss_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Teacher targets for one shard of rows (n, T) -> numpy arrays named as in the cache.

    loss_mask (n, T): a chat corpus's (stored beside the ids); unless spec.masked_targets, the
    targets of positions it does not let the student learn from are left at the fill value 0."""
    n, T = rows.shape
    first_row = spec.shard_rows(shard)[0]
    finite = np.empty((n, T), bool)  # checked, not stored
    out = {
        "input_ids": rows,
        "topk_ids": np.empty((n, T, spec.k), spec.id_dtype),
        "topk_logprobs": np.empty((n, T, spec.k), np.float32),
        "tail_logprob": np.empty((n, T), np.float32),
    }
    if spec.extra_temperatures:
        out["log_partition"] = np.empty((n, T, len(spec.extra_temperatures)), np.float32)
        out["tempered_tail_logprob"] = np.empty((n, T, len(spec.extra_temperatures)), np.float32)
    if spec.tail_samples:
        out["tail_ids"] = np.empty((n, T, spec.tail_samples), spec.id_dtype)
    temperatures = (1.0, *spec.extra_temperatures)
    copies = HostCopies(device)

    def store(lo: int, b: int, wait: Callable[[], dict[str, np.ndarray]]) -> None:
        arrays = dict(wait())
        finite[lo : lo + b] = arrays.pop("finite").reshape(b, T)
        for name, values in arrays.items():
            out[name][lo : lo + b] = values.reshape(out[name][lo : lo + b].shape)
        refuse_non_finite(finite[lo : lo + b], out, lo, b, first_row)
        on_batch(b * T)

    previous = None  # (lo, b, wait) of the batch whose copy is in flight
    for lo in range(0, n, batch_size):
        batch = torch.from_numpy(rows[lo : lo + batch_size].astype(np.int64))
        if device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)  # (b, T)
        b = batch.shape[0]
        top = teacher_topk(model, batch, spec.k, temperatures, tail_samples=spec.tail_samples, seed=spec.seed,
                           first_sequence=first_row + lo)
        # stored in id order (delta-codes well); the log-probs follow their ids
        ids, order = top.ids.sort(dim=-1)  # (b*T, k)
        results = {
            "topk_ids": ids.to(torch.int32),  # vocab < 2^31; half the bytes to copy
            # clamped to the codec's range [-255/16, 0]: one byte per value, no wrap-around
            "topk_logprobs": top.logprobs.gather(-1, order).clamp(min=LOGPROB_FLOOR, max=0.0),  # (b*T, k)
            "tail_logprob": top.tail_logprob,  # (b*T,)
            # NaN or inf anywhere in a position's logits makes its log-probs NaN: one flag per position
            "finite": torch.isfinite(top.logprobs).all(-1) & ~torch.isnan(top.tail_logprob),  # (b*T,)
        }
        if spec.extra_temperatures:
            results["log_partition"] = top.log_partition[:, 1:]  # (b*T, n_temps - 1)
            results["tempered_tail_logprob"] = top.tempered_tail_logprob  # (b*T, n_temps - 1)
        if spec.tail_samples:
            results["tail_ids"] = top.tail_ids.sort(dim=-1).values.to(torch.int32)  # (b*T, s), id order
        wait = copies.start(results)
        if previous is not None:
            store(*previous)  # the previous batch, while this one runs on the device
        previous = (lo, b, wait)
    if previous is not None:
        store(*previous)
    if loss_mask is not None:
        out["loss_mask"] = loss_mask.astype(np.uint8)
        if not spec.masked_targets:
            unused = ~learned_positions(loss_mask)  # (n, T); checked for non-finite values above all the same
            for name in out.keys() - {"input_ids", "loss_mask"}:
                out[name][unused] = 0
    return out


def write_shard(group: zarr.Group, spec: CacheSpec, shard: int, arrays: dict[str, np.ndarray],
                about: dict | None = None, row_digest: int = 0, fence: Callable[[], None] = lambda: None,
                leftover: bool = True) -> None:
    """Write one shard (one object per array), then its checksums (of each object, and of each of its
    chunks: the shard's identity, which readers check) and the digest of the corpus rows it was computed
    from, then its flag; then, when given, its provenance record (`about`: who computed it
    and in how many seconds; the write time is added). `fence` first: it raises when this writer may
    no longer write (its lease on the cache was taken over)."""
    fence()
    start = time.monotonic()
    lo, hi = spec.shard_rows(shard)
    # written from nothing: an old object (`leftover`: a crashed or damaged write) is removed, never
    # read and merged
    if leftover:
        remove_shard_objects(group, spec, shard)
    # every array's object is written, even one that holds only the fill value (a chat shard's masked
    # targets): so a complete shard has an object per array, and a missing one is damage (one listing tells)
    with zarr.config.set({"array.write_empty_chunks": True}):
        for name, values in arrays.items():
            group[name][lo:hi] = values
    checksums, chunks = shard_records(group, spec, shard)
    fence()  # again before the commit: a writer paused while writing never marks the shard complete
    group[CHECKSUMS][shard] = checksums
    group[CHUNK_CHECKSUMS][shard] = chunks
    group[ROW_DIGESTS][shard] = row_digest
    group[DONE][shard] = 1  # only now is the shard complete
    if about is not None:
        seconds = about["compute_seconds"] + time.monotonic() - start
        record_shard(group, shard, {**about, "seconds": round(seconds, 3), "written": utc_now(),
                                    "tokens_per_s": round((hi - lo) * spec.seq_len / max(seconds, 1e-9)),
                                    "crc32c": [f"{int(c) & 0xFFFFFFFF:08x}" for c in checksums]})


def capture(model: PreTrainedModel, corpus: SplitRows, group: zarr.Group, spec: CacheSpec,
            batch_size: int, device: torch.device, shard_limit: int | None = None, progress: bool = True,
            process: Process = Process(), fence: Callable[[], None] = lambda: None) -> list[int]:
    """Compute and write every incomplete shard (at most `shard_limit` of them); returns the shards
    this process wrote. `corpus`: the split's rows (with a chat corpus's loss masks), each checked
    against its digest when read; each shard records the digest of its rows, so a grown corpus reuses
    the shards whose rows are unchanged; `fence`: checked before every shard is written (the cache's
    lease, in an object store).

    Under torchrun every process runs this: the incomplete shards are claimed one at a time from a
    job-wide counter, so each is written by exactly one process, a fast process keeps taking work,
    and the arrays do not depend on how many processes there are (a shard's draws are seeded by its
    index). Rank 0 shows one progress bar for the whole job.
    """
    done = complete_shards(group)
    # Rank 0's view of what is left, for every rank: a rank reading the flags later could already see
    # a shard another rank has just written, and the claimed indices would then name other shards.
    done = broadcast(process, done)
    todo = [s for s in range(spec.n_shards) if not done[s]][:shard_limit]
    # incomplete shards with an object left by an earlier run: one listing per array, not a delete per shard
    leftover = np.zeros(spec.n_shards, bool)
    for name in array_layout(spec):
        leftover |= stored_shards(group, name)[: spec.n_shards]
    done_tokens = sum(hi - lo for lo, hi in map(spec.shard_rows, np.flatnonzero(done))) * spec.seq_len
    bar = tqdm(total=spec.n_sequences * spec.seq_len, initial=done_tokens, unit="tok", unit_scale=True,
               desc="cache-logits", disable=not progress or not process.is_main, smoothing=0.1)
    job_tokens = Counter("capture-tokens")

    def on_batch(tokens: int) -> None:
        bar.update(done_tokens + job_tokens.add(tokens) - bar.n)  # the whole job's progress

    who = {"host": socket.gethostname(), "rank": process.rank, "device": str(device),
           "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    written: list[int] = []
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as writer, bar:
        for item in Claims("capture-shards", len(todo)):
            shard = todo[item]
            lo, hi = spec.shard_rows(shard)
            start = time.monotonic()
            rows, loss_mask = corpus.rows(lo, hi)  # (n, T) each
            arrays = compute_shard(model, rows, spec, batch_size, device, on_batch=on_batch, shard=shard,
                                   loss_mask=loss_mask)
            about = {**who, "compute_seconds": round(time.monotonic() - start, 3)}
            digest = shard_row_digest(corpus.digests[lo:hi])
            if pending is not None:
                pending.result()  # at most two shards in memory; re-raises a failed write
            pending = writer.submit(write_shard, group, spec, shard, arrays, about, digest, fence, bool(leftover[shard]))
            written.append(shard)
        if pending is not None:
            pending.result()
    return written
