"""Held-out evaluation of the teacher and every student against the teacher's full distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel



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
                    batch_size: int, device: torch.device, progress: bool = True) -> dict[str, dict[str, float]]:
    """Cross-entropy and perplexity of every model on rows (N, T); for students also the full-vocabulary
    KL(teacher || student) and top-1 agreement with the teacher, averaged over positions."""
    sums = {name: _Sums() for name in ["teacher", *students]}
    for lo in tqdm(range(0, len(rows), batch_size), desc="evaluate", unit="batch", disable=not progress):
        input_ids = torch.from_numpy(rows[lo : lo + batch_size].astype(np.int64)).to(device)  # (B, T)
        labels = input_ids[:, 1:, None]  # (B, T-1, 1)
        teacher_logp = _log_probs(teacher, input_ids)  # (B, T, V)
        teacher_probs = teacher_logp.exp()  # (B, T, V), once per batch for every student's KL
        teacher_top1 = teacher_logp.argmax(-1)  # (B, T)
        for name, model in [("teacher", teacher), *students.items()]:
            logp = teacher_logp if name == "teacher" else _log_probs(model, input_ids)[..., : teacher_logp.shape[-1]]
            s = sums[name]
            s.nll += -logp[:, :-1].gather(-1, labels).sum().item()
            s.label_positions += labels.numel()
            s.positions += input_ids.numel()
            s.kl += (teacher_probs * (teacher_logp - logp)).sum().item()
            s.agree += (logp.argmax(-1) == teacher_top1).sum().item()
    results = {}
    for name, s in sums.items():
        ce = s.nll / s.label_positions
        results[name] = {"perplexity": math.exp(ce), "cross_entropy": ce}
        if name != "teacher":
            results[name] |= {"kl_to_teacher": s.kl / s.positions, "top1_agreement": s.agree / s.positions}
    return results
