"""Build and load Hugging Face causal LMs, and describe them (vocabulary, parameters, where the logits come out)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pipeline.errors import UserError
from pipeline.model_source import check_model_source
from pipeline.models.devices import resolve_dtype


def build_llama(vocab_size: int, d_model: int, n_layers: int, n_heads: int, d_ff: int, max_seq_len: int,
                eos_id: int = 0, n_kv_heads: int | None = None, tie_embeddings: bool = True) -> LlamaForCausalLM:
    """A Llama-architecture model from a config (random weights, nothing downloaded)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_ff,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads or n_heads,
        max_position_embeddings=max_seq_len,
        tie_word_embeddings=tie_embeddings,  # at small sizes the embedding is most of the parameters
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def load_causal_lm(name_or_path: str, device: torch.device, dtype: torch.dtype | None = None,
                   device_map: str | None = None, role: str = "model") -> PreTrainedModel:
    """Any AutoModelForCausalLM, in eval mode, in `dtype` (default: bf16 on GPU, fp32 on CPU).

    With `device_map` (accelerate's "auto", "balanced", ...) the layers are spread over every GPU of
    this machine instead of placed on `device`; inputs then follow the layers (accelerate's hooks)
    and the logits come out on the device of the last layer (`output_device`)."""
    check_model_source(name_or_path, role)
    dtype = dtype or resolve_dtype("auto", device)
    try:
        placement = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **placement)
    except Exception as error:  # OSError, ValueError, safetensors' errors on truncated files, ...
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot load a causal LM from {name_or_path!r}: {first_line}") from None
    return (model if device_map else model.to(device)).eval()


def output_device(model: PreTrainedModel) -> torch.device:
    """Where the logits come out: the LM head's device."""
    return model.get_output_embeddings().weight.device


def output_vocab_size(model: PreTrainedModel) -> int:
    """Rows of the LM head: may exceed the tokenizer's vocabulary (padded embeddings)."""
    return int(model.get_output_embeddings().weight.shape[0])


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


PRETRAINED_POINTER = "pretrained.json"


def resolve_teacher(name_or_path: str) -> str:
    """A teacher dir written by train-teacher for a pretrained model points at that model."""
    pointer = Path(name_or_path) / PRETRAINED_POINTER
    if pointer.is_file():
        try:
            return str(json.loads(pointer.read_text())["pretrained"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{pointer} is not a pretrained-teacher pointer (expected {{\"pretrained\": ...}})") from None
    return name_or_path
