"""Every head is the model's own or refused, on both sides: the capture's check (`check_head`) and the
students' (train-student, DistillationTrainer, evaluate, on their first batch). Every head built here
either gives the model's own log-probabilities to HEAD_TOLERANCE (1e-3 nats, fp32 log-softmax) or is
refused in one line."""

import pytest
import torch
from transformers import LlamaForCausalLM

from pipeline.errors import UserError
from pipeline.models.head import HEAD_TOLERANCE, LogitHead, check_head, hidden_and_head, zero3_partitioned

VOCAB = 160
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def family_model(family: str) -> torch.nn.Module:
    """A tiny model of a family, built from a config (nothing downloaded), its head's weights scaled up
    so that its logits spread over ~10 nats: a transform then moves log-probabilities visibly."""
    import transformers as tf

    torch.manual_seed(0)
    build = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SIZES, tie_word_embeddings=True)),
        "granite (divides by 3)": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**SIZES, logits_scaling=3.0)),
        "gemma2 (soft-cap)": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**SIZES, head_dim=8,
                                                                          final_logit_softcapping=4.0)),
        "cohere (scale)": lambda: tf.CohereForCausalLM(tf.CohereConfig(**SIZES, logit_scale=0.3)),
        "hyperclovax (multiplies by logits_scaling)": lambda: (
            tf.HyperCLOVAXForCausalLM(tf.HyperCLOVAXConfig(**SIZES, logits_scaling=0.7))
            if hasattr(tf, "HyperCLOVAXForCausalLM") else pytest.skip("no HyperCLOVA X in this transformers")),
        "falcon_h1 (lm_head_multiplier)": lambda: tf.FalconH1ForCausalLM(tf.FalconH1Config(
            **SIZES, lm_head_multiplier=0.6, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1,
            mamba_d_state=8, mamba_chunk_size=16)),
        "phi (head bias)": lambda: tf.PhiForCausalLM(tf.PhiConfig(**SIZES)),
    }[family]
    model = build().eval()
    with torch.no_grad():  # the head scaled so that the logits' spread (std over the vocabulary) is ~4
        logits = model(input_ids=torch.arange(16)[None] % VOCAB).logits
        model.get_output_embeddings().weight.mul_(4.0 / float(logits.std(-1).mean()))
    return model


FAMILIES = ["llama", "granite (divides by 3)", "gemma2 (soft-cap)", "cohere (scale)",
            "hyperclovax (multiplies by logits_scaling)", "falcon_h1 (lm_head_multiplier)", "phi (head bias)"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_known_familys_head_gives_its_own_log_probabilities(family, dtype):
    model = family_model(family).to(dtype)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    assert check_head(model, ids) <= HEAD_TOLERANCE  # its head on its own input, in one forward
    with torch.no_grad():
        hidden, head = hidden_and_head(model, input_ids=ids)  # what the losses and the capture run
        ours = torch.log_softmax(head.logits(hidden), -1)
        theirs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
    if dtype == torch.float32:  # in bf16 two forwards may round the trunk differently (torch 2.6's CPU kernels)
        assert float((ours - theirs).abs().max()) <= HEAD_TOLERANCE
    # the logits spread enough that a transform this check did not know, 1.5% of them, would show
    own = head.logits(hidden)
    assert float((torch.log_softmax(1.015 * own, -1) - ours).abs().max()) > 10 * HEAD_TOLERANCE


class ScaledLlama(LlamaForCausalLM):
    """A family this version does not know: its forward scales the logits by 1.5%."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.015
        return out


class RulesOutIds(LlamaForCausalLM):
    """A forward that rules out ids 0-9 (their logits -inf), as a model masking unused vocabulary would."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits.clone()
        out.logits[..., :10] = -float("inf")
        return out


class Narrower(LlamaForCausalLM):
    """A forward that cuts its logits to the tokenizer's vocabulary (the head has padded rows)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits[..., : VOCAB - 8]
        return out


class Wider(LlamaForCausalLM):
    """A forward that appends logits the head does not make."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = torch.cat([out.logits, out.logits[..., :4]], dim=-1)
        return out


def unknown(cls) -> torch.nn.Module:
    model = cls(family_model("llama").config).eval()
    model.load_state_dict(family_model("llama").state_dict())
    return model


REFUSED = [(ScaledLlama, "differ by up to"), (RulesOutIds, "rules out 10 ids"),
           (Narrower, f"gives {VOCAB - 8} logits per position but its LM head has {VOCAB} rows"),
           (Wider, f"gives {VOCAB + 4} logits per position")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls, message", REFUSED, ids=[cls.__name__ for cls, _ in REFUSED])
def test_a_head_that_is_not_the_models_own_is_refused_in_one_line(cls, message, dtype):
    model = unknown(cls).to(dtype)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with pytest.raises(UserError, match=message) as refused:
        check_head(model, ids, "the teacher")
    assert "\n" not in str(refused.value) and cls.__name__ in str(refused.value)


def test_the_check_can_see_a_one_and_a_half_percent_scale_in_bf16():
    """What the check measures: the scaled head moves log-probabilities by far more than the tolerance,
    and an honest bf16 head by nothing (the same matmul on the same input, the same rounding)."""
    model = unknown(ScaledLlama).to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden, head = hidden_and_head(model, input_ids=ids)
        ours = torch.log_softmax(head.logits(hidden), -1)
        theirs = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    assert float((ours - theirs).abs().max()) > 10 * HEAD_TOLERANCE
    honest = family_model("llama").to(torch.bfloat16)
    assert check_head(honest, ids) == 0.0


def test_a_head_partitioned_by_deepspeed_zero3_is_refused_at_once():
    """DeepSpeed cannot run here (no accelerator it supports): a ZeRO-3 parameter is recognised by the
    attributes DeepSpeed's partitioning gives every parameter it manages (ds_id, ds_status)."""
    model = family_model("llama")
    weight = model.get_output_embeddings().weight
    assert not zero3_partitioned(weight)
    weight.ds_id, weight.ds_status = 7, "NOT_AVAILABLE"
    assert zero3_partitioned(weight)
    with pytest.raises(UserError, match="partitioned by DeepSpeed ZeRO-3.*use ZeRO stage 1 or 2, or FSDP2"):
        LogitHead.of(model)


# --- the students' side: the same check once, on the first batch -----------------------------------

def scaled_student(vocab: int) -> ScaledLlama:
    """A student of a family this version does not know, for the cache's vocabulary, its logits spread."""
    from tests.conftest import tiny_llama

    model = ScaledLlama(tiny_llama(vocab).config)
    model.load_state_dict(tiny_llama(vocab, sharpness=20.0).state_dict())
    return model


def test_train_student_refuses_a_student_whose_head_is_not_its_own(cache_path, corpus_vocab, tmp_path):
    from pipeline.settings.student import StudentConfig
    from pipeline.train.loader import StreamSpec
    from pipeline.train.student import train_student

    model = scaled_student(corpus_vocab)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    cfg = StudentConfig(max_steps=3, batch_size=4, num_workers=0, device="cpu")
    with pytest.raises(UserError, match=r"the student \(ScaledLlama\).*the students' loss.*differ by up to"):
        train_student(model, StreamSpec(str(cache_path), 4, 0, 16), cfg, torch.device("cpu"), tmp_path / "s", "id",
                      progress=False)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())  # not trained
    assert not (tmp_path / "s" / "checkpoint.pt").exists()


def test_distillation_trainer_refuses_a_student_whose_head_is_not_its_own(cache_path, corpus_vocab, tmp_path):
    from transformers import TrainingArguments

    from pipeline import DistillationTrainer, LogitCache

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, dataloader_num_workers=0, save_strategy="no")
    trainer = DistillationTrainer(model=scaled_student(corpus_vocab), args=args,
                                  train_dataset=LogitCache.open(cache_path).dataset())
    with pytest.raises(UserError, match="DistillationTrainer's loss.*differ by up to"):
        trainer.train()


def test_evaluate_refuses_a_head_that_is_not_its_own_and_a_smaller_vocabulary(corpus_dir, corpus_vocab):
    import numpy as np

    from pipeline.corpus.token_store import open_token_store
    from pipeline.evaluate.scores import evaluate_models
    from tests.conftest import tiny_llama

    rows = np.asarray(open_token_store(corpus_dir)["validation"][:2])
    teacher = tiny_llama(corpus_vocab)
    honest = evaluate_models(teacher, {"s": tiny_llama(corpus_vocab, seed=1)}, rows, 2, torch.device("cpu"),
                             progress=False)
    assert honest["s"]["kl_to_teacher"] > 0
    with pytest.raises(UserError, match=r"student s \(ScaledLlama\).*evaluate.*differ by up to"):
        evaluate_models(teacher, {"s": scaled_student(corpus_vocab)}, rows, 2, torch.device("cpu"), progress=False)
    with pytest.raises(UserError, match=rf"student small's vocabulary \({corpus_vocab - 1:,} ids\) is smaller than the "
                                        rf"teacher's \({corpus_vocab:,}\)"):
        evaluate_models(teacher, {"small": tiny_llama(corpus_vocab - 1)}, rows, 2, torch.device("cpu"),
                        progress=False)
