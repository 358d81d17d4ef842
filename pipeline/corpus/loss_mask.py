"""Which positions a chat corpus's loss mask lets the student learn from.

The corpus marks tokens (1: the assistant's). Position t predicts token t + 1, so position t
counts when token t + 1 is marked; the last position of a row predicts a token the row does not
hold and never counts. One rule for the capture (which positions need targets), the losses and
`evaluate`.
"""

from __future__ import annotations

import numpy as np
import torch


def learned_positions(loss_mask):
    """loss_mask (..., T) of 0/1 (numpy or torch) -> (..., T) bool of the positions that count."""
    if isinstance(loss_mask, torch.Tensor):
        out = torch.zeros(loss_mask.shape, dtype=torch.bool, device=loss_mask.device)
    else:
        out = np.zeros(loss_mask.shape, bool)
    out[..., :-1] = loss_mask[..., 1:] != 0
    return out
