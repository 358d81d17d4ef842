"""Train or load the tokenizer, and fingerprint it so caches and students can be matched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.io import storage
from pipeline.io.storage import Location, display
from pipeline.model_source import check_model_source
from pipeline.errors import UserError, require

EOS_TOKEN = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) with an end-of-text token at id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_pretrained_tokenizer(name_or_path: str) -> tuple[Tokenizer, int]:
    """The fast tokenizer of a pretrained HF model and its end-of-text id."""
    from transformers import AutoTokenizer

    check_model_source(name_or_path, "teacher", needs=("tokenizer.json", "tokenizer_config.json", "config.json"))
    try:
        hf = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a tokenizer from {name_or_path!r}: {str(error).splitlines()[0]}") from None
    require(hf.is_fast, f"{name_or_path}: only fast (tokenizers-backed) tokenizers are supported")
    require(hf.eos_token_id is not None, f"{name_or_path}: the tokenizer has no end-of-text (eos) token")
    return hf.backend_tokenizer, int(hf.eos_token_id)


def save_for_model(tokenizer: Tokenizer, eos_id: int, out: Path) -> None:
    """Save the corpus tokenizer beside a model (loadable with AutoTokenizer), its eos token being the
    corpus's own: naming another one would add a token and change the fingerprint."""
    from transformers import PreTrainedTokenizerFast

    # a causal LM's inputs only: transformers 4.x's default names would add token_type_ids, which generate refuses
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=tokenizer.id_to_token(eos_id),
                            model_input_names=["input_ids", "attention_mask"]).save_pretrained(out)


def eos_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    require(token_id is not None, f"tokenizer has no {EOS_TOKEN} token")
    return token_id


def fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of everything that decides the ids of a text as this tool tokenizes it: the model
    (vocabulary, merges), the added tokens, and the normalizer and pre-tokenizer before it. Equal
    fingerprints tokenize alike. Left out: the post-processor (texts are tokenized without special
    tokens, so it never runs; transformers adds a no-op one when it saves a tokenizer) and the decoder
    (it only turns ids back into text)."""
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model", {})
    payload = {
        "type": model.get("type"),
        "vocab": model.get("vocab"),
        "merges": model.get("merges"),
        "added": sorted((t["id"], t["content"]) for t in spec.get("added_tokens", [])),
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_tokenizer_file(where: Location) -> Tokenizer:
    require(storage.is_file(where), f"tokenizer not found: {display(where)}")
    try:
        return Tokenizer.from_str(storage.read_text(where))
    except Exception as error:  # tokenizers raises plain Exception on bad JSON
        raise UserError(f"{display(where)}: not a tokenizers JSON file ({str(error).splitlines()[0]})") from None


def check_model_tokenizer(name_or_path: str, expected_fingerprint: str, role: str, expected_from: str,
                          hint: str = "", vocab_size: int | None = None, eos_id: int | None = None) -> None:
    """When a model ships a fast tokenizer, it must be the one the data was tokenized with.

    A model without tokenizer files cannot be compared by fingerprint: what its config says is compared
    instead, given the data's `vocab_size` and `eos_id` (its tokenizer's): a vocabulary smaller than the
    data's, or end-of-text ids that do not include the data's, mean another tokenizer and are refused.
    When nothing contradicts (or nothing is given), it passes: a config says nothing of which token each
    id is, so save the tokenizer beside the model for the full check.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception:  # no tokenizer files (OSError, ValueError, or a tokenizer class the config names but lacks)
        tokenizer = None
    if tokenizer is not None and tokenizer.is_fast:
        theirs = fingerprint(tokenizer.backend_tokenizer)
        require(theirs == expected_fingerprint,
                f"{role} tokenizer {theirs} != {expected_from} tokenizer {expected_fingerprint}{hint}")
        return
    problem = config_contradiction(_config_ids(name_or_path), vocab_size, eos_id)
    require(problem is None, f"{role} {name_or_path} has no tokenizer files to compare and its config contradicts "
                             f"the {expected_from}'s tokenizer ({problem}): the {expected_from} was tokenized for "
                             f"another model{hint}; or save the {expected_from}'s tokenizer beside it")


def _config_ids(name_or_path: str) -> dict:
    """The vocabulary size and end-of-text ids a model's config declares ({} when it cannot be read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception:
        return {}
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"vocab_size": getattr(config, "vocab_size", None), "eos_token_id": getattr(config, "eos_token_id", None)}


def config_contradiction(config: dict, vocab_size: int | None, eos_id: int | None) -> str | None:
    """Why a model's config (its `vocab_size` and `eos_token_id`: an id, a list of ids or None) cannot be of
    the tokenizer with `vocab_size` ids and end-of-text `eos_id`, or None when nothing contradicts. A
    larger vocabulary is no contradiction (heads are often padded), nor a config that says nothing."""
    theirs = config.get("vocab_size")
    if isinstance(theirs, int) and vocab_size is not None and theirs < vocab_size:
        return f"its vocab_size {theirs} < the tokenizer's {vocab_size}"
    eos = config.get("eos_token_id")
    ids = [eos] if isinstance(eos, int) else [i for i in eos if isinstance(i, int)] if isinstance(eos, list) else []
    if ids and eos_id is not None and eos_id not in ids:
        return f"its eos_token_id {eos} is not the tokenizer's end-of-text id {eos_id}"
    return None
