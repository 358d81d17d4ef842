"""The sparse targets equal a direct computation from the teacher's full logits."""

import math

import pytest
import torch

from pipeline.capture.topk import teacher_topk
from tests.conftest import tiny_gpt2, tiny_llama


def sharp_llama(vocab):
    return tiny_llama(vocab, sharpness=20.0)  # mixes rows whose top-k holds > 99% (exact tail path) and not


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2, sharp_llama], ids=["llama", "gpt2", "sharp-llama"])
def test_topk_matches_full_softmax(make_model):
    model = make_model(200)
    input_ids = torch.randint(0, 200, (3, 12))
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids).logits.float(), dim=-1).reshape(-1, 200)  # (N, V)
    ref_values, ref_ids = reference.topk(10, dim=-1)

    # a tiny slice budget forces many LM-head slices: the result must not depend on it
    top = teacher_topk(model, input_ids, k=10, max_slice_elements=200 * 5)

    assert torch.equal(top.ids, ref_ids)
    torch.testing.assert_close(top.logprobs, ref_values, atol=1e-5, rtol=1e-5)
    outside = reference.clone().scatter_(-1, ref_ids, -math.inf).logsumexp(-1)
    torch.testing.assert_close(top.tail_logprob, outside, atol=1e-5, rtol=1e-5)
    if make_model is sharp_llama:  # both tail paths are exercised
        assert (top.tail_logprob < math.log(0.01)).any() and (top.tail_logprob > math.log(0.01)).any()
    total = top.logprobs.exp().sum(-1) + top.tail_logprob.exp()
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_k_equal_vocab_has_no_tail():
    model = tiny_llama(64)
    top = teacher_topk(model, torch.randint(0, 64, (2, 5)), k=64)
    assert torch.isneginf(top.tail_logprob).all()
    torch.testing.assert_close(top.logprobs.exp().sum(-1), torch.ones(10), atol=1e-5, rtol=0)


def test_log_partition_gives_exact_tempered_distribution():
    model = tiny_llama(100)
    input_ids = torch.randint(0, 100, (2, 7))
    top = teacher_topk(model, input_ids, k=5, temperatures=(1.0, 2.0, 0.5))
    with torch.no_grad():
        logits = model(input_ids).logits.float().reshape(-1, 100)
    for column, t in enumerate((1.0, 2.0, 0.5)):
        tempered = torch.log_softmax(logits / t, dim=-1).gather(-1, top.ids)  # (N, k)
        from_cache = top.logprobs / t - top.log_partition[:, column : column + 1]
        torch.testing.assert_close(from_cache, tempered, atol=1e-5, rtol=1e-5)
