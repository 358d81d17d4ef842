"""Stage: train the default teacher on the corpus (or point at a pretrained one)."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from pipeline.config import as_dict
from pipeline.model_source import check_model_source
from pipeline.models.devices import resolve_device
from pipeline.models.load import PRETRAINED_POINTER, build_llama, count_parameters
from pipeline.io.outputs import PROVENANCE_FILE, full_disk_named, staged_output, write_json
from pipeline.teacher.train import train_teacher
from pipeline.settings.teacher import TeacherConfig
from pipeline.io import storage
from pipeline.io.storage import Location, display
from pipeline.corpus.token_store import TOKENIZER_NAME, SplitRows, open_token_store
from pipeline.corpus.tokenizer import load_tokenizer_file, save_for_model


def is_teacher_dir(path: Path) -> bool:
    return (path / "train_stats.json").is_file() or (path / PRETRAINED_POINTER).is_file()


# what a rerun after a full disk does: the teacher has no checkpoints (minutes of training on a small corpus)
RERUN = "the same command trains the teacher again from the start; the previous teacher, if any, is as it was"


def main(corpus: Location, out: Path, cfg: TeacherConfig, overwrite: bool = False, progress: bool = True) -> None:
    inputs = {"--corpus": corpus, "pretrained": cfg.pretrained}
    if cfg.pretrained:
        check_model_source(cfg.pretrained, "pretrained")
        # a local directory is recorded absolute: the pointer works from any directory
        pretrained = str(Path(cfg.pretrained).resolve()) if Path(cfg.pretrained).is_dir() else cfg.pretrained
        with full_disk_named(out, rerun=RERUN), \
                staged_output(out, overwrite, is_teacher_dir, "teacher directory", inputs) as staging:
            write_json(staging / PRETRAINED_POINTER, {"pretrained": pretrained})
        click.echo(f"teacher: pretrained {pretrained} (nothing trained)")
        return
    # the output is checked (and locked) before the corpus is read; an old teacher stays until the new one is saved
    with full_disk_named(out, rerun=RERUN), \
            staged_output(out, overwrite, is_teacher_dir, "teacher directory", inputs) as staging:
        store = open_token_store(corpus)
        stats = train_and_save(store, corpus, staging, cfg, resolve_device(cfg.device), progress)
    click.echo(f"teacher: {stats['params']:,} params, {stats['steps']} steps in {stats['minutes']:.1f} min, "
               f"train loss {stats['train_loss']:.3f} -> {out}")


def train_and_save(store, corpus: Location, out: Path, cfg: TeacherConfig, device: torch.device,
                   progress: bool = True) -> dict:
    attrs = store.attrs
    torch.manual_seed(cfg.seed)
    model = build_llama(attrs["vocab_size"], cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, attrs["seq_len"],
                        eos_id=attrs["eos_id"]).to(device)
    rows, _ = SplitRows(store, "train", display(corpus)).rows()  # (N, T), checked against their digests
    stats = {**train_teacher(model, rows, cfg, device, progress), "params": count_parameters(model)}
    model.save_pretrained(out)
    save_for_model(load_tokenizer_file(storage.child(corpus, TOKENIZER_NAME)), attrs["eos_id"], out)
    # What the teacher is goes into its DVC hash; how long it took does not (.dvcignore).
    write_json(out / "train_stats.json", {key: stats[key] for key in ("steps", "train_loss", "params")} | {"config": as_dict(cfg)})
    write_json(out / PROVENANCE_FILE, {"minutes": stats["minutes"], "device": device.type})
    return stats
