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
from pipeline.models.head import HEAD_CHECK_POSITIONS, LOGITS_BUDGET, check_head, hidden_and_head
from pipeline.models.load import output_vocab_size



@dataclass
class _Sums:
    nll: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    label_positions: int = 0
    positions: int = 0



def _hidden(model: PreTrainedModel, input_ids: torch.Tensor):
    """(final hidden states (B*T, d), the model's head): its forward without the (B, T, V) logits."""
    hidden, head = hidden_and_head(model, input_ids=input_ids)
    return hidden.reshape(-1, hidden.shape[-1]), head


@torch.inference_mode()
def evaluate_models(teacher: PreTrainedModel, students: dict[str, PreTrainedModel], rows: np.ndarray,
                    batch_size: int, device: torch.device, progress: bool = True,
                    loss_mask: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Cross-entropy and perplexity of every model on rows (N, T); for students also the full-vocabulary
    KL(teacher || student) and top-1 agreement with the teacher, averaged over positions. With a chat
    corpus's loss_mask (N, T), every number is over the positions that predict an assistant token.
    Each model's log-probabilities are made a chunk of positions at a time from its hidden states, so
    memory does not grow with batch x length x vocabulary."""
    sums = {name: _Sums() for name in ["teacher", *students]}
    models = {"the teacher": teacher, **{f"student {name}": model for name, model in students.items()}}
    vocab = output_vocab_size(teacher)
    for role, model in models.items():  # a padded head may be larger than the teacher's; never smaller
        require(output_vocab_size(model) >= vocab, f"{role}'s vocabulary ({output_vocab_size(model):,} ids) is smaller "
                                                   f"than the teacher's ({vocab:,}): it was not distilled from this "
                                                   "teacher, and the KL to it is not defined")
    if len(rows):  # each model's head is its own (a family's unknown transform refused), on the first positions
        first = torch.from_numpy(rows[:1, :HEAD_CHECK_POSITIONS].astype(np.int64)).to(device)
        for role, model in models.items():
            check_head(model, first, role, "evaluate")
    for lo in tqdm(range(0, len(rows), batch_size), desc="evaluate", unit="batch", disable=not progress):
        input_ids = torch.from_numpy(rows[lo : lo + batch_size].astype(np.int64)).to(device)  # (B, T)
        if loss_mask is None:
            counted = torch.ones_like(input_ids, dtype=torch.float32)  # (B, T): KL and agreement everywhere
        else:
            counted = torch.from_numpy(learned_positions(loss_mask[lo : lo + batch_size])).to(device).float()
        labelled = counted.clone()
        labelled[:, -1] = 0  # the last position has no label
        labels = torch.zeros_like(input_ids)
        labels[:, :-1] = input_ids[:, 1:]
        counted, labelled, labels = counted.reshape(-1), labelled.reshape(-1), labels.reshape(-1, 1)  # (B*T,)...
        states = {"teacher": _hidden(teacher, input_ids), **{name: _hidden(model, input_ids)
                                                               for name, model in students.items()}}
        vocab = states["teacher"][1].weight.shape[0]
        step = max(1, LOGITS_BUDGET // vocab)
        for first in range(0, counted.numel(), step):  # a chunk of positions (c of B*T)
            part = slice(first, first + step)
            teacher_logp = None
            for name, (hidden, head) in states.items():
                logp = torch.log_softmax(head.logits(hidden[part]), dim=-1)[:, :vocab]  # (c, V)
                if teacher_logp is None:
                    teacher_logp, teacher_probs, teacher_top1 = logp, logp.exp(), logp.argmax(-1)
                s = sums[name]
                s.nll += -(logp.gather(-1, labels[part]).squeeze(-1) * labelled[part]).sum().item()
                if name != "teacher":
                    s.kl += ((teacher_probs * (teacher_logp - logp)).sum(-1) * counted[part]).sum().item()
                    s.agree += ((logp.argmax(-1) == teacher_top1) * counted[part]).sum().item()
        for s in sums.values():
            s.label_positions += int(labelled.sum().item())
            s.positions += int(counted.sum().item())
    results = {}
    for name, s in sums.items():
        require(s.label_positions > 0, "the evaluated sequences hold no position to score (no assistant token)")
        ce = s.nll / s.label_positions
        results[name] = {"perplexity": math.exp(ce), "cross_entropy": ce}
        if name != "teacher":
            results[name] |= {"kl_to_teacher": s.kl / s.positions, "top1_agreement": s.agree / s.positions}
    return results
