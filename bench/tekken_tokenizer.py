"""A real 131,072-entry vocabulary for the size benchmark: Mistral's "Tekken" tokenizer as a
Hugging Face fast tokenizer, with Mistral's id layout (1,000 special tokens, then the byte-level
BPE ranks), converted from the tekken JSON that the `mistral-common` wheel ships.

    pip download --no-deps mistral-common -d /tmp/mc && unzip -o /tmp/mc/*.whl 'mistral_common/data/tekken_240911.json' -d /tmp/mc
    python bench/tekken_tokenizer.py /tmp/mc/mistral_common/data/tekken_240911.json data/tekken

The output directory then serves as `prepare_corpus.teacher` (tokenize the plays with it) and the
teacher trained on that corpus has a 131,072-way output head; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode


def tekken_to_hf(tekken: dict) -> Tokenizer:
    config = tekken["config"]
    n_special = config["default_num_special_tokens"]
    n_ranks = config["default_vocab_size"] - n_special
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in tekken["vocab"][:n_ranks]}
    byte_char = bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    specials = ["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{i}>" for i in range(3, n_special)]
    vocab = {name: i for i, name in enumerate(specials)}
    vocab |= {as_str(token): n_special + rank for token, rank in ranks.items()}
    # BPE merges from the ranks (as transformers' TikTokenConverter does): a token of rank r is the
    # merge of two lower-rank pieces, applied in rank order
    merges = []
    for token, rank in ranks.items():
        pieces = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(left, right, rank) for left, right in sorted(pieces, key=lambda p: (ranks[p[0]], ranks[p[1]]))]
    merges.sort(key=lambda m: m[2])
    tokenizer = Tokenizer(BPE(vocab, [(as_str(a), as_str(b)) for a, b, _ in merges], fuse_unk=False))
    tokenizer.model.ignore_merges = True
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(config["pattern"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(name, normalized=False, special=True) for name in specials])
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tekken_json", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    tokenizer = tekken_to_hf(json.loads(args.tekken_json.read_text()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(args.out)
    sample = "To be, or not to be, that is the question:"
    ids = tokenizer.encode(sample).ids
    assert tokenizer.decode(ids) == sample, "round trip failed"
    print(f"{args.out}: vocab {tokenizer.get_vocab_size():,}; {sample!r} -> {ids}")


if __name__ == "__main__":
    main()
