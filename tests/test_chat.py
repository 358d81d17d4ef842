"""Chat data: conversations rendered with a chat template, a loss mask on the assistant's tokens,
kept by the cache and used by the losses and `evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoTokenizer

from pipeline.api import LogitCache, collate, distillation_loss, loss_counts
from pipeline.evaluate.scores import evaluate_models
from pipeline.corpus.loss_mask import learned_positions
from pipeline.models.load import load_causal_lm
from pipeline.settings.cache import CacheConfig
from pipeline.corpus.token_store import STORE_NAME
from stages import cache_logits
from tests.conftest import CHAT_SEQ_LEN as SEQ_LEN, TAGGED, run_cli

def test_conversations_are_rendered_with_a_mask_on_the_assistant_tokens_only(chat):
    store = zarr.open_group(chat["corpus"] / STORE_NAME, mode="r")
    assert store.attrs["kind"] == "chat"
    rows, masks = store["train"][:], store["train_loss_mask"][:]
    tokenizer = AutoTokenizer.from_pretrained(chat["teacher"])
    tokenizer.chat_template = TAGGED
    first = json.loads((chat["root"] / "chat.jsonl").read_text().splitlines()[0])
    rendered = tokenizer.apply_chat_template(first["messages"], tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    # one conversation per row (the first record lands in train or validation: find it), right-padded with eos
    splits = {"train": (rows, masks), "validation": (store["validation"][:], store["validation_loss_mask"][:])}
    n = min(len(rendered["input_ids"]), SEQ_LEN)
    found = [(r, m) for rs, ms in splits.values() for r, m in zip(rs, ms) if list(r[:n]) == rendered["input_ids"][:n]]
    assert found and n == len(rendered["input_ids"]), "the first conversation is not a row of its own"
    row, mask = found[0]
    assert list(mask[:n]) == rendered["assistant_masks"] and not mask[n:].any()
    # the masked tokens are exactly the assistant's turns, each ended by eos: nothing of the prompts
    turns = [m["content"] for m in first["messages"] if m["role"] == "assistant"]
    # (a token holding the space before a turn is the turn's: BPE joins a space to the word after it)
    assert [part.strip() for part in tokenizer.decode(row[mask == 1]).split("<|endoftext|>")] == [*turns, ""]
    # padding: eos with mask 0 (the known row's, exactly; every row's trailing eos with mask 0 cover the
    # padding counted); every row has something to learn
    eos = store.attrs["eos_id"]
    assert (row[n:] == eos).all() and len(row) - n == SEQ_LEN - n

    def trailing_padding(ids, mask) -> int:
        pad = (ids == eos) & (mask == 0)
        return len(pad) - int(np.flatnonzero(~pad).max()) - 1 if (~pad).any() else len(pad)

    assert sum(trailing_padding(r, m) for r, m in zip(rows, masks)) >= store.attrs["counts"]["train"]["padding"]
    assert all(learned_positions(m).any() for m in masks)
    assert set(np.unique(masks)) == {0, 1} and store.attrs["counts"]["train"]["padding"] > 0
    # a template without generation tags: the same masks, found from the renderings of each turn
    plain = zarr.open_group(chat["plain"] / STORE_NAME, mode="r")
    np.testing.assert_array_equal(plain["train"][:], rows)
    np.testing.assert_array_equal(plain["train_loss_mask"][:], masks)


@pytest.fixture(scope="module")
def chat_caches(chat) -> dict[str, Path]:
    out = {}
    for name, masked in (("sparse", False), ("full", True)):
        out[name] = chat["root"] / f"{name}.zarr"
        cfg = CacheConfig(k=8, batch_size=16, sequences_per_chunk=8, sequences_per_shard=32, tail_samples=2,
                          masked_targets=masked)
        cache_logits.main(str(chat["teacher"]), chat["corpus"], out[name], cfg, progress=False)
    return out


def test_the_cache_keeps_the_mask_and_stores_targets_only_where_they_count(chat, chat_caches):
    sparse, full = (zarr.open_group(chat_caches[n], mode="r") for n in ("sparse", "full"))
    mask = sparse["loss_mask"][:]
    np.testing.assert_array_equal(mask, zarr.open_group(chat["corpus"] / STORE_NAME, mode="r")["train_loss_mask"][:])
    learned = learned_positions(mask)
    for name in ("topk_ids", "topk_logprobs", "tail_logprob", "tail_ids"):
        np.testing.assert_array_equal(sparse[name][:][learned], full[name][:][learned])  # the same targets where used
        assert not sparse[name][:][~learned].any() and full[name][:][~learned].any()  # fill value elsewhere
    sizes = {n: sum(f.stat().st_size for f in chat_caches[n].rglob("*") if f.is_file()) for n in chat_caches}
    assert sizes["sparse"] < 0.8 * sizes["full"]


def test_a_students_loss_ignores_every_masked_out_target(chat_caches):
    dataset = LogitCache.open(chat_caches["full"]).dataset()
    batch = collate([dataset[i] for i in range(6)])
    assert (batch["labels"][batch["loss_mask"] == 0] == -100).all()  # for HF models' own loss too
    logits = torch.randn(*batch["input_ids"].shape, 400, requires_grad=True)
    changed = {k: v.clone() for k, v in batch.items()}
    unused = ~learned_positions(batch["loss_mask"])
    changed["topk_logprobs"][unused] = -1.0
    changed["tail_logprob"][unused] = -0.1
    changed["topk_ids"][unused] = torch.randint(0, 400, changed["topk_ids"][unused].shape)
    grads = []
    for kind in ("forward_kl", "jsd"):
        for b in (batch, changed):
            logits.grad = None
            out = distillation_loss(logits, b, kd_weight=0.5, loss=kind)
            out.loss.backward()
            grads.append((out.loss.detach(), logits.grad.clone()))
        torch.testing.assert_close(grads[-2], grads[-1], rtol=0, atol=0)
    # a changed target where the loss counts does change it
    changed["topk_logprobs"][~unused] = -1.0
    assert not torch.allclose(distillation_loss(logits, changed).loss, distillation_loss(logits, batch).loss)


def test_the_step_mean_is_over_all_its_positions_however_the_batch_is_split(chat_caches):
    """Micro-batches (or processes) with different numbers of assistant tokens: dividing each one's sums
    by the step's count (loss_counts) gives the whole batch's mean, not a mean of means."""
    dataset = LogitCache.open(chat_caches["sparse"]).dataset()
    batch = collate([dataset[i] for i in range(8)])
    # seeded; the halves' losses differ (sharper logits in the first), so the two means must differ
    logits = torch.randn(*batch["input_ids"].shape, 400, generator=torch.Generator().manual_seed(0))
    logits[:4] *= 4
    parts = [{k: v[i : i + 4] for k, v in batch.items()} for i in (0, 4)]
    assert loss_counts(parts[:1])[0] != loss_counts(parts[1:])[0]
    counts = loss_counts(parts) / 2
    split = sum(distillation_loss(logits[i : i + 4], p, counts=counts).loss / 2 for i, p in zip((0, 4), parts))
    torch.testing.assert_close(split, distillation_loss(logits, batch).loss, rtol=1e-5, atol=1e-6)
    mean_of_means = sum(distillation_loss(logits[i : i + 4], p).loss / 2 for i, p in zip((0, 4), parts))
    assert abs(float(mean_of_means - split)) > 1e-4


def test_evaluate_scores_the_assistant_tokens_only(chat):
    store = zarr.open_group(chat["corpus"] / STORE_NAME, mode="r")
    rows, mask = store["validation"][:], store["validation_loss_mask"][:]
    teacher = load_causal_lm(str(chat["teacher"]), torch.device("cpu"))
    scored = evaluate_models(teacher, {}, rows, 8, torch.device("cpu"), progress=False, loss_mask=mask)["teacher"]
    with torch.no_grad():
        ids = torch.from_numpy(rows.astype(np.int64))
        logp = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    learned = torch.from_numpy(learned_positions(mask))[:, :-1]
    torch.testing.assert_close(torch.tensor(scored["cross_entropy"]), nll[learned].mean(), rtol=1e-5, atol=1e-6)
    assert abs(scored["cross_entropy"] - float(nll.mean())) > 1e-3  # not the all-positions mean


def test_the_hf_trainer_takes_the_step_mean_over_its_accumulated_micro_batches(chat_caches, tmp_path):
    """gradient_accumulation_steps 2 x batch 2 = one batch of 4: the Trainer's count of the step's label
    positions divides each micro-batch's sums (plain SGD, no clipping: a wrong scale would show)."""
    from transformers import TrainingArguments

    from pipeline.hf import DistillationTrainer
    from pipeline.models.load import build_llama

    cache = LogitCache.open(chat_caches["sparse"])
    dataset = torch.utils.data.Subset(cache.dataset(), [0, 1, 2, 3])
    weights = []
    for batch, accumulate in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        student = build_llama(cache.spec.vocab_size, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=64)
        args = TrainingArguments(output_dir=str(tmp_path / f"hf{batch}"), max_steps=1, per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulate, optim="sgd", learning_rate=1.0, max_grad_norm=0,
                                 lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, dataloader_num_workers=0, seed=0)
        DistillationTrainer(model=student, args=args, train_dataset=dataset, kd_weight=0.5).train()
        weights.append({name: p.detach().clone() for name, p in student.named_parameters()})
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=2e-6, msg=name)


def test_train_student_and_evaluate_run_on_a_chat_cache(chat, chat_caches, tmp_path):
    """The stages end to end on chat data: the student trains from the masked cache, and evaluate
    scores the positions that predict an assistant token (and says so)."""
    from pipeline.settings.evaluate import EvalConfig
    from pipeline.settings.student import StudentConfig
    from stages import evaluate, train_student

    cfg = StudentConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64, batch_size=4, shuffle_window=16, num_workers=0,
                        device="cpu", max_steps=3, warmup_steps=1)
    train_student.main(chat_caches["sparse"], tmp_path / "students" / "s", cfg, progress=False)
    metrics = evaluate.main(str(chat["teacher"]), chat["corpus"], tmp_path / "students", tmp_path / "reports",
                            EvalConfig(device="cpu"))
    mask = zarr.open_group(chat["corpus"] / STORE_NAME, mode="r")["validation_loss_mask"][:]
    assert metrics["evaluated_tokens"] == int(learned_positions(mask).sum()) < mask.size
    assert 1.0 < metrics["students"]["s"]["perplexity"] < 1e4
    assert "predicting an assistant token" in (tmp_path / "reports" / "report.md").read_text()


def test_bad_chat_input_is_one_line(chat, tmp_path):
    chat_line = json.dumps({"messages": [{"role": "user", "content": "Hail"}, {"role": "assistant", "content": "Hi"}]})
    cases = {
        "mixed.jsonl": ([chat_line, json.dumps({"text": "plain prose"})], "a corpus is either text or chat"),
        "no-template.jsonl": ([chat_line] * 3, "chat records need a chat template"),
        "no-assistant.jsonl": ([json.dumps({"messages": [{"role": "user", "content": "Hail"}]})],
                               "no-assistant.jsonl:1: a conversation without an assistant turn"),
    }
    for name, (lines, message) in cases.items():
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        template = [] if name == "no-template.jsonl" else ["--chat-template", chat["root"] / "tagged.jinja"]
        result = run_cli("prepare-corpus", "--source", tmp_path / name, "--out", tmp_path / f"out-{name}",
                         "--vocab-size", 300, "--seq-len", 8, "--no-progress", *template, expect=2)
        assert message in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / f"out-{name}").exists()


TRIMMED = TAGGED.replace("{{ m['content'] }}<|endoftext|>", "{{ m['content'] | trim }}<|endoftext|>")


@pytest.mark.parametrize("template", [TAGGED, TAGGED.replace("{% generation %}", "").replace("{% endgeneration %}", ""),
                                      TRIMMED], ids=["tagged", "plain", "trimmed"])
def test_a_truncated_answer_is_learned_up_to_its_cut_and_not_its_end_of_turn(chat, template):
    """A record `pipeline generate` marked truncated renders as it would unmarked; its mask is the same
    but for the end of turn the template adds after the answer (eos here), which the answer never reached."""
    from pipeline.corpus.chat import ChatRenderer, messages_of

    hf = AutoTokenizer.from_pretrained(chat["teacher"])
    hf.chat_template = template
    renderer = ChatRenderer(hf)
    record = {"messages": [{"role": "user", "content": "Hail"}, {"role": "assistant", "content": "Good morrow, "}]}
    whole = renderer.render(messages_of({**record, "truncated": False}), "whole")
    cut = renderer.render(messages_of({**record, "truncated": True}), "cut")
    np.testing.assert_array_equal(cut.ids, whole.ids)
    eos = hf.convert_tokens_to_ids("<|endoftext|>")
    assert list(np.flatnonzero(whole.mask > cut.mask)) == [len(whole.ids) - 1] and whole.ids[-1] == eos
    assert not (cut.mask > whole.mask).any()
    assert hf.decode(cut.ids[cut.mask == 1]) + "<|endoftext|>" == hf.decode(whole.ids[whole.mask == 1])


def test_a_records_truncated_mark_goes_to_its_last_answer_only():
    from pipeline.corpus.chat import messages_of

    earlier = {"role": "assistant", "content": "Good morrow.", "weight": 0}
    record = {"messages": [{"role": "user", "content": "Hail"}, earlier, {"role": "user", "content": "Speak"},
                           {"role": "assistant", "content": "I will"}], "truncated": True}
    messages = messages_of(record)
    assert [m.get("truncated", False) for m in messages] == [False, False, False, True]
    assert "truncated" not in record["messages"][-1]  # the record itself is left as it was
    assert messages_of({**record, "truncated": False}) == record["messages"]
    completion = messages_of({"prompt": "Hail", "completion": "Good", "truncated": True})
    assert completion == [{"role": "user", "content": "Hail"},
                          {"role": "assistant", "content": "Good", "truncated": True}]


def test_a_template_that_rewrites_a_truncated_answer_is_refused_in_one_line(chat):
    from pipeline.corpus.chat import ChatRenderer, messages_of
    from pipeline.errors import UserError

    hf = AutoTokenizer.from_pretrained(chat["teacher"])
    hf.chat_template = TAGGED.replace("{{ m['content'] }}<|endoftext|>", "{{ m['content'] | upper }}<|endoftext|>")
    record = {"prompt": "Hail", "completion": "Good morrow", "truncated": True}
    with pytest.raises(UserError, match="r:1: the chat template changes the text of a truncated answer"):
        ChatRenderer(hf).render(messages_of(record), "r:1")


def test_a_truncated_answer_of_spaces_is_learned_as_such_and_an_empty_one_leaves_nothing_to_learn(chat):
    """A teacher cut off after spaces taught spaces; an empty cut answer (or spaces a template trims) has
    nothing to learn: its row holds no learned token (prepare-corpus drops it), and that is no error."""
    from pipeline.corpus.chat import ChatRenderer, messages_of

    hf = AutoTokenizer.from_pretrained(chat["teacher"])
    for template, completion, learned in ((TAGGED, "   ", "   "), (TRIMMED, "   ", ""), (TAGGED, "", "")):
        hf.chat_template = template
        cut = ChatRenderer(hf).render(messages_of({"prompt": "Hail", "completion": completion, "truncated": True}), "r")
        assert hf.decode(cut.ids[cut.mask == 1]).strip(" ") == "" and bool(cut.mask.any()) == bool(learned)
