"""The fused, chunked forward-KL + CE equals the autograd reference in value and gradient."""

import pytest
import torch

from pipeline.distill import fused as fused_loss
from pipeline.distill.fused import fused_forward_kl_ce
from pipeline.distill.losses import SparseTargets, kd_ce_from_logits, next_token_labels, teacher_coarse
from pipeline.capture.topk import topk_of_logits

B, T, V = 3, 6, 40


def make_targets(teacher_logits, k, temperatures):
    top = topk_of_logits(teacher_logits.reshape(-1, V).clone(), k, temperatures)
    stored = len(temperatures) > 1
    return SparseTargets(top.ids.reshape(B, T, k), top.logprobs.reshape(B, T, k), top.tail_logprob.reshape(B, T),
                         top.log_partition[:, -1].reshape(B, T) if stored else None,
                         tempered_tail_logprob=top.tempered_tail_logprob[:, -1].reshape(B, T) if stored else None)


def test_over_confident_student_tail_is_exact():
    """A student that puts ~1e-12 of its mass outside the teacher's top-k: the fused KD (value and
    gradient) equals a float64 reference; a tail floored near 1e-7 would be off by p_tail * log(1e5)."""
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(B, T, V, generator=g) * 2
    k = 5
    targets = make_targets(teacher, k, (1.0,))
    student = torch.randn(B, T, V, generator=g)
    student = student.scatter_add(-1, targets.topk_ids, torch.full((B, T, k), 30.0))  # top-k ids far ahead
    student.requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    fused = kd_ce_from_logits(student, ids, targets, mask, 1.0, 1.0)["loss"]
    fused.backward()
    reference_input = student.detach().double().requires_grad_()
    log_q = torch.log_softmax(reference_input, -1)
    q_top = log_q.gather(-1, targets.topk_ids)
    q_tail = torch.logsumexp(log_q.scatter(-1, targets.topk_ids, -torch.inf), -1)
    assert q_tail.max() < -25  # the student's tail mass is ~1e-12
    log_p = teacher_coarse(targets, 1.0).double()
    log_qc = torch.cat([q_top, q_tail[..., None]], -1)
    reference = (log_p.exp() * (log_p - log_qc)).sum(-1).mean()
    reference.backward()
    torch.testing.assert_close(fused.double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student.grad.double(), reference_input.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("k, temperature, stored", [(5, 1.0, False), (V, 1.0, False), (5, 2.0, True), (5, 0.5, False), (V, 2.0, True)])
@pytest.mark.parametrize("kd_weight", [0.0, 0.3, 1.0])
def test_fused_equals_reference(monkeypatch, k, temperature, stored, kd_weight):
    monkeypatch.setattr(fused_loss, "LOGITS_BUDGET", V * 4)  # several chunks
    g = torch.Generator().manual_seed(k + int(10 * temperature))
    teacher, student = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g) * 3
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 3:] = False
    targets = make_targets(teacher, k, (1.0, temperature) if stored else (1.0,))

    reference_logits = student.clone().requires_grad_()
    reference = kd_ce_from_logits(reference_logits, ids, targets, mask, kd_weight, temperature, fused=False)
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
    fused = kd_ce_from_logits(student, ids, targets, mask, 0.5, 1.0)
    plain = kd_ce_from_logits(student, ids, targets, mask, 0.5, 1.0, fused=False)
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
    kd_ce_from_logits(reference, ids, targets, mask, 0.5, 1.0)["loss"].backward()
    low = student.bfloat16().requires_grad_()
    out = kd_ce_from_logits(low, ids, targets, mask, 0.5, 1.0)
    out["loss"].backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), reference.grad, atol=1e-4, rtol=1e-2)


def sampled_targets(teacher_logits, k, draws, seed=0):
    """Top-k targets plus `draws` tail ids per position, from topk_of_logits itself."""
    keys = torch.arange(B * T) + 1000 * seed  # one key per position: other seeds, other draws
    top = topk_of_logits(teacher_logits.reshape(-1, V).clone(), k, (1.0,), tail_samples=draws, keys=keys)
    return SparseTargets(top.ids.reshape(B, T, k), top.logprobs.reshape(B, T, k), top.tail_logprob.reshape(B, T),
                         tail_ids=top.tail_ids.reshape(B, T, draws))


def test_tail_draws_come_from_the_teacher_tail():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g) * 2
    top = topk_of_logits(logits.clone(), 5, (1.0,), tail_samples=40_000)
    probs = torch.softmax(logits, -1)
    for row in range(4):
        assert not torch.isin(top.tail_ids[row], top.ids[row]).any()  # never a top-k id
        frequency = torch.bincount(top.tail_ids[row], minlength=V).double() / 40_000
        expected = probs[row].double().scatter(0, top.ids[row], 0.0)
        expected /= expected.sum()
        torch.testing.assert_close(frequency, expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("kd_weight", [0.3, 1.0])
def test_fused_with_tail_draws_equals_its_reference(monkeypatch, kd_weight):
    """Gradient with draws = autograd of kd_weight * mean(-sum_topk p log q - p_tail/s * sum_draws log q)
    + (1 - kd_weight) * CE; the logged KD value is still the coarsened KL."""
    monkeypatch.setattr(fused_loss, "LOGITS_BUDGET", V * 4)
    g = torch.Generator().manual_seed(5)
    teacher, student = torch.randn(B, T, V, generator=g) * 3, torch.randn(B, T, V, generator=g) * 3
    ids, mask = torch.randint(0, V, (B, T), generator=g), torch.ones(B, T, dtype=torch.bool)
    targets = sampled_targets(teacher, 5, 7)

    reference_logits = student.clone().requires_grad_()
    log_q = torch.log_softmax(reference_logits, -1)
    p_tail = targets.tail_logprob.exp()
    cross = -(targets.topk_logprobs.exp() * log_q.gather(-1, targets.topk_ids)).sum(-1) \
        - p_tail / 7 * log_q.gather(-1, targets.tail_ids).sum(-1)  # (B, T)
    plain = kd_ce_from_logits(reference_logits, ids, targets, mask, kd_weight, 1.0, fused=False)
    (kd_weight * cross.mean() + (1 - kd_weight) * plain["ce"]).backward()

    fused_logits = student.clone().requires_grad_()
    fused = kd_ce_from_logits(fused_logits, ids, targets, mask, kd_weight, 1.0)
    fused["loss"].backward()
    torch.testing.assert_close(fused_logits.grad, reference_logits.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(fused["kd"], plain["kd"], atol=1e-5, rtol=1e-5)


def test_tail_draws_give_an_unbiased_full_kl_gradient():
    """Many draws: the gradient approaches that of the dense forward KL (k = V), which the one-bucket
    tail does not reach."""
    g = torch.Generator().manual_seed(7)
    teacher, student = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    ids, mask = torch.randint(0, V, (B, T), generator=g), torch.ones(B, T, dtype=torch.bool)

    def grad(targets):
        logits = student.clone().requires_grad_()
        kd_ce_from_logits(logits, ids, targets, mask, 1.0, 1.0)["loss"].backward()
        return logits.grad

    dense = grad(make_targets(teacher, V, (1.0,)))
    sampled = grad(sampled_targets(teacher, 5, 20_000))
    bucket = grad(make_targets(teacher, 5, (1.0,)))
    assert (sampled - dense).abs().max() < 2e-4
    assert (bucket - dense).abs().max() > 10 * (sampled - dense).abs().max()


def test_tail_draws_need_temperature_one():
    g = torch.Generator().manual_seed(9)
    targets = sampled_targets(torch.randn(B, T, V, generator=g), 5, 3)
    with pytest.raises(ValueError, match="T = 1"):
        fused_forward_kl_ce(torch.randn(B * T, V), targets.topk_ids.reshape(-1, 5),
                            teacher_coarse(targets, 2.0).reshape(-1, 6), torch.zeros(B * T, dtype=torch.long),
                            torch.ones(B * T, dtype=torch.bool), 0.5, 2.0, targets.tail_ids.reshape(-1, 3))


def test_a_row_whose_tail_underflows_still_draws_outside_the_top_k():
    logits = torch.full((2, V), -200.0)
    logits[:, :5] = torch.arange(5.0)  # the top-5 hold all the fp32 mass: the tail's softmax is exactly 0
    top = topk_of_logits(logits, 5, (1.0,), tail_samples=4)
    assert (top.tail_ids >= 5).all()


@pytest.mark.parametrize("kd_weight", [0.0, 0.8])
def test_a_student_with_no_mass_left_outside_the_top_k_gets_a_finite_exact_gradient(kd_weight):
    """A student that puts less than e^-100 outside the teacher's top-k (its tail logits 300 below), on
    rows the KD counts and on rows it does not (a loss mask; the kd_weight 0 baseline): the gradient
    is finite and equals the float64 one, d/dz_j = kd_weight (q_j - p~_j) / n_kd + (1 - kd_weight)
    (q_j - [j = label]) / n_ce, with p~_j = p_tail q_j / q_tail off the top-k (the tail term in log space)."""
    g = torch.Generator().manual_seed(7)
    n, k = 12, 4
    teacher = torch.randn(n, V, generator=g) * 2
    top = topk_of_logits(teacher.clone(), k, (1.0,))
    student = torch.full((n, V), -300.0).scatter_(-1, top.ids, torch.randn(n, k, generator=g))  # (n, V)
    student.requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)
    kd_mask = torch.arange(n) % 3 != 0  # every third row masked out
    teacher_logp = torch.cat([top.logprobs, top.tail_logprob[:, None]], -1)  # (n, k + 1)
    loss, _, _ = fused_forward_kl_ce(student, top.ids, teacher_logp, labels, kd_mask, kd_weight, 1.0)
    loss.backward()
    assert torch.isfinite(student.grad).all()

    z = student.detach().double()
    q = torch.softmax(z, -1)
    log_tail = torch.logsumexp(z.scatter(-1, top.ids, -torch.inf), -1) - torch.logsumexp(z, -1)  # (n,) ~ -296
    assert log_tail.max() < -100
    p = teacher_logp.double().exp()
    tail_share = torch.exp(torch.log_softmax(z, -1) - log_tail[:, None]).scatter(-1, top.ids, 0.0)  # q_j / q_tail
    target = (p[:, -1:] * tail_share).scatter(-1, top.ids, p[:, :-1])  # p~
    expected = kd_weight * (q - target) * kd_mask[:, None] / kd_mask.sum()
    expected += (1 - kd_weight) * (q - torch.nn.functional.one_hot(labels, V)) / n
    torch.testing.assert_close(student.grad.double(), expected, atol=1e-7, rtol=1e-5)
