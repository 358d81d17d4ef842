"""Build, load and describe Hugging Face causal LMs, and reach their LM head (`LogitHead`, `hidden_and_head`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pipeline.errors import UserError, require
from pipeline.model_source import check_model_source


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on a GPU and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


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


# config.json keys that say how or where a model was saved, not what it computes
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")


def weights_fingerprint(name_or_path: str, model: PreTrainedModel) -> str:
    """The teacher's content identity: sha256 of a local model dir's weight files and its config
    (without the keys that only record how it was saved), else the hub commit of the weights. How
    the path is spelled (relative, absolute, a symlink, a trailing /) does not enter."""
    path = Path(name_or_path)
    if path.is_dir():
        digest = hashlib.sha256()
        config_file = path / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else model.config.to_dict()
        config = {key: value for key, value in config.items() if key not in VOLATILE_CONFIG_KEYS}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for file in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")):
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
        try:
            return str(json.loads(pointer.read_text())["pretrained"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{pointer} is not a pretrained-teacher pointer (expected {{\"pretrained\": ...}})") from None
    return name_or_path


def head_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) of the logit transforms the families we know apply after the LM head:
    logits = softcap * tanh(scale * head(h) / softcap), or scale * head(h) without a softcap.
    Cohere multiplies by `logit_scale`, Granite (and GraniteMoE) divide by `logits_scaling`, FalconH1
    multiplies by `lm_head_multiplier`, Gemma 2/3 soft-cap at `final_logit_softcapping`. Any other
    transform is caught by the capture's `check_head` before anything is written."""
    config = getattr(config, "text_config", None) or config  # multimodal wrappers keep the LM's config inside
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite, GraniteMoE
        scale /= float(config.logits_scaling)
    if getattr(config, "lm_head_multiplier", None) is not None:  # FalconH1
        scale *= float(config.lm_head_multiplier)
    return scale, getattr(config, "final_logit_softcapping", None)  # Gemma 2/3


@dataclass(frozen=True)
class LogitHead:
    """A causal LM's output layer as a function of its final hidden states: logits =
    softcap * tanh(scale * (h @ weight.T + bias) / softcap) (no tanh without a softcap). The weight is
    the model's own parameter (tied to the embeddings where the model ties them), so a loss computed
    from it trains the model."""

    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None = None  # (V,)
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: torch.nn.Module) -> LogitHead:
        """The head transformers itself finds (`get_output_embeddings`), with the family's transforms."""
        model = unwrapped(model)
        head = model.get_output_embeddings()
        require(isinstance(head, torch.nn.Linear),
                f"{type(model).__name__} has no linear output layer (get_output_embeddings() is {type(head).__name__})")
        scale, softcap = head_transform(model.config)
        return cls(head.weight, head.bias, scale, softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, V) fp32 logits, as the model's own forward computes them."""
        logits = torch.nn.functional.linear(hidden, self.weight, self.bias).float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP (or accelerate) wrapper; the model itself otherwise (FSDP2 wraps in place)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def hidden_and_head(model: torch.nn.Module, **inputs) -> tuple[torch.Tensor, LogitHead]:
    """Run the model's own forward (through its DDP / FSDP2 wrapper, so their hooks run) without its LM
    head: the final hidden states (B, T, d), final norm applied, and the head to apply to them. The
    head runs on no position (its input is cut to length 0 on its way in), so no (B, T, V) logits are
    made; under FSDP2 the head's weight is the unsharded one of this forward (the root keeps its
    parameters gathered until backward)."""
    head_module = unwrapped(model).get_output_embeddings()
    seen: dict[str, torch.Tensor] = {}

    def keep_hidden(_module, args):
        seen["hidden"] = args[0]
        return (args[0][..., :0, :], *args[1:])

    handle = head_module.register_forward_pre_hook(keep_hidden)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    require("hidden" in seen, f"{type(unwrapped(model)).__name__}'s forward did not call its output layer")
    return seen["hidden"], LogitHead.of(model)
