"""`pipeline generate` checks what it reads and what it wrote (issue 33, items 3 and 6): a damaged answers
part is answered again by `generate` and refused by `prepare-corpus --answers`; a broken chat template, a
teacher without tokenizer files, a prompt past the teacher's context and a seed out of range are one line."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.generate.output import part_problem
from pipeline.settings.generate import GenerateConfig
from tests.conftest import run_cli, tiny_llama
from tests.test_errors import assert_clean_error
from tests.test_generate import SETTINGS, answer, answerer, parts, prompts  # noqa: F401 (fixtures)


def _flip(text: bytes) -> bytes:
    data = bytearray(text)
    data[len(data) // 2] ^= 0x01
    return bytes(data)


def _edit(text: bytes) -> bytes:
    """Another answer, as valid JSON: what an editor or a script could leave."""
    lines = text.decode().splitlines(keepends=True)
    record = json.loads(lines[0])
    record["messages"][-1]["content"] += " (edited)"
    return "".join([json.dumps(record) + "\n", *lines[1:]]).encode()


DAMAGE = {
    "flipped byte": _flip,
    "truncated": lambda text: text[: len(text) - 7],
    "emptied": lambda text: b"",
    "cut at a line": lambda text: b"".join(text.splitlines(keepends=True)[:-1]),
    "duplicated record": lambda text: text + text.splitlines(keepends=True)[0],
    "edited record": _edit,
}


@pytest.fixture(scope="module")
def answered(chat, answerer, prompts, tmp_path_factory):  # noqa: F811
    """A finished `generate` output (3 parts) and its configuration."""
    cfg = GenerateConfig(**SETTINGS, chat_template=str(chat["root"] / "tagged.jinja"))
    out = tmp_path_factory.mktemp("answered") / "out"
    answer(answerer, str(prompts), out, cfg, progress=False)
    return out, cfg


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_answers_part_is_answered_again_and_refused_by_the_prepare(answered, answerer, prompts, chat,  # noqa: F811
                                                                           tmp_path, capsys, how):
    out, cfg = answered
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    intact = parts(copy)
    part = copy / "answers" / "part-00001.jsonl"
    part.write_bytes(DAMAGE[how](part.read_bytes()))
    assert part_problem(copy, 1) is not None and part_problem(copy, 0) is None
    result = run_cli("prepare-corpus", "--answers", copy, "--out", tmp_path / "corpus", "--teacher", chat["teacher"],
                     "--chat-template", chat["root"] / "tagged.jinja", "--no-progress", expect=2)
    assert_clean_error(result, "part-00001.jsonl is damaged", "run `pipeline generate` again")
    assert not (tmp_path / "corpus").exists()
    capsys.readouterr()
    answer(answerer, str(prompts), copy, cfg, progress=False)
    said = capsys.readouterr()
    assert "part-00001.jsonl is damaged" in said.err and "answering its prompts again" in said.err
    assert "1 shard written now" in said.out and "2 already there" in said.out
    assert parts(copy) == intact  # the same answers again: a shard's answers are a function of the shard


def test_a_part_without_its_checksum_is_not_taken_as_written(answered, answerer, prompts, tmp_path):  # noqa: F811
    """A part whose record of its bytes is missing (killed between the two, or written by an older
    version) or damaged is answered again."""
    out, cfg = answered
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    intact = parts(copy)
    (copy / "checksums" / "part-00000.json").unlink()
    (copy / "checksums" / "part-00002.json").write_text("{")
    assert part_problem(copy, 0) == "no checksum recorded for it"
    assert part_problem(copy, 2) == "its checksum record is damaged"
    answer(answerer, str(prompts), copy, cfg, progress=False)
    assert parts(copy) == intact and all(part_problem(copy, shard) is None for shard in range(3))


BROKEN_TEMPLATES = {
    "a syntax error": ("{% for m in messages %}{{ m['content'] }", "cannot render"),
    "raise_exception": ("{{ raise_exception('no system messages here') }}", "no system messages here"),
    "an undefined name": ("{{ messages[0]['content'].nope.deeper }}", "cannot render"),
    "empty output": ("{% if false %}x{% endif %}", "renders nothing"),
}


@pytest.mark.parametrize("kind", list(BROKEN_TEMPLATES))
def test_a_broken_chat_template_is_one_line(chat, answerer, prompts, tmp_path, kind):  # noqa: F811
    text, needle = BROKEN_TEMPLATES[kind]
    template = tmp_path / "broken.jinja"
    template.write_text(text)
    result = run_cli("generate", "--teacher", answerer, "--prompts", prompts, "--out", tmp_path / "out",
                     "--chat-template", template, "--device", "cpu", "--no-progress", expect=2)
    assert_clean_error(result, "prompt 0: ", needle)
    assert not (tmp_path / "out" / "answers").exists()


def test_a_binary_or_empty_template_file_is_one_line(answerer, prompts, tmp_path):  # noqa: F811
    (tmp_path / "binary.jinja").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (tmp_path / "empty.jinja").write_text("  \n")
    common = ("--teacher", answerer, "--prompts", prompts, "--out", tmp_path / "out", "--device", "cpu", "--no-progress")
    assert_clean_error(run_cli("generate", *common, "--chat-template", tmp_path / "binary.jinja", expect=2),
                       "binary.jinja: not a text file")
    assert_clean_error(run_cli("generate", *common, "--chat-template", tmp_path / "empty.jinja", expect=2),
                       "empty.jinja: the file is empty")


def test_a_teacher_without_tokenizer_files_is_one_line(chat, corpus_vocab, prompts, tmp_path):  # noqa: F811
    teacher = tmp_path / "teacher"
    tiny_llama(corpus_vocab).save_pretrained(teacher)
    result = run_cli("generate", "--teacher", teacher, "--prompts", prompts, "--out", tmp_path / "out",
                     "--chat-template", chat["root"] / "tagged.jinja", "--device", "cpu", "--no-progress", expect=2)
    assert_clean_error(result, str(teacher), "has no tokenizer files")


def test_prompts_past_the_teachers_context_are_refused_with_their_count(chat, answerer, tmp_path):  # noqa: F811
    """The teacher attends to 256 positions: a prompt that fills them, or leaves fewer than max_new_tokens,
    would be answered past its context; they are counted and refused before any work."""
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in
                            ["Hail", "word " * 300, "Speak", "verse " * 280]))
    common = ("--teacher", answerer, "--prompts", long, "--out", tmp_path / "out", "--chat-template",
              chat["root"] / "tagged.jinja", "--device", "cpu", "--no-progress")
    result = run_cli("generate", *common, "--max-new-tokens", "4", expect=2)
    assert_clean_error(result, "2 of 4 prompts do not fit the teacher's context of 256 tokens", "prompt 1",
                       "--max-new-tokens")
    assert not (tmp_path / "out" / "answers").exists()
    short = tmp_path / "short.jsonl"  # fits alone, not with 250 new tokens
    short.write_text(json.dumps({"prompt": "Hail, and well met"}) + "\n")
    result = run_cli("generate", *common[:3], short, *common[4:], "--max-new-tokens", "250", expect=2)
    assert_clean_error(result, "1 of 1 prompts do not fit", "max_new_tokens 250")


@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**70)])
def test_a_seed_out_of_range_is_one_line(chat, answerer, prompts, tmp_path, seed):  # noqa: F811
    result = run_cli("generate", "--teacher", answerer, "--prompts", prompts, "--out", tmp_path / "out",
                     "--chat-template", chat["root"] / "tagged.jinja", "--seed", seed, "--no-progress", expect=2)
    assert_clean_error(result, "seed must be >= 0 and < 2^63", seed)
