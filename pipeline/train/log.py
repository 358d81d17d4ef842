"""A student's training log, train_log.tsv: one row per optimizer step (the gradient norm before clipping;
held-out columns every eval_every)."""

from __future__ import annotations

import csv
from pathlib import Path

LOG_FIELDS = ("step", "lr", "loss", "kd", "ce", "grad_norm", "tokens_per_s", "val_loss", "val_kd", "val_ce")
LOG_NAME = "train_log.tsv"


def write_log(out: Path, rows: list[dict[str, float]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOG_NAME).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def read_log(out: Path) -> list[dict[str, float]]:
    """The rows of out/train_log.tsv as numbers (columns left empty, held-out ones between checks, omitted)."""
    with (out / LOG_NAME).open(newline="") as handle:
        return [{name: float(value) for name, value in row.items() if value not in ("", None)}
                for row in csv.DictReader(handle, delimiter="\t")]
