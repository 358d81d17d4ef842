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


def tiny_family(family: str, vocab: int = 160):
    """A tiny model of a family whose head transforms its logits, built from a config (nothing downloaded)."""
    from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                              GraniteForCausalLM)

    torch.manual_seed(0)
    sizes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    if family == "granite":  # logits / logits_scaling: the 3.96-nat error of a head that ignores it
        return GraniteForCausalLM(GraniteConfig(**sizes, logits_scaling=8.0)).eval()
    if family == "gemma2":  # soft-capped logits
        return Gemma2ForCausalLM(Gemma2Config(**sizes, head_dim=8, final_logit_softcapping=2.0)).eval()
    if family == "cohere":  # logits * logit_scale
        return CohereForCausalLM(CohereConfig(**sizes, logit_scale=0.25)).eval()
    return tiny_llama(vocab, sharpness=20.0)


@pytest.mark.parametrize("family", ["granite", "gemma2", "cohere", "llama"])
def test_the_cached_distribution_is_the_models_own_for_every_family(family):
    """The top-k, its log-probs and the tail mass are those of the model's own forward's logits,
    whatever its family does after the LM head; the check before a capture passes."""
    from pipeline.models.head import check_head

    model = tiny_family(family)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)  # logits large enough for the transforms to matter
    input_ids = torch.randint(0, 160, (2, 9))
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids).logits.float(), dim=-1).reshape(-1, 160)
    top = teacher_topk(model, input_ids, k=8, max_slice_elements=160 * 4)
    ref_values, ref_ids = reference.topk(8, dim=-1)
    assert torch.equal(top.ids, ref_ids)
    torch.testing.assert_close(top.logprobs, ref_values, atol=1e-5, rtol=1e-5)
    outside = reference.clone().scatter_(-1, ref_ids, -math.inf).logsumexp(-1)
    torch.testing.assert_close(top.tail_logprob, outside, atol=1e-5, rtol=1e-5)
    assert check_head(model, input_ids) < 1e-3


def test_a_head_transform_the_capture_does_not_know_is_refused(corpus_vocab):
    """A family (here a Llama subclass, as a user's custom model would be) that scales its logits in its
    own forward: the check the capture runs first refuses it in one line naming the class and the difference."""
    from transformers import LlamaForCausalLM

    from pipeline.models.head import check_head
    from pipeline.errors import UserError

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model = ScaledLlama(tiny_llama(corpus_vocab).config).eval()
    with pytest.raises(UserError, match="ScaledLlama.*differ by up to"):
        check_head(model, torch.randint(0, corpus_vocab, (1, 8)))


def test_cache_logits_of_a_granite_teacher_stores_its_own_distribution(tmp_path, corpus_dir, corpus_vocab):
    """End to end: `pipeline cache-logits` with a Granite teacher (its head divides the logits) stores
    the top-k log-probs of the model's own forward, to the codec's 1/32 nat."""
    import numpy as np
    import zarr

    from tests.conftest import run_cli, save_with_tokenizer

    model = tiny_family("granite", corpus_vocab)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    teacher = save_with_tokenizer(model, corpus_dir, tmp_path / "granite")
    out = tmp_path / "granite.zarr"
    run_cli("cache-logits", "--teacher", teacher, "--corpus", corpus_dir, "--out", out, "--k", 8, "--tail-samples", 0,
            "--sequences-per-chunk", 4, "--sequences-per-shard", 16, "--no-progress")
    group = zarr.open_group(out, mode="r")
    ids = torch.from_numpy(group["input_ids"][:4].astype(np.int64))
    with torch.no_grad():
        reference = torch.log_softmax(model(ids).logits.float(), dim=-1)  # (4, T, V)
    stored = torch.from_numpy(group["topk_logprobs"][:4])
    expected = reference.gather(-1, torch.from_numpy(group["topk_ids"][:4].astype(np.int64)))
    assert (stored - expected.clamp(min=-255 / 16)).abs().max() <= 1 / 32 + 1e-6


def test_tail_draws_do_not_depend_on_batch_size_or_vocabulary_slices(monkeypatch, corpus_dir, corpus_vocab):
    """A position's tail draws are a function of (seed, sequence, position) and the teacher's distribution
    only: computed with batch sizes 1, 3 and 32 and two slice sizes, the ids (top-k and draws) are
    byte-identical; the log-probs agree to the last bits the teacher's own matmuls round differently
    with another batch shape (docs/cache-format.md says what may differ)."""
    import numpy as np

    from pipeline.cache.format import CacheSpec
    from pipeline.capture import topk
    from pipeline.capture.shards import compute_shard
    from pipeline.corpus.token_store import open_token_store

    rows = np.asarray(open_token_store(corpus_dir)["train"][:12])
    model = tiny_llama(corpus_vocab, sharpness=5.0)
    spec = CacheSpec("t", "tok", "c", "train", corpus_vocab, 8, rows.shape[1], 12, 12, 4, (1.0,), 0, tail_samples=5,
                     seed=3)
    results = []
    for batch_size, slice_positions in [(1, 1000), (3, 1000), (32, 1000), (3, 5)]:
        monkeypatch.setattr(topk, "LOGITS_BUDGET", corpus_vocab * slice_positions)
        results.append(compute_shard(model, rows, spec, batch_size, torch.device("cpu")))
    for other in results[1:]:
        for name in ("input_ids", "topk_ids", "tail_ids"):
            assert results[0][name].tobytes() == other[name].tobytes(), name
        for name in ("topk_logprobs", "tail_logprob"):
            np.testing.assert_allclose(results[0][name], other[name], atol=1e-5, rtol=0)
    # and they are draws: another seed, other ids; and the same sequence in another shard, the same ids
    reseeded = compute_shard(model, rows, CacheSpec(**{**spec.__dict__, "seed": 4}), 3, torch.device("cpu"))
    assert not np.array_equal(reseeded["tail_ids"], results[0]["tail_ids"])
    shifted = CacheSpec(**{**spec.__dict__, "sequences_per_shard": 4, "n_sequences": 12})
    part = compute_shard(model, rows[4:8], shifted, 2, torch.device("cpu"), shard=1)
    assert np.array_equal(part["tail_ids"], results[0]["tail_ids"][4:8])
