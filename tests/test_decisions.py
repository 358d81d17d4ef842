"""The decisions with many outcomes, as tables: opening a cache (create, resume, regrow, start over,
refuse) and resuming a student's checkpoint (fresh, resume, discard, refuse). Each row is one case
with the outcome and a word of its reason; the functions are pure, so the table is the specification."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.format import CacheSpec, shard_row_digest
from pipeline.cache.store import Found, decide_opening
from pipeline.config import as_dict
from pipeline.settings.student import StudentConfig
from pipeline.train.checkpoint import decide_resume, mismatch, owner_problem

SPEC = CacheSpec(teacher_fingerprint="teacher", tokenizer_fingerprint="tok", corpus_fingerprint="corpus-a",
                 split="train", vocab_size=100, k=4, seq_len=8, n_sequences=40, sequences_per_shard=16,
                 sequences_per_chunk=4, temperatures=(1.0,), eos_id=0)  # shards: rows 0-16, 16-32, 32-40
OLD_ROWS = np.arange(40, dtype=np.uint64) * 7 + 1  # the corpus rows' digests when the cache was captured
GROWN = replace(SPEC, corpus_fingerprint="corpus-b", n_sequences=56)  # 16 rows more: shards 32-48, 48-56
GROWN_ROWS = np.concatenate([OLD_ROWS, np.arange(16, dtype=np.uint64) + 1000])
EDITED_ROWS = GROWN_ROWS.copy()
EDITED_ROWS[5] = 99  # a row of the complete full shard 0 changed: another corpus


def cache(spec: CacheSpec = SPEC, **attrs) -> Found:
    """A complete cache of `spec` (attributes overridden by `attrs`), its shards' row digests recorded."""
    recorded = np.array([shard_row_digest(OLD_ROWS[lo:hi]) for lo, hi in map(spec.shard_rows, range(spec.n_shards))])
    return Found("cache", {**spec.identity(), "eos_id": spec.eos_id, **attrs}, np.ones(spec.n_shards, bool), recorded)


OPENINGS = [
    # (case, found, asked, corpus row digests, flags, action, a word of the reason)
    ("nothing there", Found("vacant"), SPEC, None, {}, "create", ""),
    ("someone else's directory", Found("foreign"), SPEC, None, {"overwrite": True}, "refuse", "not a logit cache"),
    ("a creation that died", Found("creating"), SPEC, None, {}, "recreate", "died while creating"),
    ("the same cache", cache(), SPEC, None, {}, "resume", ""),
    ("the same cache, --overwrite", cache(), SPEC, None, {"overwrite": True}, "recreate", ""),
    ("another k", cache(k=8), SPEC, None, {}, "refuse", "made by another capture"),
    ("another k, --restart-on-mismatch", cache(k=8), SPEC, None, {"restart_on_mismatch": True}, "recreate",
     "starting over"),
    ("another dtype", cache(teacher_dtype="bfloat16"), SPEC, None, {}, "refuse", "another teacher dtype"),
    ("another dtype, --force", cache(teacher_dtype="bfloat16"), SPEC, None, {"force_compute": True}, "resume",
     "as forced"),
    ("another dtype, --restart-on-mismatch", cache(teacher_dtype="bfloat16"), SPEC, None,
     {"restart_on_mismatch": True}, "recreate", "starting over"),
    ("another dtype and k, --force", cache(teacher_dtype="bfloat16", k=8), SPEC, None, {"force_compute": True},
     "refuse", "made by another capture"),
    ("a grown corpus", cache(), GROWN, GROWN_ROWS, {}, "regrow", "keeping 2 complete shards, capturing 2"),
    ("a grown corpus, digests not given", cache(), GROWN, None, {}, "refuse", "made by another capture"),
    ("an edited corpus", cache(), GROWN, EDITED_ROWS, {}, "refuse", "other corpus rows"),
    ("an edited corpus, --restart-on-mismatch", cache(), GROWN, EDITED_ROWS, {"restart_on_mismatch": True},
     "recreate", "other corpus rows"),
    ("a corpus cut after its second shard", cache(), replace(SPEC, corpus_fingerprint="corpus-c", n_sequences=32),
     OLD_ROWS[:32], {}, "regrow", "keeping 2 complete shards, capturing 0"),
    ("a corpus cut inside a full shard", cache(), replace(SPEC, corpus_fingerprint="corpus-c", n_sequences=30),
     OLD_ROWS[:30], {}, "refuse", "other corpus rows"),
]


@pytest.mark.parametrize("case, found, asked, rows, flags, action, reason", OPENINGS, ids=[row[0] for row in OPENINGS])
def test_opening_a_cache(case, found, asked, rows, flags, action, reason):
    opening = decide_opening(found, asked, rows, "out.zarr", **flags)
    assert opening.action == action, (case, opening)
    assert reason in opening.reason, (case, opening.reason)
    if action == "regrow":  # the complete shards over the same rows are kept; the partial last one is not
        assert opening.keep.tolist() == [True, True, False]


CFG = StudentConfig(max_steps=10)
PATH = Path("out/checkpoint.pt")


def payload(**changes) -> dict:
    return {"config": as_dict(CFG), "cache_identity": "cache-1", "global_batch": 16, "processes": 1, "step": 4,
            **changes}


MISMATCHES = [
    ("this run's", payload(), None),
    ("another cache", payload(cache_identity="cache-2"), "another cache"),
    ("another learning rate", payload(config=as_dict(replace(CFG, lr=1.0))), "other settings (lr)"),
    ("another batch size, same global batch", payload(config=as_dict(replace(CFG, batch_size=8, grad_accum=2))), None),
    ("another global batch", payload(global_batch=8), "global batch of 8 sequences"),
]


@pytest.mark.parametrize("case, found, reason", MISMATCHES, ids=[row[0] for row in MISMATCHES])
def test_whose_checkpoint(case, found, reason):
    said = mismatch(found, CFG, "cache-1", batch=16, processes=1, path=PATH)
    assert (said is None) if reason is None else (reason in said), (case, said)


RESUMES = [
    # (case, found, its mismatch, resume (no --overwrite), restart_on_mismatch, a checkpoint.pt.tmp there,
    #  action, a word of the reason)
    ("no checkpoint", None, None, True, False, False, "fresh", "no checkpoint"),
    ("this run's", payload(), None, True, False, False, "resume", "step 4"),
    ("this run's, --overwrite", payload(), None, False, False, False, "fresh", "--overwrite"),
    ("another run's", payload(), "other settings (lr)", True, False, False, "refuse", "use --overwrite"),
    ("another run's, --restart-on-mismatch", payload(), "other settings (lr)", True, True, False, "discard", "(lr)"),
    ("unreadable", "not a readable checkpoint", None, True, False, False, "refuse", "not a readable checkpoint"),
    ("unreadable, --restart-on-mismatch", "not a readable checkpoint", None, True, True, False, "discard", "readable"),
    ("unreadable, --overwrite", "not a readable checkpoint", None, False, False, False, "fresh", "--overwrite"),
    # killed (or out of disk) while writing a checkpoint: its temporary file is nothing to resume from
    ("killed writing the first checkpoint", None, None, True, False, True, "fresh", "starting cleanly"),
    ("killed writing the first, --restart-on-mismatch", None, None, True, True, True, "fresh", "starting cleanly"),
    ("killed writing a later one", payload(), None, True, False, True, "resume", "step 4"),
    ("killed writing one, --overwrite", payload(), None, False, False, True, "fresh", "--overwrite"),
    ("killed writing one of another run's", payload(), "other settings (lr)", True, False, True, "refuse", "(lr)"),
]


@pytest.mark.parametrize("case, found, why_not, resume, restart, partial, action, reason", RESUMES,
                         ids=[row[0] for row in RESUMES])
def test_resuming_a_student(case, found, why_not, resume, restart, partial, action, reason):
    decision = decide_resume(found, why_not, resume, restart, partial)
    assert decision.action == action, (case, decision)
    assert reason in decision.reason, (case, decision.reason)


OWNERS = [
    # (case, the --out recorded in the checkpoint, this run's --out, a word of the problem, or None)
    ("this student's", "/data/students/a", "/data/students/a", None),
    ("recorded before owners were", None, "/data/students/a", None),
    ("another student's", "/data/students/a", "/data/students/b", "belongs to the student /data/students/a"),
]


@pytest.mark.parametrize("case, recorded, out, problem", OWNERS, ids=[row[0] for row in OWNERS])
def test_whose_student_a_checkpoint_is(case, recorded, out, problem):
    said = owner_problem(recorded, out, Path("ckpt/checkpoint.pt"))
    assert (said is None) if problem is None else (problem in said and "neither resumed nor replaced" in said), case


# --- how the held-out rows are found (pipeline.corpus.build.holdout_plan)
HOLDOUTS = [
    # case,                             train, validation, fraction, plan
    ("split by document",                  90,  10, 0.07, ("documents", 0)),
    ("one long text, in train",           528,   0, 0.07, ("tail", 37)),
    ("one long text, in validation",        0, 528, 0.07, ("all-tail", 37)),
    ("a tiny fraction still holds one",    10,   0, 0.01, ("tail", 1)),
    ("a large fraction leaves one row",     2,   0, 0.9, ("tail", 1)),
    ("no validation split asked",          50,   0, 0.0, ("none", 0)),
    ("no validation split, no rows",        0,   0, 0.0, ("refuse", 0)),
    ("one row cannot be split",             1,   0, 0.07, ("refuse", 1)),
    ("one held-out row cannot be split",    0,   1, 0.07, ("refuse", 1)),
]


@pytest.mark.parametrize("case, train, validation, fraction, plan", HOLDOUTS, ids=[row[0] for row in HOLDOUTS])
def test_holding_out_rows(case, train, validation, fraction, plan):
    from pipeline.corpus.build import holdout_plan

    assert holdout_plan(train, validation, fraction) == plan


# --- what a model source is, before loading (pipeline.model_source.source_problem)
SOURCES = [
    # case,                          name,                      dir,   file,  config, problem (a part of it), or None
    ("a saved model",                "data/teacher",            True,  False, True,  None),
    ("a directory of something else", "data/corpus",            True,  False, False, "without config.json"),
    ("a file",                       "model.safetensors",       False, True,  False, "is a file"),
    ("a hub id",                     "Qwen/Qwen2.5-0.5B",       False, False, False, None),
    ("a hub name without org",       "gpt2",                    False, False, False, None),
    ("a path that is not there",     "./models/teacher",        False, False, False, "neither an existing directory"),
    ("an absolute path not there",   "/data/teachers/big",      False, False, False, "neither an existing directory"),
    ("a path with two slashes",      "models/qwen/7b",          False, False, False, "neither an existing directory"),
    ("a typo with a space",          "Qwen/Qwen 2.5",           False, False, False, "neither an existing directory"),
    ("dots up",                      "org/../x",                False, False, False, "neither an existing directory"),
]


@pytest.mark.parametrize("case, name, is_dir, is_file, config, problem", SOURCES, ids=[row[0] for row in SOURCES])
def test_what_a_model_source_is(case, name, is_dir, is_file, config, problem):
    from pipeline.model_source import source_problem

    found = source_problem(name, is_dir, is_file, config)
    assert found is None if problem is None else problem in found
