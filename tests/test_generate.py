"""`pipeline generate`: the teacher's answers as chat records, resumable by whole shards, read by
prepare-corpus with the loss mask on exactly the answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from transformers import AutoTokenizer

from pipeline.corpus.token_store import STORE_NAME
from pipeline.settings.generate import GenerateConfig
from stages import generate as stage
from tests.conftest import run_cli, save_with_tokenizer, tiny_llama
from tests.test_errors import assert_clean_error

SETTINGS = dict(max_new_tokens=6, temperature=1.0, n=2, batch_size=3, prompts_per_shard=4, seed=7, device="cpu")


@pytest.fixture(scope="module")
def answerer(corpus_dir, corpus_vocab, tmp_path_factory):
    """A tiny teacher whose next-token distributions are broad: sampled answers differ."""
    return save_with_tokenizer(tiny_llama(corpus_vocab, seed=3, sharpness=3.0), corpus_dir,
                               tmp_path_factory.mktemp("answerer") / "teacher")


@pytest.fixture(scope="module")
def prompts(chat, tmp_path_factory):
    """Ten prompts: prompt/completion records (the prompt is asked) and conversations (their last
    assistant turn left out)."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(chat["root"].joinpath("chat.jsonl").read_text().splitlines(keepends=True)[1:11]))
    return path


def parts(out) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out / "answers").glob("part-*.jsonl"))}


def test_a_killed_run_resumed_equals_an_uninterrupted_one(chat, answerer, prompts, tmp_path):
    cfg = GenerateConfig(**SETTINGS, chat_template=str(chat["root"] / "tagged.jinja"))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    stage.main(str(answerer), str(prompts), whole, cfg, progress=False)
    stage.main(str(answerer), str(prompts), resumed, cfg, progress=False, stop_after=1)  # killed after a shard
    assert list(parts(resumed)) == ["part-00000.jsonl"]
    (resumed / "answers" / "part-00001.jsonl.partial").write_text('{"half": ')  # killed while writing the next
    stage.main(str(answerer), str(prompts), resumed, cfg, progress=False)
    assert parts(resumed) == parts(whole) and len(parts(whole)) == 3  # 10 prompts, 4 per shard
    records = [json.loads(line) for text in parts(whole).values() for line in text.splitlines()]
    assert len(records) == 20 and [r["prompt_index"] for r in records] == [i // 2 for i in range(20)]
    assert len({r["messages"][-1]["content"] for r in records}) > 10  # sampled: the answers differ
    source = [json.loads(line) for line in prompts.read_text().splitlines()]
    for record in records:
        asked = source[record["prompt_index"]]
        expected = ([{"role": "user", "content": asked["prompt"]}] if "prompt" in asked
                    else [{**m, "weight": 0} if m["role"] == "assistant" else m for m in asked["messages"][:-1]])
        assert record["messages"][:-1] == expected and record["messages"][-1]["role"] == "assistant"
    # another seed: other answers, and the directory is refused without --overwrite
    other = GenerateConfig(**{**SETTINGS, "seed": 8}, chat_template=str(chat["root"] / "tagged.jinja"))
    with pytest.raises(Exception, match="another teacher, prompts or settings"):
        stage.main(str(answerer), str(prompts), whole, other, progress=False)
    stage.main(str(answerer), str(prompts), whole, other, overwrite=True, progress=False)
    assert parts(whole) != parts(resumed)


def test_the_answers_prepare_into_a_chat_corpus_masking_exactly_the_answers(chat, answerer, prompts, tmp_path):
    out = tmp_path / "answers"
    run_cli("generate", "--teacher", answerer, "--prompts", prompts, "--out", out, "--chat-template",
            chat["root"] / "tagged.jinja", "--max-new-tokens", "5", "--temperature", "0.8", "--device", "cpu",
            "--no-progress")
    records = [json.loads(line) for text in parts(out).values() for line in text.splitlines()]
    corpus = tmp_path / "corpus"
    prepared = run_cli("prepare-corpus", "--source", out / "answers", "--out", corpus, "--teacher", chat["teacher"],
            "--chat-template", chat["root"] / "tagged.jinja", "--seq-len", "128", "--validation-fraction", "0",
            "--no-progress")
    store = zarr.open_group(corpus / STORE_NAME, mode="r")
    ids, mask = store["train"][:], store["train_loss_mask"][:]
    assert len(ids) == len(records) == 10, prepared.output
    tokenizer = AutoTokenizer.from_pretrained(chat["teacher"])
    for row, record in zip(range(len(ids)), records):
        answer = record["messages"][-1]["content"]
        assert tokenizer.decode(ids[row][mask[row] == 1]) == answer + "<|endoftext|>", (row, answer)
        assert not record["truncated"] or record["answer_tokens"] == 5
    assert np.all(mask.sum(1) >= 1)


def test_refusals_are_one_line(chat, prompts, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hail"}\nnot json\n')
    common = ("--teacher", chat["teacher"], "--out", tmp_path / "out", "--device", "cpu", "--no-progress")
    assert_clean_error(run_cli("generate", "--prompts", bad, *common, "--chat-template", chat["root"] / "tagged.jinja",
                               expect=2), "bad.jsonl:2", "not valid JSON")
    nothing = tmp_path / "nothing.jsonl"
    nothing.write_text('{"question": "Hail"}\n')
    assert_clean_error(run_cli("generate", "--prompts", nothing, *common, expect=2), "no prompt", "'question'",
                       "--text-field")
    assert_clean_error(run_cli("generate", "--prompts", prompts, *common, expect=2), "no chat template",
                       "--chat-template")
    assert_clean_error(run_cli("generate", "--prompts", prompts, *common, "--max-new-tokens", "0", expect=2),
                       "max_new_tokens must be >= 1")
    assert not (tmp_path / "out" / "answers").exists()


@pytest.mark.slow
def test_two_processes_write_the_same_answers_as_one(chat, answerer, prompts, tmp_path):
    """`--processes 2` (the command starts them; they claim shards) against one process: the same files."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "pipeline", "generate", "--teacher", str(answerer), "--prompts", str(prompts),
            "--chat-template", str(chat["root"] / "tagged.jinja"), "--max-new-tokens", "6", "--n", "2",
            "--batch-size", "3", "--prompts-per-shard", "2", "--device", "cpu", "--no-progress"]
    for name, processes in (("one", "1"), ("two", "2")):
        done = subprocess.run([*args, "--out", str(tmp_path / name), "--processes", processes], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "on 2 x cpu" in done.stdout and done.stdout.count("generate:") == 1  # one summary, by rank 0
    assert parts(tmp_path / "two") == parts(tmp_path / "one") and len(parts(tmp_path / "one")) == 5
    # the process count is not part of what the answers are: one process finds the two's output complete
    again = subprocess.run([*args, "--out", str(tmp_path / "two"), "--processes", "1"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout + again.stderr


def test_prompts_and_answers_in_s3_equal_local(s3, chat, answerer, prompts, tmp_path):
    """Prompts read from, answers written to a real S3 server: the same answers as on local disk, and
    a rerun there finds them complete."""
    from pipeline.io import storage

    remote_prompts, remote = "s3://test-bucket/generate/prompts.jsonl", "s3://test-bucket/generate/out"
    storage.write_bytes(remote_prompts, prompts.read_bytes())
    cfg = GenerateConfig(**SETTINGS, chat_template=str(chat["root"] / "tagged.jinja"))
    stage.main(str(answerer), str(prompts), tmp_path / "local", cfg, progress=False)
    stage.main(str(answerer), remote_prompts, remote, cfg, progress=False, stop_after=1)
    stage.main(str(answerer), remote_prompts, remote, cfg, progress=False)  # resumed
    local = parts(tmp_path / "local")
    for name, text in local.items():
        assert storage.read_text(f"{remote}/answers/{name}") == text, name
    fs, path = storage.filesystem(remote)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{path}/answers")) == sorted(local)  # no .partial left
