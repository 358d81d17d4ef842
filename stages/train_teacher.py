"""Stage: train the default teacher on the corpus (or point at a pretrained one)."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch

from pipeline.config import as_dict
from pipeline.models import PRETRAINED_POINTER, build_llama, count_parameters, resolve_device
from pipeline.outputs import prepare_output_dir, write_json
from pipeline.teacher import TeacherConfig, train_teacher
from pipeline.token_store import TOKENIZER_NAME, open_token_store
from pipeline.tokenizer import load_tokenizer_file, save_for_model


def main(corpus: Path, out: Path, cfg: TeacherConfig, overwrite: bool = False) -> None:
    if cfg.pretrained:
        prepare_output_dir(out, overwrite)
        write_json(out / PRETRAINED_POINTER, {"pretrained": cfg.pretrained})
        click.echo(f"teacher: pretrained {cfg.pretrained} (nothing trained)")
        return
    store = open_token_store(corpus)
    attrs = store.attrs
    device = resolve_device(cfg.device)
    prepare_output_dir(out, overwrite)
    torch.manual_seed(cfg.seed)
    model = build_llama(attrs["vocab_size"], cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff, attrs["seq_len"],
                        eos_id=attrs["eos_id"]).to(device)
    rows = np.asarray(store["train"][:])
    stats = train_teacher(model, rows, cfg, device)
    model.save_pretrained(out)
    save_for_model(load_tokenizer_file(Path(corpus) / TOKENIZER_NAME), attrs["eos_id"], out)
    write_json(out / "train_stats.json", {**stats, "params": count_parameters(model), "config": as_dict(cfg)})
    click.echo(f"teacher: {count_parameters(model):,} params, {stats['steps']} steps in {stats['minutes']:.1f} min, "
               f"train loss {stats['train_loss']:.3f} -> {out}")
