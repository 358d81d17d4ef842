"""A causal LM's output layer as a function of its final hidden states (`LogitHead`), reached the way the
model's own forward reaches it (`hidden_and_head`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.errors import require

# Elements of a working slice any code that applies the head a part at a time holds at once: fp32
# logits (positions x vocabulary), 2^24 = 64 MiB, 110 positions at V = 151,936. Large enough to keep
# a GPU busy, small against a model at any vocabulary. The capture's slices, the students' loss rows
# and evaluate's scores use it, and the fused loss's blocks of the head's gradient (rows x d).
LOGITS_BUDGET = 1 << 24


def head_transform(config) -> tuple[float, float, float | None]:
    """(scale, divisor, softcap) of the logit transforms the families we know apply after the LM head, in
    this order: logits = head(h) * scale / divisor, then soft-capped (softcap * tanh(logits / softcap)).
    Cohere multiplies by `logit_scale`, FalconH1 by `lm_head_multiplier`, HyperCLOVA X by
    `logits_scaling`; Granite (and its MoE and hybrid kin) divide by `logits_scaling`; Gemma 2/3 soft-cap
    at `final_logit_softcapping`. Any other transform is caught by `check_head` (the capture's, and every
    student's on its first batch) before anything is written or trained."""
    config = getattr(config, "text_config", None) or config  # multimodal wrappers keep the LM's config inside
    scale, divisor = 1.0, 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere
        scale *= float(config.logit_scale)
    if getattr(config, "lm_head_multiplier", None) is not None:  # FalconH1
        scale *= float(config.lm_head_multiplier)
    if getattr(config, "logits_scaling", None) is not None:
        if getattr(config, "model_type", "") == "hyperclovax":  # the same name, the other way round
            scale *= float(config.logits_scaling)
        else:  # Granite, GraniteMoE, GraniteMoeHybrid, ...
            divisor = float(config.logits_scaling)
    return scale, divisor, getattr(config, "final_logit_softcapping", None)  # Gemma 2/3


def zero3_partitioned(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 manages this parameter: it keeps a shard of it and gathers the whole only
    inside its module's forward (and backward), so after the forward the head's weight is not whole."""
    return hasattr(parameter, "ds_id") or hasattr(parameter, "ds_status")


@dataclass(frozen=True)
class LogitHead:
    """A causal LM's output layer as a function of its final hidden states: logits =
    (h @ weight.T + bias) * scale / divisor, then soft-capped at `softcap` (softcap * tanh(logits / softcap))
    where there is one. The weight is the model's own parameter (tied to the embeddings where the model
    ties them), so a loss computed from it trains the model."""

    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None = None  # (V,)
    scale: float = 1.0
    softcap: float | None = None
    divisor: float = 1.0

    @classmethod
    def of(cls, model: torch.nn.Module) -> LogitHead:
        """The head transformers itself finds (`get_output_embeddings`), with the family's transforms."""
        model = unwrapped(model)
        head = model.get_output_embeddings()
        require(isinstance(head, torch.nn.Linear),
                f"{type(model).__name__} has no linear output layer (get_output_embeddings() is {type(head).__name__})")
        require(not zero3_partitioned(head.weight),
                f"{type(model).__name__}'s LM head is partitioned by DeepSpeed ZeRO-3, which gathers its weight only "
                "inside the head's own forward: the fused loss needs the whole weight; use ZeRO stage 1 or 2, or "
                "FSDP2 (fsdp_version 2 in accelerate's config)")
        scale, divisor, softcap = head_transform(model.config)
        return cls(head.weight, head.bias, scale, softcap, divisor)

    @property
    def factor(self) -> float:
        """scale / divisor: what the logits are multiplied by before the soft-cap."""
        return self.scale / self.divisor

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., V) fp32 logits, as the model's own forward computes them: the matmul in the
        weight's dtype (or autocast's) and the transforms in the dtype it gives, in the family's order,
        so they are the model's own to the last bit (`check_head` compares them), then fp32."""
        logits = torch.nn.functional.linear(hidden.to(self.weight.device), self.weight, self.bias)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()


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


HEAD_CHECK_POSITIONS = 16  # positions the check runs on (bounded memory at any vocabulary)
HEAD_TOLERANCE = 1e-3  # nats: how far a head's log-probabilities may stray from the model's own


@torch.no_grad()
def check_head(model: torch.nn.Module, input_ids: torch.Tensor, role: str = "the model",
               use: str = "the capture") -> float:
    """Refuse a model whose own logits the head reached by `hidden_and_head` does not reproduce: on these
    (B, T) ids (a few positions), `model(input_ids).logits` against `LogitHead.logits` of the head's own
    input, as fp32 log-softmax. Refused: another width than the head's rows; mass on an id the model
    rules out (its logit -inf); a log-probability that differs by more than HEAD_TOLERANCE anywhere
    else (a transform this version does not know: an unknown scale of 1.5% moves a log-probability by
    ~0.015 times its logit's distance from the mean). Positions whose own logits hold a NaN or +inf are
    not compared (the capture refuses them, naming the position). Returns the largest difference.
    Every process of a job calls it (under FSDP2 the forwards gather parameters)."""
    model = unwrapped(model)
    name = f"{role} ({type(model).__name__})"
    seen: dict[str, torch.Tensor] = {}
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.setdefault("hidden", args[0]))
    try:  # one forward: the head's own input and the logits made from it (a second forward may round otherwise)
        theirs = model(input_ids=input_ids, use_cache=False).logits.float()  # (B, T, V')
    finally:
        handle.remove()
    require("hidden" in seen, f"{name}'s forward did not call its output layer")
    ours = LogitHead.of(model).logits(seen["hidden"])  # (B, T, V)
    theirs = theirs.to(ours.device)
    require(theirs.shape[-1] == ours.shape[-1],
            f"{name}: its forward gives {theirs.shape[-1]:,} logits per position but its LM head has "
            f"{ours.shape[-1]:,} rows: it cuts or extends its logits in a way this version does not know")
    compared = ~(torch.isnan(theirs) | torch.isposinf(theirs)).any(-1)  # (B, T)
    ours, theirs = ours[compared], theirs[compared]  # (n, V)
    leaked = torch.isneginf(theirs) & ~torch.isneginf(ours)
    require(not bool(leaked.any()),
            f"{name} rules out {int(leaked.any(0).sum()):,} ids (their logits are -inf) to which its LM head, as "
            f"{use} applies it, gives mass: its forward masks its logits in a way this version does not know")
    ours, theirs = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
    finite = torch.isfinite(theirs)
    difference = float((ours - theirs)[finite].abs().max()) if bool(finite.any()) else 0.0
    require(difference <= HEAD_TOLERANCE,  # also refuses a NaN
            f"{name}: its own log-probabilities and those of its LM head as {use} applies it differ by up to "
            f"{difference:.3g} nats (allowed {HEAD_TOLERANCE:g}): its family transforms its logits in a way this "
            "version does not know")
    return difference
