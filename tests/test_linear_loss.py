"""The fused linear loss (hidden states + LM head, chunked) equals the plain logits-based loss (autograd
through the logits, `fused=False`) in value and gradients, never makes a positions x vocabulary tensor
larger than a chunk nor a (V, d) temporary, finds the head of several families, and trains a student to
the same weights."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.capture.topk import topk_of_logits
from pipeline.distill import linear
from pipeline.distill.batch import distillation_loss as batch_loss
from pipeline.distill.batch import linear_distillation_loss as batch_linear_loss
from pipeline.distill.linear import kd_ce_from_hidden
from pipeline.distill.losses import SparseTargets, kd_ce_from_logits
from pipeline.models.head import LogitHead, hidden_and_head
from pipeline.models.load import build_llama

B, T, D = 2, 7, 12


def make_case(vocab: int, k: int, temperatures=(1.0,), draws: int = 0, seed: int = 0, bias: bool = False,
              scale: float = 1.0, softcap: float | None = None, divisor: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B * T, vocab, generator=g) * 3
    top = topk_of_logits(teacher.clone(), k, temperatures, tail_samples=draws, keys=torch.arange(B * T))
    stored = len(temperatures) > 1
    targets = SparseTargets(top.ids.reshape(B, T, k), top.logprobs.reshape(B, T, k), top.tail_logprob.reshape(B, T),
                            top.log_partition[:, -1].reshape(B, T) if stored else None,
                            tail_ids=top.tail_ids.reshape(B, T, draws) if draws else None,
                            tempered_tail_logprob=top.tempered_tail_logprob[:, -1].reshape(B, T) if stored else None)
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(vocab, D, generator=g) * 0.5
    head_bias = torch.randn(vocab, generator=g) if bias else None
    ids = torch.randint(0, vocab, (B, T), generator=g)
    return hidden, LogitHead(weight, head_bias, scale, softcap, divisor), ids, targets


def both(hidden, head, ids, targets, mask, kd_weight, temperature, kind, counts=None):
    """(reference, fused): each (losses, grads of hidden / weight / bias), from fresh leaves."""
    results = []
    for fused in (False, True):
        h = hidden.clone().requires_grad_()
        w = head.weight.clone().requires_grad_()
        b = None if head.bias is None else head.bias.clone().requires_grad_()
        leaf_head = LogitHead(w, b, head.scale, head.softcap, head.divisor)
        if fused:
            out = kd_ce_from_hidden(h, leaf_head, ids, targets, mask, kd_weight, temperature, kind, counts=counts)
        else:  # the plain loss on the model's logits: autograd through every operation (not the closed form)
            logits = leaf_head.logits(h.reshape(B * T, D)).reshape(B, T, -1)
            out = kd_ce_from_logits(logits, ids, targets, mask, kd_weight, temperature, kind, fused=False,
                                    counts=counts)
        out["loss"].backward()
        results.append((out, h.grad, w.grad, None if b is None else b.grad))
    return results


def assert_same(reference, fused):
    (ref, *ref_grads), (got, *got_grads) = reference, fused
    for name in ("loss", "kd", "ce"):
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(got_grads, ref_grads):
        if theirs is None:
            assert ours is None
            continue
        scale = theirs.abs().max().clamp(min=1e-12)  # relative to the largest entry: entries near 0 do not count
        assert float((ours - theirs).abs().max() / scale) < 1e-5


CASES = [  # kind, k, temperatures (stored), loss temperature, draws
    ("forward_kl", 5, (1.0,), 1.0, 0),
    ("forward_kl", 5, (1.0,), 1.0, 6),  # tail draws (the default cache)
    ("forward_kl", 5, (1.0, 2.0), 2.0, 0),  # stored tempered tail
    ("forward_kl", 5, (1.0,), 0.5, 0),  # approximated tempered tail
    ("reverse_kl", 5, (1.0,), 1.0, 0),
    ("reverse_kl", 5, (1.0, 2.0), 2.0, 0),
    ("jsd", 5, (1.0,), 1.0, 0),
    ("jsd", 5, (1.0,), 0.5, 0),
]


@pytest.mark.parametrize("kind, k, temperatures, temperature, draws", CASES)
@pytest.mark.parametrize("kd_weight", [0.0, 0.8, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_linear_equals_the_logits_loss(monkeypatch, kind, k, temperatures, temperature, draws, kd_weight, masked):
    # chunks of 3 positions (several, the last one short), the loss on 2 rows of them at a time
    monkeypatch.setattr(linear, "chunk_rows", lambda positions, hidden_size, weight_copied: min(positions, 3))
    monkeypatch.setattr(linear, "LOGITS_BUDGET", 2 * 50)
    hidden, head, ids, targets = make_case(50, k, temperatures, draws, seed=len(kind) + k + draws)
    mask = torch.ones(B, T, dtype=torch.bool)
    if masked:
        mask[1, 4:] = False
        mask[0, 2] = False
    assert_same(*both(hidden, head, ids, targets, mask, kd_weight, temperature, kind))


@pytest.mark.parametrize("bias, scale, softcap, divisor", [(True, 1.0, None, 1.0), (False, 0.25, None, 1.0),
                                                            (False, 1.0, 3.0, 1.0), (True, 2.0, 5.0, 1.0),
                                                            (False, 1.0, None, 3.0), (True, 0.5, 4.0, 1.5)])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_fused_linear_applies_the_heads_bias_scale_divisor_and_softcap(monkeypatch, bias, scale, softcap, divisor, kind):
    monkeypatch.setattr(linear, "chunk_rows", lambda positions, hidden_size, weight_copied: min(positions, 4))
    monkeypatch.setattr(linear, "LOGITS_BUDGET", 3 * 40)
    hidden, head, ids, targets = make_case(40, 4, draws=3 if kind == "forward_kl" else 0, bias=bias, scale=scale,
                                           softcap=softcap, divisor=divisor)
    mask = torch.ones(B, T, dtype=torch.bool)
    assert_same(*both(hidden, head, ids, targets, mask, 0.8, 1.0, kind))


def test_step_counts_divide_both_paths_alike():
    hidden, head, ids, targets = make_case(60, 5, draws=4)
    mask = torch.ones(B, T, dtype=torch.bool)
    assert_same(*both(hidden, head, ids, targets, mask, 0.8, 1.0, "forward_kl", counts=torch.tensor([40.0, 31.0])))


@pytest.mark.parametrize("kind, draws", [("forward_kl", 8), ("reverse_kl", 0)])
def test_fused_linear_equals_the_logits_loss_at_a_real_vocabulary(kind, draws):
    """V = 151,936 (Qwen 2.5/3's): a few chunks of 64 positions x V."""
    hidden, head, ids, targets = make_case(151_936, 64, draws=draws, seed=3)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    assert_same(*both(hidden, head, ids, targets, mask, 0.8, 1.0, kind))


@pytest.mark.parametrize("positions, hidden_size, copied, rows", [
    (8192, 2048, True, 1024),  # chunks of d / 2 positions
    (8192, 4096, True, 2048),
    (3073, 2048, True, 1024),
    (3072, 2048, True, 3072),  # one chunk up to d / 2 + d positions where the weight's copy is freed for it
    (1024, 2048, True, 1024),
    (1025, 2048, False, 1024),  # no copy to free: one chunk only up to d / 2
    (1000, 2048, False, 1000),
    (8192, 64, False, 256),  # at least MIN_CHUNK_ROWS
    (300, 64, True, 300),
    (0, 64, False, 1),
])
def test_a_chunk_holds_half_d_positions_or_all_where_that_is_no_more(positions, hidden_size, copied, rows):
    assert linear.chunk_rows(positions, hidden_size, copied) == rows


class Allocations(TorchDispatchMode):
    """Records the number of elements of every tensor an operation makes (in new memory: not a view of,
    or an in-place result in, one of its inputs)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {value.untyped_storage().data_ptr() for value in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(value, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self.sizes += [value.numel() for value in torch.utils._pytree.tree_leaves(out)
                       if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_no_positions_by_vocabulary_tensor_larger_than_a_chunk_and_no_vocabulary_by_d_temporary(monkeypatch, kind,
                                                                                                autocast):
    """Forward and backward on 2,048 positions at d = 16 (chunks of 256 positions, as chunk_rows makes
    them): no tensor made is larger than a chunk (256 x V) or the weight (V x d), both far below
    2,048 x V; and the (V, d) tensors made are the weight's gradient and, under bf16 autocast, the
    weight's bf16 copy: none per chunk (the gradient is accumulated in place, in bf16 through blocks of
    LOGITS_BUDGET elements: here 100 of the 500 vocabulary rows, as at a real V they are a few percent)."""
    vocab, d, batch, length = 500, 16, 2, 1024
    monkeypatch.setattr(linear, "LOGITS_BUDGET", 100 * d)
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(batch * length, vocab, generator=g)
    top = topk_of_logits(teacher, 5, (1.0,), tail_samples=4 if kind == "forward_kl" else 0,
                         keys=torch.arange(batch * length))
    targets = SparseTargets(top.ids.reshape(batch, length, 5), top.logprobs.reshape(batch, length, 5),
                            top.tail_logprob.reshape(batch, length),
                            tail_ids=None if top.tail_ids is None else top.tail_ids.reshape(batch, length, 4))
    hidden = torch.randn(batch, length, d, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, d, generator=g) * 0.5).requires_grad_()
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    with Allocations() as seen, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = kd_ce_from_hidden(hidden, LogitHead(weight), ids, targets, mask, 0.8, 1.0, kind)
        out["loss"].backward()
    chunk = linear.chunk_rows(batch * length, d, autocast) * vocab
    assert chunk == 256 * vocab
    assert max(seen.sizes) <= max(chunk, weight.numel()) < batch * length * vocab
    assert sum(size == weight.numel() for size in seen.sizes) == (2 if autocast else 1)
    # and the 8 chunks x 5 vocabulary blocks give the gradients of the plain loss on the fp32 logits
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logits = LogitHead(w).logits(h.reshape(batch * length, d)).reshape(batch, length, -1)
    kd_ce_from_logits(logits, ids, targets, mask, 0.8, 1.0, kind, fused=False)["loss"].backward()
    tolerance = 3e-2 if autocast else 1e-5  # bf16's rounding of the matmuls
    for ours, theirs in ((hidden.grad, h.grad), (weight.grad, w.grad)):
        assert float((ours - theirs).abs().max() / theirs.abs().max()) < tolerance
    with Allocations() as logits_path:  # the check can fail: the logits path makes B x T x V tensors
        logits = LogitHead(weight).logits(hidden.reshape(batch * length, d)).reshape(batch, length, -1)
        kd_ce_from_logits(logits, ids, targets, mask, 0.8, 1.0, kind)["loss"].backward()
    assert max(logits_path.sizes) >= batch * length * vocab


def test_without_grad_mode_no_gradient_is_made():
    """The held-out check runs under no_grad, where a parameter still requires grad: no (V, d) gradient,
    no chunk gradient, and the same loss."""
    hidden, head, ids, targets = make_case(500, 5, draws=4)
    weight = head.weight.clone().requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    with torch.no_grad(), Allocations() as seen:
        quiet = kd_ce_from_hidden(hidden, LogitHead(weight), ids, targets, mask, 0.8, 1.0)["loss"]
    assert weight.numel() not in seen.sizes and max(seen.sizes) < 2 * B * T * 500
    assert torch.equal(quiet, kd_ce_from_hidden(hidden, LogitHead(weight), ids, targets, mask, 0.8, 1.0)["loss"].detach())


def test_under_fp16_autocast_the_gradient_keeps_its_small_entries():
    """fp16 cannot hold a gradient divided by the step's positions (its small entries underflow): under
    fp16 autocast the gradient stays fp32, within fp16's rounding of the logits of the fp32 result."""
    g = torch.Generator().manual_seed(4)
    vocab, d, n = 32_000, 32, 2048
    teacher = torch.randn(n, vocab, generator=g)
    top = topk_of_logits(teacher, 8, (1.0,), tail_samples=4, keys=torch.arange(n))
    targets = SparseTargets(top.ids[None], top.logprobs[None], top.tail_logprob[None], tail_ids=top.tail_ids[None])
    hidden, weight = torch.randn(1, n, d, generator=g), torch.randn(vocab, d, generator=g) * 0.3
    ids, mask = torch.randint(0, vocab, (1, n), generator=g), torch.ones(1, n, dtype=torch.bool)
    results = []
    for autocast in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            kd_ce_from_hidden(h, LogitHead(w), ids, targets, mask, 0.8, 1.0)["loss"].backward()
        results.append((h.grad, w.grad))
    for ours, theirs in zip(results[1], results[0]):
        assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-2


def test_a_second_backward_through_the_same_loss_gets_its_own_gradients():
    """The gradients are computed in forward and scaled in place by each backward's incoming gradient:
    a second backward (retain_graph) must not scale the first one's result again."""
    hidden, head, ids, targets = make_case(60, 5, draws=4)
    mask = torch.ones(B, T, dtype=torch.bool)
    (_, ref_h, ref_w, _), _ = both(hidden, head, ids, targets, mask, 0.8, 1.0, "forward_kl")
    h, w = hidden.clone().requires_grad_(), head.weight.clone().requires_grad_()
    loss = kd_ce_from_hidden(h, LogitHead(w), ids, targets, mask, 0.8, 1.0)["loss"]
    (3.0 * loss).backward(retain_graph=True)
    torch.testing.assert_close(w.grad, 3.0 * ref_w, rtol=1e-5, atol=1e-6)
    h.grad, w.grad = None, None
    (0.5 * loss).backward(retain_graph=True)
    torch.testing.assert_close(w.grad, 0.5 * ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, 0.5 * ref_h, rtol=1e-5, atol=1e-6)
    h.grad, w.grad = None, None
    loss.backward()
    torch.testing.assert_close(w.grad, ref_w, rtol=1e-5, atol=1e-6)


def tiny_models():
    from transformers import Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM, PhiConfig, PhiForCausalLM

    common = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return {
        "llama (tied)": build_llama(97, 16, 2, 2, 32, 32),
        "granite (logits divided)": GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0)),
        "gemma2 (soft-capped)": Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0)),
        "phi (head bias)": PhiForCausalLM(PhiConfig(**common)),
    }


@pytest.mark.parametrize("family", list(tiny_models()))
def test_hidden_and_head_give_the_models_own_logits(family):
    model = tiny_models()[family].eval()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    hidden, head = hidden_and_head(model, input_ids=ids)
    assert hidden.shape == (2, 9, 16)
    assert head.weight is model.get_output_embeddings().weight
    expected = model(input_ids=ids).logits.float()
    torch.testing.assert_close(head.logits(hidden.reshape(-1, 16)).reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


def cache_batches(steps: int, vocab: int, seed: int = 0):
    """Batches as the cache gives them (top-k + tail mass + tail draws) from a random teacher."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        teacher = torch.randn(2 * 16, vocab, generator=g) * 2
        top = topk_of_logits(teacher, 8, (1.0,), tail_samples=4, keys=torch.arange(32) + 32 * step)
        batches.append({"input_ids": torch.randint(0, vocab, (2, 16), generator=g),
                        "attention_mask": torch.ones(2, 16, dtype=torch.long),
                        "topk_ids": top.ids.reshape(2, 16, 8), "topk_logprobs": top.logprobs.reshape(2, 16, 8),
                        "tail_logprob": top.tail_logprob.reshape(2, 16), "tail_ids": top.tail_ids.reshape(2, 16, 4)})
    return batches


def test_a_student_trained_50_steps_ends_with_the_same_weights_either_way():
    batches = cache_batches(50, 101)
    final = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_llama(101, 16, 2, 2, 32, 16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for batch in batches:
            if fused:
                hidden, head = hidden_and_head(model, input_ids=batch["input_ids"])
                losses = batch_linear_loss(hidden, head, batch, kd_weight=0.8)
            else:
                losses = batch_loss(model(input_ids=batch["input_ids"]).logits, batch, kd_weight=0.8)
            losses.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        final.append(model.state_dict())
    for name, value in final[0].items():
        torch.testing.assert_close(final[1][name], value, rtol=1e-4, atol=1e-5, msg=name)
    torch.manual_seed(0)
    initial = build_llama(101, 16, 2, 2, 32, 16).state_dict()
    assert all(not torch.equal(value, initial[name]) for name, value in final[1].items())  # every weight trained


def test_under_bf16_autocast_the_chunks_matmuls_run_in_bf16_and_the_loss_in_fp32():
    """The GPU path (autocast bf16), on the CPU: values and gradients within bf16 rounding of fp32's."""
    hidden, head, ids, targets = make_case(300, 5, draws=4, seed=9)
    mask = torch.ones(B, T, dtype=torch.bool)
    (reference, ref_h, ref_w, _), _ = both(hidden, head, ids, targets, mask, 0.8, 1.0, "forward_kl")
    h, w = hidden.clone().requires_grad_(), head.weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kd_ce_from_hidden(h, LogitHead(w), ids, targets, mask, 0.8, 1.0)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    assert out["loss"] != reference["loss"]  # the matmuls did run in bf16
    torch.testing.assert_close(out["loss"], reference["loss"], rtol=2e-2, atol=0)
    for ours, theirs in ((h.grad, ref_h), (w.grad, ref_w)):
        assert float((ours - theirs).abs().max() / theirs.abs().max()) < 3e-2


def test_evaluate_scores_a_chunk_of_positions_at_a_time_as_the_full_logits_would(monkeypatch):
    import numpy as np

    from pipeline.evaluate import scores

    monkeypatch.setattr(scores, "LOGITS_BUDGET", 5 * 97)  # chunks of 5 positions across sequence boundaries
    models = {name: model.eval() for name, model in tiny_models().items()}
    teacher = models.pop("llama (tied)")
    rows = np.random.default_rng(0).integers(0, 97, (5, 9))
    got = scores.evaluate_models(teacher, models, rows, 2, torch.device("cpu"), progress=False)
    ids = torch.from_numpy(rows)
    with torch.no_grad():
        teacher_logp = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
        for name, model in [("teacher", teacher), *models.items()]:
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
            assert abs(got[name]["cross_entropy"] - float(nll)) < 1e-5, name
            if name != "teacher":
                kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(-1).mean()
                agree = (logp.argmax(-1) == teacher_logp.argmax(-1)).float().mean()
                assert abs(got[name]["kl_to_teacher"] - float(kl)) < 1e-5, name
                assert abs(got[name]["top1_agreement"] - float(agree)) < 1e-6, name
