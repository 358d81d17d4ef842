"""`pipeline verify` on a corpus: every row of every split against its recorded digest, every chunk
through its crc32c, the digests against the corpus's fingerprint, the tokenizer against its own."""

from __future__ import annotations

from typing import Callable

from tqdm import tqdm

from pipeline.corpus.token_store import CHUNK_ROWS, TOKENIZER_NAME, CorpusDamaged, SplitRows, open_token_store
from pipeline.corpus.tokenizer import fingerprint, load_tokenizer_file
from pipeline.errors import UserError, list_problems
from pipeline.io import storage
from pipeline.io.storage import Location, display



def corpus_problems(where: Location, progress: bool = False) -> list[str]:
    """What is damaged in the corpus at `where`, one short line each (empty: intact). Only reads."""
    shown = display(where)
    store = open_token_store(where)
    problems = []
    try:
        tokenizer = load_tokenizer_file(storage.child(where, TOKENIZER_NAME))
        if fingerprint(tokenizer) != store.attrs.get("tokenizer_fingerprint"):
            problems.append(f"{TOKENIZER_NAME} differs from the tokenizer the corpus was made with")
    except UserError as error:
        problems.append(str(error))
    splits = [name for name in ("train", "validation") if name in store.attrs.get("counts", {})]
    try:
        readers = [SplitRows(store, split, shown) for split in splits]
    except CorpusDamaged as error:
        return [*problems, error.what]
    with tqdm(total=sum(len(r) for r in readers), desc="verify", unit="row", disable=not progress) as bar:
        for rows in readers:
            for lo in range(0, len(rows), CHUNK_ROWS):
                try:
                    rows.rows(lo, lo + CHUNK_ROWS)
                except CorpusDamaged as error:
                    problems.append(error.what)
                bar.update(min(CHUNK_ROWS, len(rows) - lo))
    return problems


def verify_corpus(where: Location, repair: bool, progress: bool, echo: Callable[..., None]) -> int:
    """0 when the corpus is intact, else 1 after listing what is not. A corpus is not repaired in place:
    it is prepared again from its source."""
    shown = display(where)
    problems = corpus_problems(where, progress)
    list_problems(echo, shown, problems)
    if not problems:
        echo(f"{shown}: corpus intact (every row matches its digest)")
        return 0
    again = "--repair does not apply to a corpus: " if repair else ""
    echo(f"error: the corpus is damaged; {again}prepare it again with `pipeline prepare-corpus --out {shown} "
         "--overwrite` from its source", err=True)
    return 1
