"""Held-out evaluation of the teacher and every student against the teacher's full distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from pipeline.errors import require
from pipeline.corpus.loss_mask import learned_positions



@dataclass
class _Sums:
    nll: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    label_positions: int = 0
    positions: int = 0


def _log_probs(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=input_ids).logits.float(), dim=-1)  # (B, T, V)


@torch.inference_mode()
def evaluate_models(teacher: PreTrainedModel, students: dict[str, PreTrainedModel], rows: np.ndarray,
                    batch_size: int, device: torch.device, progress: bool = True,
                    loss_mask: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Cross-entropy and perplexity of every model on rows (N, T); for students also the full-vocabulary
    KL(teacher || student) and top-1 agreement with the teacher, averaged over positions. With a chat
    corpus's loss_mask (N, T), every number is over the positions that predict an assistant token."""
    sums = {name: _Sums() for name in ["teacher", *students]}
    for lo in tqdm(range(0, len(rows), batch_size), desc="evaluate", unit="batch", disable=not progress):
        input_ids = torch.from_numpy(rows[lo : lo + batch_size].astype(np.int64)).to(device)  # (B, T)
        labels = input_ids[:, 1:, None]  # (B, T-1, 1)
        if loss_mask is None:
            counted = torch.ones_like(input_ids, dtype=torch.float32)  # (B, T): KL and agreement everywhere
            labelled = counted[:, :-1]  # (B, T-1): the last position has no label
        else:
            counted = torch.from_numpy(learned_positions(loss_mask[lo : lo + batch_size])).to(device).float()
            labelled = counted[:, :-1]
        teacher_logp = _log_probs(teacher, input_ids)  # (B, T, V)
        teacher_probs = teacher_logp.exp()  # (B, T, V), once per batch for every student's KL
        teacher_top1 = teacher_logp.argmax(-1)  # (B, T)
        for name, model in [("teacher", teacher), *students.items()]:
            logp = teacher_logp if name == "teacher" else _log_probs(model, input_ids)[..., : teacher_logp.shape[-1]]
            s = sums[name]
            s.nll += -(logp[:, :-1].gather(-1, labels).squeeze(-1) * labelled).sum().item()
            s.label_positions += int(labelled.sum().item())
            s.positions += int(counted.sum().item())
            s.kl += ((teacher_probs * (teacher_logp - logp)).sum(-1) * counted).sum().item()
            s.agree += ((logp.argmax(-1) == teacher_top1) * counted).sum().item()
    results = {}
    for name, s in sums.items():
        require(s.label_positions > 0, "the evaluated sequences hold no position to score (no assistant token)")
        ce = s.nll / s.label_positions
        results[name] = {"perplexity": math.exp(ce), "cross_entropy": ce}
        if name != "teacher":
            results[name] |= {"kl_to_teacher": s.kl / s.positions, "top1_agreement": s.agree / s.positions}
    return results
