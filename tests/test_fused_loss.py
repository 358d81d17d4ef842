"""The fused, chunked forward-KL + CE equals the autograd reference in value and gradient."""

import pytest
import torch

from pipeline import fused_loss
from pipeline.fused_loss import fused_forward_kl_ce
from pipeline.losses import SparseTargets, distillation_loss, next_token_labels, teacher_coarse
from pipeline.topk import topk_of_logits

B, T, V = 3, 6, 40


def make_targets(teacher_logits, k, temperatures):
    top = topk_of_logits(teacher_logits.reshape(-1, V).clone(), k, temperatures)
    return SparseTargets(top.ids.reshape(B, T, k), top.logprobs.reshape(B, T, k), top.tail_logprob.reshape(B, T),
                         top.log_partition[:, -1].reshape(B, T) if len(temperatures) > 1 else None)


@pytest.mark.parametrize("k, temperature, stored", [(5, 1.0, False), (V, 1.0, False), (5, 2.0, True), (5, 0.5, False), (V, 2.0, True)])
@pytest.mark.parametrize("kd_weight", [0.0, 0.3, 1.0])
def test_fused_equals_reference(monkeypatch, k, temperature, stored, kd_weight):
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", V * 4)  # several chunks
    g = torch.Generator().manual_seed(k + int(10 * temperature))
    teacher, student = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 3:] = False
    targets = make_targets(teacher, k, (1.0, temperature) if stored else (1.0,))

    reference_logits = student.clone().requires_grad_()
    reference = distillation_loss(reference_logits, ids, targets, mask, kd_weight, temperature, fused=False)
    reference["loss"].backward()

    fused_logits = student.clone().requires_grad_()
    labels = next_token_labels(ids, mask)
    loss, kd, ce = fused_forward_kl_ce(fused_logits.reshape(-1, V), targets.topk_ids.reshape(-1, k),
                                       teacher_coarse(targets, temperature).reshape(-1, k + 1),
                                       labels.reshape(-1), mask.reshape(-1), kd_weight, temperature)
    loss.backward()

    torch.testing.assert_close(kd, reference["kd"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ce, reference["ce"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, reference["loss"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_logits.grad, reference_logits.grad, atol=1e-6, rtol=1e-4)


def test_distillation_loss_uses_the_fused_path_with_the_same_result():
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    ids, mask = torch.randint(0, V, (B, T), generator=g), torch.ones(B, T, dtype=torch.bool)
    targets = make_targets(teacher, 6, (1.0,))
    student.requires_grad_()
    fused = distillation_loss(student, ids, targets, mask, 0.5, 1.0)
    plain = distillation_loss(student, ids, targets, mask, 0.5, 1.0, fused=False)
    assert "FusedKDCE" in type(fused["loss"].grad_fn).__name__
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], atol=1e-5, rtol=1e-5)


def test_bf16_logits_give_the_fp32_gradient_within_bf16_rounding():
    """The GPU path feeds bf16 logits (autocast): the loss is computed in fp32 chunks."""
    g = torch.Generator().manual_seed(2)
    teacher, student = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g) * 3
    ids, mask = torch.randint(0, V, (B, T), generator=g), torch.ones(B, T, dtype=torch.bool)
    targets = make_targets(teacher, 6, (1.0,))
    reference = student.bfloat16().float().requires_grad_()
    distillation_loss(reference, ids, targets, mask, 0.5, 1.0)["loss"].backward()
    low = student.bfloat16().requires_grad_()
    out = distillation_loss(low, ids, targets, mask, 0.5, 1.0)
    out["loss"].backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), reference.grad, atol=1e-4, rtol=1e-2)
