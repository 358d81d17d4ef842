"""The optional `generate` stage under the real `dvc repro`: prompts -> answers -> corpus -> cache -> students
(its own file, so the slow tier runs it beside tests/test_dvc.py's end-to-end test)."""

import re
import shutil

import pytest
import yaml

from tests.test_dvc import TINY_PARAMS, changed_stages, dvc, make_repo, ran_stages


@pytest.mark.slow
def test_dvc_repro_from_prompts_reruns_from_generate_when_a_sampling_setting_changes(tmp_path, chat):
    """generate switched on in params.yaml: `dvc repro` goes prompts -> answers -> corpus -> cache ->
    students; a changed sampling setting re-runs everything from generate, a changed student only itself."""
    repo = make_repo(tmp_path)
    lines = (chat["root"] / "chat.jsonl").read_text().splitlines(keepends=True)
    (repo / "prompts.jsonl").write_text("".join([line for line in lines if '"prompt"' in line][:24]))  # short: a row each
    shutil.copy(chat["root"] / "tagged.jinja", repo / "tagged.jinja")
    teacher = str(chat["teacher"])
    params = {**TINY_PARAMS,
              "generate": {"prompts": "prompts.jsonl", "teacher": teacher, "chat_template": "tagged.jinja",
                           "max_new_tokens": 6, "n": 2, "batch_size": 8, "prompts_per_shard": 8, "device": "cpu"},
              "prepare_corpus": {"source": "texts", "teacher": teacher, "chat_template": "tagged.jinja", "seq_len": 64,
                                 "validation_fraction": 0.25},
              "train_teacher": {"pretrained": teacher},
              "students": {"a": TINY_PARAMS["students"]["a"]}}  # one student: the slow tier's time
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    first = dvc(repo, "repro")
    everything = {"generate", "prepare-corpus", "train-teacher", "cache-logits", "cache-validation",
                  "train-student@a", "evaluate"}
    assert ran_stages(first) == everything
    assert "the teacher's answers in" in first.stdout + first.stderr  # prepare-corpus read the answers, not texts/
    answers = sorted((repo / "data" / "answers" / "answers").glob("part-*.jsonl"))
    assert len(answers) == 3 and sum(len(p.read_text().splitlines()) for p in answers) == 48
    docs = re.search(r"\((\d+) docs\), validation [\d,]+ tokens \((\d+) docs\)", first.stdout + first.stderr)
    assert int(docs[1]) + int(docs[2]) == 48  # every answer is a document of the corpus (a row each, unless dropped)
    assert changed_stages(repo) == set()

    params["generate"]["max_new_tokens"] = 4  # other answers (a setting that leaves them the same re-runs only
    (repo / "params.yaml").write_text(yaml.safe_dump(params))  # generate and prepare-corpus: content hashes)
    assert changed_stages(repo) == {"generate"}
    assert ran_stages(dvc(repo, "repro")) == everything

    params["students"]["a"]["kd_weight"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(dvc(repo, "repro")) == {"train-student@a", "evaluate"}
