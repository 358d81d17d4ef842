"""The public library API (issue 12): dataset, loss, HF Trainer integration, examples, plain-zarr reading."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, Subset
from transformers import TrainingArguments

import pipeline
from pipeline import CacheDataset, DistillationTrainer, LogitCache, collate, distillation_loss
from pipeline.train.loader import StreamSpec, make_loader
from pipeline.distill.losses import SparseTargets
from pipeline.distill.losses import kd_ce_from_logits as internal_loss
from pipeline.settings.student import StudentConfig
from stages import train_student
from pipeline.train.model import build_student

ROOT = Path(__file__).resolve().parent.parent
STUDENT = StudentConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, batch_size=4, max_steps=1, num_workers=0, device="cpu")


def test_public_api_is_declared_and_lazy():
    assert set(pipeline.__all__) == {"LogitCache", "CacheDataset", "collate", "distillation_loss", "loss_counts",
                                     "DistillationLoss", "DistillationTrainer", "linear_distillation_loss",
                                     "hidden_and_head", "LogitHead"}
    code = "import sys, pipeline.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)  # `pipeline --help` stays instant


def test_dataset_items_are_the_cache_rows(cache_path):
    cache = LogitCache.open(cache_path)
    group = zarr.open_group(cache_path, mode="r")
    item = cache.dataset(temperature=2.0)[37]
    np.testing.assert_array_equal(item["input_ids"].numpy(), group["input_ids"][37])
    assert item["labels"][0] == -100  # no token predicts the first: every transformers version counts the rest
    np.testing.assert_array_equal(item["labels"].numpy()[1:], group["input_ids"][37][1:])
    np.testing.assert_array_equal(item["topk_ids"].numpy(), group["topk_ids"][37])
    np.testing.assert_array_equal(item["topk_logprobs"].numpy(), group["topk_logprobs"][37])
    np.testing.assert_array_equal(item["log_partition"].numpy(), group["log_partition"][37][..., 0])
    assert "tail_ids" not in item  # draws are at T = 1
    assert "log_partition" not in cache.dataset()[0] and "tail_ids" in cache.dataset()[0]
    assert item["attention_mask"].sum() == item["input_ids"].numel()

    # any sampler, in worker processes: each sequence once per epoch
    loader = DataLoader(cache.dataset(), batch_size=7, shuffle=True, collate_fn=collate, num_workers=2)
    seen = torch.cat([batch["input_ids"] for batch in loader])
    assert seen.shape == (len(cache), cache.spec.seq_len)
    rows = group["input_ids"][:].astype(np.int64)
    assert sorted(map(tuple, seen.numpy())) == sorted(map(tuple, rows))
    # the stream train-student reads: one epoch is every sequence once too, in whole-chunk windows
    streamed = torch.cat([batch["input_ids"] for batch in cache.stream(8, epochs=1, num_workers=0)])
    assert sorted(map(tuple, streamed.numpy().astype(np.int64))) == sorted(map(tuple, rows))


def test_loss_is_differentiable_and_its_parts_are_detached(cache_path):
    batch = collate([LogitCache.open(cache_path).dataset()[i] for i in range(4)])
    logits = torch.randn(4, batch["input_ids"].shape[1], 320, requires_grad=True)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        out = distillation_loss(logits, batch, kd_weight=0.5, loss=kind)
        assert out.loss.requires_grad and not out.kd.requires_grad and not out.ce.requires_grad
        (grad,) = torch.autograd.grad(out.loss, logits)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        mask = torch.ones_like(batch["input_ids"], dtype=torch.bool)
        want = internal_loss(logits, batch["input_ids"], SparseTargets.from_batch(batch), mask, 0.5, 1.0, kind)
        assert torch.allclose(out.loss, want["loss"]) and torch.allclose(out.kd, want["kd"])
    # masked positions count in neither term: the loss of the first 8 positions alone (of each of its parts)
    half = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    half["attention_mask"][:, 8:] = 0
    cut = {name: value[:, :8] for name, value in batch.items() if value.dim() >= 2}
    masked, alone = distillation_loss(logits, half), distillation_loss(logits[:, :8], cut)
    for part in ("loss", "kd", "ce"):
        torch.testing.assert_close(getattr(masked, part), getattr(alone, part), atol=1e-6, rtol=1e-5)
    scrambled = logits.detach().clone()
    scrambled[:, 8:] = torch.randn_like(scrambled[:, 8:]) * 50  # what masked positions predict does not matter
    torch.testing.assert_close(distillation_loss(scrambled, half).loss, masked.loss, atol=1e-6, rtol=1e-5)
    with pytest.raises(pipeline.errors.UserError, match="loss must be one of"):
        distillation_loss(logits, batch, loss="kl")


def trainer(model, dataset, tmp_path, steps: int, lr: float = 2e-3) -> DistillationTrainer:
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=lr, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, seed=0)
    return DistillationTrainer(model=model, args=args, train_dataset=dataset, kd_weight=STUDENT.kd_weight)


def test_trainer_first_step_equals_train_student_and_the_kl_falls(cache_path, tmp_path):
    train_student.main(cache_path, tmp_path / "ref", STUDENT, progress=False)
    with open(tmp_path / "ref" / "train_log.tsv") as handle:
        reference = float(next(csv.DictReader(handle, delimiter="\t"))["loss"])
    # the batch train-student took first: the same sequences, given to the Trainer
    first = next(iter(make_loader(StreamSpec(str(cache_path), 4, STUDENT.seed, STUDENT.shuffle_window, tail_ids=True), 0)))
    cache = LogitCache.open(cache_path)
    rows = zarr.open_group(cache_path, mode="r")["input_ids"][:].astype(np.int64)
    indices = [int(np.flatnonzero((rows == row.numpy()).all(1))[0]) for row in first["input_ids"]]
    student = build_student(STUDENT, cache.attrs, torch.device("cpu"))
    run = trainer(student, Subset(cache.dataset(), indices), tmp_path, steps=1)
    run.train()
    assert run.state.log_history[0]["loss"] == pytest.approx(reference, rel=1e-4)

    # a few dozen steps bring the student's KL to the teacher down on a fixed batch
    batch = collate([cache.dataset()[i] for i in range(0, 64, 4)])
    student = build_student(STUDENT, cache.attrs, torch.device("cpu"))
    kl = lambda: float(distillation_loss(student(input_ids=batch["input_ids"]).logits, batch, kd_weight=1.0).kd)  # noqa: E731
    before = kl()
    trainer(student, cache.dataset(), tmp_path, steps=30, lr=5e-3).train()
    student.eval()
    assert kl() < 0.85 * before
    assert "kd" in run.state.log_history[0] and "ce" in run.state.log_history[0]


@pytest.mark.parametrize("example", ["plain_loop.py", "hf_trainer.py"])
def test_examples_run_on_a_tiny_cache(example, cache_path, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--cache", str(cache_path),
                             "--steps", "3", *(["--out", str(tmp_path / "hf")] if example == "hf_trainer.py" else [])],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    if example == "plain_loop.py":
        assert re.search(r"step 1: loss \d+\.\d+", result.stdout)
    else:
        assert (tmp_path / "hf" / "model.safetensors").exists()


def test_the_plain_zarr_snippet_in_the_docs_runs(cache_path):
    """docs/cache-format.md shows how to read a batch with zarr + numpy alone; run exactly that code."""
    text = (ROOT / "docs" / "cache-format.md").read_text()
    snippet = re.search(r"<!-- plain-zarr snippet -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert "import pipeline" not in snippet and "from pipeline" not in snippet
    namespace = {"CACHE": str(cache_path)}
    exec(compile(snippet, "cache-format.md", "exec"), namespace)
    group = zarr.open_group(cache_path, mode="r")
    np.testing.assert_array_equal(namespace["ids"], group["topk_ids"][:4])
    np.testing.assert_allclose(namespace["probs"].sum(-1) + np.exp(namespace["tail"]), 1.0, atol=0.05)


@pytest.mark.slow
def test_trainer_on_two_processes_sees_every_sequence_once_per_epoch(cache_path, tmp_path):
    n = 96  # a multiple of 2 processes x 4 sequences: no padding of the last global batch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tests" / "jobs" / "trainer_epoch.py"), str(cache_path), str(n), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and np.isfinite(r["loss"]) for r in ranks)
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == n // 2  # split between the processes, not doubled
    assert sorted(seen) == list(range(n))  # every sequence exactly once


def test_a_batch_carries_its_temperature_and_another_loss_temperature_is_refused(cache_path):
    """Batches read at a stored temperature carry it; a loss at another temperature would combine one
    temperature's normaliser with the other's scaling, and is refused in one line (dataset and stream)."""
    from pipeline.errors import UserError

    cache = LogitCache.open(cache_path)  # stores temperatures 1 and 2
    batch = collate([cache.dataset(temperature=2.0)[i] for i in range(3)])
    assert torch.equal(batch["temperature"], torch.full((3,), 2.0))
    logits = torch.randn(3, batch["input_ids"].shape[1], cache.spec.vocab_size)
    assert torch.isfinite(distillation_loss(logits, batch, temperature=2.0).loss)
    with pytest.raises(UserError, match=r"tempered targets are for temperature \[2.0\], the loss.s is 0.5"):
        distillation_loss(logits, batch, temperature=0.5)
    streamed = next(cache.stream(3, temperature=2.0, num_workers=0))
    assert torch.equal(streamed["temperature"], torch.full((3,), 2.0))
    with pytest.raises(UserError, match="the loss's is 1.0"):
        distillation_loss(logits, streamed, temperature=1.0)


def test_the_trainer_at_a_temperature_the_cache_did_not_store_says_so_once(cache_path, capsys, tmp_path):
    from transformers import TrainingArguments

    cache = LogitCache.open(cache_path)
    student = build_student(STUDENT, cache.attrs, torch.device("cpu"))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    DistillationTrainer(model=student, args=args, train_dataset=cache.dataset(temperature=0.5), temperature=0.5)
    assert capsys.readouterr().err.count("temperature 0.5 is not among the cache's stored temperatures") == 1
    DistillationTrainer(model=student, args=args, train_dataset=cache.dataset(temperature=2.0), temperature=2.0)
    assert "not among" not in capsys.readouterr().err
