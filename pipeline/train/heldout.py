"""The held-out check during training: validation loss and KL to the cached targets of another split.

The first `eval_sequences` sequences of a validation cache (captured from the same teacher), split
over the processes (padded to the same number of slots on each, the padding counting nowhere) and
reduced, so the numbers are the same for any process count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.distill.batch import linear_distillation_loss, loss_counts, step_counts
from pipeline.distributed import Process, on_main
from pipeline.errors import require
from pipeline.models.head import hidden_and_head
from pipeline.io.storage import display
from pipeline.settings.student import StudentConfig
from pipeline.train.data import LogitCache
from pipeline.train.loader import collate, move
from pipeline.train.parallel import reduce_mean, reduce_sum


def share(n: int, rank: int, world_size: int) -> list[int | None]:
    """This process's slots of the first n sequences: contiguous, the same number on every process (a
    sharded model runs collectives in forward), None for the padding past the n-th. So every sequence
    is checked once, whatever the number of processes."""
    per_process = -(-n // world_size)
    return [s if s < n else None for s in range(rank * per_process, (rank + 1) * per_process)]


def padding(item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sequence that counts in no term (attention_mask 0 everywhere): a slot past the last one."""
    return {**item, "attention_mask": torch.zeros_like(item["attention_mask"])}


@dataclass
class HeldOut:
    batches: list[dict[str, torch.Tensor]]  # this process's share, on the device
    split: str  # the corpus split the cache holds (validation, unless a train cache was given)

    @classmethod
    def open(cls, where, train_attrs: dict, cfg: StudentConfig, device: torch.device, process: Process) -> HeldOut | None:
        """The check on a validation cache; None when it holds no sequences (a corpus prepared without a
        validation split)."""
        cache = on_main(process, lambda: LogitCache.open(where))  # opened once per job
        for name in ("teacher_fingerprint", "tokenizer_fingerprint", "seq_len", "vocab_size"):
            require(cache.attrs[name] == train_attrs[name],
                    f"--eval-cache {display(cache.location)} has another {name} than the training cache: "
                    "capture it from the same teacher and corpus (cache-logits --split validation)")
        n = min(cfg.eval_sequences, len(cache))
        if n == 0:
            return None
        dataset = cache.dataset(cfg.temperature, tail_ids=False)
        mine = [dataset[s] if s is not None else padding(dataset[0]) for s in share(n, process.rank, process.world_size)]
        return cls([move(collate(mine[i : i + cfg.batch_size]), device) for i in range(0, len(mine), cfg.batch_size)],
                   cache.attrs["split"])

    @torch.no_grad()
    def losses(self, model: torch.nn.Module, cfg: StudentConfig, process: Process) -> dict[str, float]:
        """val_loss (the training objective), val_kd (KL to the cached targets), val_ce (hard labels):
        means over every process's positions."""
        was_training = model.training
        model.eval()
        sums = {"val_loss": 0.0, "val_kd": 0.0, "val_ce": 0.0}
        # every batch's sums are added, then averaged over processes: the mean over all positions (a chat
        # mask counts different numbers in each batch)
        counts = step_counts(reduce_sum(process, loss_counts(self.batches)), process.world_size)  # (2,)
        for batch in self.batches:
            hidden, head = hidden_and_head(model, input_ids=batch["input_ids"])  # (B, T, d): no (B, T, V) logits
            parts = linear_distillation_loss(hidden, head, batch, cfg.kd_weight, cfg.temperature, cfg.loss, counts)
            for name, value in zip(sums, (parts.loss.detach(), parts.kd, parts.ce)):
                sums[name] = sums[name] + value
        model.train(was_training)
        return reduce_mean(process, {name: torch.as_tensor(value) for name, value in sums.items()})
