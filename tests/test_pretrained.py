"""The pretrained-teacher path: its tokenizer prepares the corpus, train-teacher trains nothing."""

import json

import zarr

from pipeline.corpus.token_store import open_token_store
from pipeline.corpus.tokenizer import fingerprint, load_tokenizer_file
from tests.conftest import run_cli, save_with_tokenizer, tiny_llama


def test_pretrained_teacher_end_to_end(corpus_dir, corpus_vocab, text_dir, tmp_path):
    pretrained = save_with_tokenizer(tiny_llama(corpus_vocab + 7), corpus_dir, tmp_path / "hf-teacher")
    (tmp_path / "params.yaml").write_text(
        f"prepare_corpus:\n  source: {text_dir}\n  seq_len: 16\n  teacher: {pretrained}\n"
        f"train_teacher:\n  pretrained: {pretrained}\n"
        "cache_logits:\n  k: 4\n  sequences_per_chunk: 4\n  sequences_per_shard: 16\n")
    params = ("--params", tmp_path / "params.yaml")
    run_cli("prepare-corpus", "--out", tmp_path / "corpus", *params)
    store = open_token_store(tmp_path / "corpus")
    assert store.attrs["tokenizer_fingerprint"] == fingerprint(load_tokenizer_file(corpus_dir / "tokenizer.json"))

    run_cli("train-teacher", "--corpus", tmp_path / "corpus", "--out", tmp_path / "teacher", *params)
    assert json.loads((tmp_path / "teacher" / "pretrained.json").read_text()) == {"pretrained": str(pretrained)}
    assert not (tmp_path / "teacher" / "model.safetensors").exists()

    run_cli("cache-logits", "--teacher", tmp_path / "teacher", "--corpus", tmp_path / "corpus",
            "--out", tmp_path / "c.zarr", *params)
    attrs = zarr.open_group(tmp_path / "c.zarr", mode="r").attrs
    assert attrs["vocab_size"] == corpus_vocab + 7  # padded head kept
    from pipeline.cache.provenance import read_provenance

    assert read_provenance(tmp_path / "c.zarr")["teacher"] == str(tmp_path / "teacher")  # where it came from


def test_own_teacher_on_a_pretrained_tokenizer(corpus_dir, text_dir, tmp_path):
    """A teacher trained here on a corpus tokenized by a pretrained tokenizer (eos "</s>", not ours)
    keeps that tokenizer unchanged, so the capture accepts it (it once added a token and was refused)."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tokenizer = load_tokenizer_file(corpus_dir / "tokenizer.json")
    tokenizer.add_special_tokens([AddedToken("</s>", special=True)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>").save_pretrained(tmp_path / "tok")
    (tmp_path / "params.yaml").write_text(
        f"prepare_corpus:\n  source: {text_dir}\n  seq_len: 16\n  teacher: {tmp_path / 'tok'}\n"
        "train_teacher:\n  d_model: 32\n  n_layers: 1\n  d_ff: 64\n  max_steps: 2\n  batch_size: 4\n  warmup_steps: 1\n"
        "cache_logits:\n  k: 4\n  sequences_per_chunk: 4\n  sequences_per_shard: 16\n")
    params = ("--params", tmp_path / "params.yaml")
    run_cli("prepare-corpus", "--out", tmp_path / "corpus", *params)
    attrs = open_token_store(tmp_path / "corpus").attrs
    assert attrs["eos_id"] == tokenizer.token_to_id("</s>")
    run_cli("train-teacher", "--corpus", tmp_path / "corpus", "--out", tmp_path / "teacher", *params)
    saved = load_tokenizer_file(tmp_path / "teacher" / "tokenizer.json")
    assert fingerprint(saved) == attrs["tokenizer_fingerprint"]
    assert json.loads((tmp_path / "teacher" / "config.json").read_text())["eos_token_id"] == attrs["eos_id"]
    run_cli("cache-logits", "--teacher", tmp_path / "teacher", "--corpus", tmp_path / "corpus",
            "--out", tmp_path / "c.zarr", *params)
    assert zarr.open_group(tmp_path / "c.zarr", mode="r").attrs["vocab_size"] == attrs["vocab_size"]
