"""Training a student from the cache: it learns the teacher, resumes exactly, refuses mismatches."""

import shutil

import pytest
import torch
import zarr
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cache.format import DONE
from pipeline.settings.student import StudentConfig
from pipeline.train.log import read_log
from stages import train_student
from tests.conftest import run_cli, save_with_tokenizer, tiny_llama
from tests.test_errors import assert_clean_error

TINY = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, batch_size=8, shuffle_window=16, num_workers=0, device="cpu")


def without_timing(out) -> list[dict]:
    return [{name: value for name, value in row.items() if name != "tokens_per_s"} for row in read_log(out)]


def test_student_kl_to_teacher_falls(cache_path, tmp_path):
    cfg = StudentConfig(**TINY, max_steps=40, kd_weight=1.0, lr=1e-2, warmup_steps=5, checkpoint_every=1000)
    metrics = train_student.main(cache_path, tmp_path / "s", cfg, progress=False)
    log = (tmp_path / "s" / "train_log.tsv").read_text().splitlines()[1:]
    kd = [float(line.split("\t")[3]) for line in log]
    assert len(kd) == 40 and metrics["finished"]
    assert sum(kd[-5:]) / 5 < 0.5 * sum(kd[:5]) / 5, kd


def test_saved_student_loads_with_plain_transformers_and_generates(cache_path, tmp_path):
    cfg = StudentConfig(**TINY, max_steps=3, checkpoint_every=1000)
    train_student.main(cache_path, tmp_path / "s", cfg, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "s")
    prompt = tokenizer("To be", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    n_prompt = prompt["input_ids"].shape[1]
    assert generated.shape[1] == n_prompt + 5
    assert torch.equal(generated[0, :n_prompt], prompt["input_ids"][0])
    assert tokenizer.decode(generated[0, :n_prompt]) == "To be"  # the corpus's tokenizer travelled with the student
    assert tokenizer.decode(generated[0]).startswith("To be") and len(tokenizer.decode(generated[0])) > len("To be")


@pytest.mark.parametrize("kd_weight, temperature", [(0.5, 1.0), (0.7, 2.0)])
def test_resume_after_a_kill_continues_at_the_same_step_and_position(cache_path, tmp_path, kd_weight, temperature):
    cfg = StudentConfig(**TINY, max_steps=8, checkpoint_every=3, kd_weight=kd_weight, temperature=temperature)
    train_student.main(cache_path, tmp_path / "whole", cfg, progress=False)

    killed = train_student.main(cache_path, tmp_path / "resumed", cfg, progress=False, stop_after=5)
    assert not killed["finished"] and (tmp_path / "resumed" / "checkpoint.pt").exists()
    assert len((tmp_path / "resumed" / "train_log.tsv").read_text().splitlines()) == 1 + 5
    # the "kill" lost steps 4-5; the rerun restarts from the step-3 checkpoint
    resumed = train_student.main(cache_path, tmp_path / "resumed", cfg, progress=False)
    assert resumed["finished"] and resumed["steps"] == 8
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()

    assert without_timing(tmp_path / "resumed") == without_timing(tmp_path / "whole")
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_student_with_another_vocab_is_refused(cache_path, corpus_dir, corpus_vocab, tmp_path):
    other = save_with_tokenizer(tiny_llama(corpus_vocab + 13), corpus_dir, tmp_path / "other")
    result = run_cli("train-student", "--cache", cache_path, "--out", tmp_path / "s", "--init-from", other, expect=2)
    assert_clean_error(result, f"student vocab {corpus_vocab + 13} != cache vocab {corpus_vocab}")
    assert not (tmp_path / "s").exists()


def test_cache_with_missing_shards_is_refused(cache_path, tmp_path):
    broken = tmp_path / "broken.zarr"
    shutil.copytree(cache_path, broken)
    zarr.open_group(broken, mode="r+")[DONE][1] = 0
    result = run_cli("train-student", "--cache", broken, "--out", tmp_path / "s", expect=2)
    assert_clean_error(result, "1 of", "shards are not written yet", "re-run `pipeline cache-logits`")
    assert not (tmp_path / "s").exists()


def test_unknown_variant_is_refused(cache_path, tmp_path):
    (tmp_path / "p.yaml").write_text("students:\n  small: {d_model: 32}\n")
    result = run_cli("train-student", "--cache", cache_path, "--out", tmp_path / "s", "--variant", "big",
                     "--params", tmp_path / "p.yaml", expect=2)
    assert_clean_error(result, "no student variant 'big'", "small")


def test_online_teacher_with_full_targets_matches_a_full_k_cache(llama_teacher, corpus_dir, corpus_vocab, tmp_path):
    """Online KD (teacher in the loop, all V outcomes) and a k = V cache give the same training run,
    up to the cache's fp16 rounding of log-probs."""
    from pipeline.settings.cache import CacheConfig
    from stages import cache_logits

    full = tmp_path / "full.zarr"
    cache_logits.main(str(llama_teacher), corpus_dir, full,
                      CacheConfig(k=corpus_vocab, batch_size=8, sequences_per_chunk=4, sequences_per_shard=16, tail_samples=0),
                      progress=False)
    cfg = StudentConfig(**TINY, max_steps=6, kd_weight=1.0, checkpoint_every=1000)
    train_student.main(full, tmp_path / "cached", cfg, progress=False)
    online = StudentConfig(**{**TINY, "online_teacher": str(llama_teacher)}, max_steps=6, kd_weight=1.0, checkpoint_every=1000)
    train_student.main(full, tmp_path / "online", online, progress=False)
    kd = {name: [float(line.split("\t")[3]) for line in (tmp_path / name / "train_log.tsv").read_text().splitlines()[1:]]
          for name in ("cached", "online")}
    assert len(kd["online"]) == 6
    for a, b in zip(kd["cached"], kd["online"]):
        assert abs(a - b) <= 2e-3 * max(1.0, abs(b)), kd


def test_tail_draws_reach_the_loss_and_can_be_turned_off(cache_path, llama_teacher, corpus_dir, tmp_path):
    """A cache with tail draws: the stream carries them and they change the update; use_tail_samples
    false gives the one-bucket tail (the same as a cache without draws)."""
    from pipeline.distill.losses import SparseTargets
    from pipeline.train.loader import StreamSpec, make_loader

    targets = SparseTargets.from_batch(next(iter(make_loader(StreamSpec(str(cache_path), 4, 0, 16, tail_ids=True), 0))))
    assert targets.tail_ids.shape == (*targets.tail_logprob.shape, 2)
    weights = {}
    for use in (True, False):
        cfg = StudentConfig(**TINY, max_steps=2, kd_weight=1.0, checkpoint_every=1000, use_tail_samples=use)
        train_student.main(cache_path, tmp_path / str(use), cfg, progress=False)
        weights[use] = load_file(tmp_path / str(use) / "model.safetensors")
    assert any(not torch.equal(weights[True][name], weights[False][name]) for name in weights[True])
    # without them, exactly a student of the same teacher's cache captured without draws
    from pipeline.settings.cache import CacheConfig
    from stages import cache_logits

    group = zarr.open_group(cache_path, mode="r")
    plain = tmp_path / "no-draws.zarr"
    cache_logits.main(str(llama_teacher), corpus_dir, plain,
                      CacheConfig(k=8, batch_size=8, sequences_per_chunk=4, sequences_per_shard=16,
                                  temperatures=tuple(group.attrs["temperatures"]), tail_samples=0), progress=False)
    cfg = StudentConfig(**TINY, max_steps=2, kd_weight=1.0, checkpoint_every=1000, use_tail_samples=True)
    train_student.main(plain, tmp_path / "plain", cfg, progress=False)
    without = load_file(tmp_path / "plain" / "model.safetensors")
    assert all(torch.equal(without[name], weights[False][name]) for name in without)


def test_tail_draws_outside_forward_kl_at_t1_fall_back_with_a_note(cache_path, tmp_path, capsys):
    cfg = StudentConfig(**TINY, max_steps=1, checkpoint_every=1000, temperature=2.0)
    train_student.main(cache_path, tmp_path / "s", cfg, progress=False)
    assert "serve forward KL at temperature 1 only" in capsys.readouterr().err


def test_fsdp_finds_the_blocks_of_any_family():
    """FSDP2 shards each decoder block: found by transformers' own `_no_split_modules`, not by a Llama's
    attribute path (a GPT-2 student has no model.layers)."""
    from tests.conftest import tiny_gpt2
    from pipeline.train.parallel import decoder_blocks

    llama, gpt2 = tiny_llama(64), tiny_gpt2(64)
    assert decoder_blocks(llama) == list(llama.model.layers)
    assert decoder_blocks(gpt2) == list(gpt2.transformer.h) and len(decoder_blocks(gpt2)) == 2
