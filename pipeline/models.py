"""Build, load and describe Hugging Face causal LMs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pipeline.errors import UserError, require


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when present; asking for CUDA without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        require(torch.cuda.is_available(), "--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def build_llama(vocab_size: int, d_model: int, n_layers: int, n_heads: int, d_ff: int, max_seq_len: int,
                eos_id: int = 0) -> LlamaForCausalLM:
    """A Llama-architecture model from a config (random weights, nothing downloaded)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_seq_len,
        tie_word_embeddings=True,  # at small sizes the embedding is most of the parameters
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def load_causal_lm(name_or_path: str, device: torch.device) -> PreTrainedModel:
    """Any AutoModelForCausalLM: bf16 on GPU, fp32 on CPU, in eval mode."""
    path = Path(name_or_path)
    if not path.exists() and (name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1):
        raise UserError(f"teacher not found: {name_or_path}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a causal LM from {name_or_path!r}: {str(error).splitlines()[0]}") from None
    return model.to(device).eval()


def output_vocab_size(model: PreTrainedModel) -> int:
    """Rows of the LM head: may exceed the tokenizer's vocabulary (padded embeddings)."""
    return int(model.get_output_embeddings().weight.shape[0])


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weights_fingerprint(name_or_path: str, model: PreTrainedModel) -> str:
    """sha256 over the weight files of a local model dir, else the hub commit of the weights."""
    path = Path(name_or_path)
    if path.is_dir():
        digest = hashlib.sha256()
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
        for file in files:
            digest.update(file.name.encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return f"hub:{commit}"
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return "config:" + hashlib.sha256(config.encode()).hexdigest()[:16]


PRETRAINED_POINTER = "pretrained.json"


def resolve_teacher(name_or_path: str) -> str:
    """A teacher dir written by train-teacher for a pretrained model points at that model."""
    pointer = Path(name_or_path) / PRETRAINED_POINTER
    if pointer.is_file():
        return json.loads(pointer.read_text())["pretrained"]
    return name_or_path
