"""The teacher answers one shard of prompts: rendered with its chat template, generated in batches
(transformers' `generate`), each answer a chat record with the settings and the teacher's identity."""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from pipeline.corpus.chat import render_prompt
from pipeline.errors import UserError, require
from pipeline.settings.generate import GenerateConfig

NO_PROMPT_TEMPLATE = ("the teacher's tokenizer has no chat template to render the prompts with: give --chat-template "
                      "FILE (a Jinja file)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def generation_tokenizer(teacher: str, template: str | None):
    """The teacher's tokenizer, set up for batched generation (left padding), with its chat template or
    `template` (prepare-corpus renders the answers with pipeline.corpus.chat's `chat_tokenizer`)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    folder = Path(teacher)
    require(not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES),
            f"--teacher {teacher} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): generate renders and "
            "tokenizes the prompts with the teacher's tokenizer; save it beside the weights")
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher)
    except Exception as error:  # OSError, ValueError, a tokenizer class this transformers lacks, ...
        raise UserError(f"--teacher {teacher}: its tokenizer cannot be loaded "
                        f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    if template is not None:
        tokenizer.chat_template = template
    require(bool(tokenizer.chat_template), NO_PROMPT_TEMPLATE)
    tokenizer.padding_side = "left"  # the answers start where every prompt ends
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    require(tokenizer.eos_token_id is not None, "the teacher's tokenizer has no end-of-sequence token: answers could "
                                                "never end")
    return tokenizer


def teacher_context(teacher: str) -> int | None:
    """The positions the teacher's model can attend to (its config's max_position_embeddings; None when it
    does not say), read from its config alone (before the weights load)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(teacher)
    except Exception:  # loading the model says what is wrong with it, in its own line
        return None
    context = getattr(config, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def rendered_prompts(tokenizer, prompts: list[list[dict]], max_new_tokens: int, context: int | None) -> list[int]:
    """Every prompt rendered with the chat template and tokenized, checked before anything is generated:
    a template that fails or renders nothing is one line naming the prompt; prompts whose tokens plus
    `max_new_tokens` exceed the teacher's `context` are refused in one line with their count (answers past
    the context would be garbage, or an error half-way through). Returns each prompt's length in tokens."""
    lengths = []
    for i, messages in enumerate(prompts):
        text = render_prompt(tokenizer, messages, f"prompt {i}")
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    too_long = [i for i, n in enumerate(lengths) if context is not None and n + max_new_tokens > context]
    if too_long:
        raise UserError(f"{len(too_long)} of {len(prompts)} prompts do not fit the teacher's context of {context} "
                        f"tokens with max_new_tokens {max_new_tokens} (the first, prompt {too_long[0]}, has "
                        f"{lengths[too_long[0]]} tokens): shorten or drop them, or lower --max-new-tokens")
    return lengths


class RefuseNonFinite(LogitsProcessor):
    """Stops the run at the first NaN or +inf logit (-inf is a token ruled out, not damage)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if bool(torch.isnan(scores).any() | torch.isposinf(scores).any()):
            raise UserError("the teacher's logits are not finite (NaN or inf) while answering: stopped, nothing of "
                            "this shard written; check the teacher (its dtype: --dtype float32)")
        return scores


def sampling_config(cfg: GenerateConfig, pad: int, eos: list[int]) -> GenerationConfig:
    """transformers' generation settings from ours alone: every field that changes which tokens are drawn
    is set (None: off), for `generate` under `without_model_defaults`, which would otherwise take fields
    from the model's own generation_config.json (a real model's top_k, repetition penalty, min_p, ...)
    and then from its global defaults (top_k 50): the answers are samples of the teacher's distribution
    under these settings, and nothing else."""
    sampled = cfg.temperature > 0
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=0, num_return_sequences=cfg.n, num_beams=1,
        do_sample=sampled, temperature=cfg.temperature if sampled else 1.0, top_p=cfg.top_p if sampled else 1.0,
        top_k=cfg.top_k if sampled else 0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_repetition_penalty=1.0, length_penalty=1.0,
        bad_words_ids=None, suppress_tokens=None, begin_suppress_tokens=None, forced_bos_token_id=None,
        forced_eos_token_id=None, renormalize_logits=False, pad_token_id=pad, eos_token_id=eos,
        stop_strings=list(cfg.stop) or None)


@contextlib.contextmanager
def without_model_defaults(model):
    """While held, `generate` on `model` takes nothing from the model's own generation_config.json; yields
    the arguments `generate` needs for that. transformers 4.50 to 4.57 replace every field equal to its
    global default (our temperature 1.0, top_p 1.0) by the model's own unless `use_model_defaults=False`
    (passed where this transformers has it: 5.x has not); 5.x fills every field left None (min_p,
    forced_eos_token_id, suppress_tokens, bad_words_ids, ...) from the model's, with no switch: so the
    model's generation config is transformers' global one meanwhile."""
    own = model.generation_config
    model.generation_config = GenerationConfig()
    switch = "use_model_defaults" in inspect.signature(model.generate).parameters
    try:
        yield {"use_model_defaults": False} if switch else {}
    finally:
        model.generation_config = own


def shard_seed(seed: int, shard: int) -> int:
    """The random state a shard's sampling starts from: a function of the seed and the shard only."""
    return (seed * 1_000_003 + shard) % (2**63)


def answer_shard(model, tokenizer, prompts: list[list[dict]], first: int, shard: int, cfg: GenerateConfig,
                 device: torch.device, teacher: dict, progress=None) -> tuple[list[dict], int]:
    """The chat records of prompts (numbered from `first`) and the number of tokens generated;
    `progress(answers, tokens)` after each batch. `teacher`: what the records say of the teacher."""
    torch.manual_seed(shard_seed(cfg.seed, shard))  # CPU and current GPU generators
    records, generated = [], 0
    eos = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id]
                                     if isinstance(model.generation_config.eos_token_id, int)
                                     else model.generation_config.eos_token_id or [])}
    settings = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "top_k": cfg.top_k, "n": cfg.n, "seed": cfg.seed, **({"stop": list(cfg.stop)} if cfg.stop else {})}
    generation = sampling_config(cfg, tokenizer.pad_token_id, sorted(eos))
    stopping = {"tokenizer": tokenizer} if cfg.stop else {}
    for lo in range(0, len(prompts), cfg.batch_size):
        batch = prompts[lo : lo + cfg.batch_size]
        texts = [render_prompt(tokenizer, messages, f"prompt {first + lo + i}") for i, messages in enumerate(batch)]
        inputs = tokenizer(texts, add_special_tokens=False, padding=True, return_token_type_ids=False,
                           return_tensors="pt").to(device)  # token types are no argument of a causal LM
        with torch.inference_mode(), without_model_defaults(model) as ours_only:
            out = model.generate(**inputs, generation_config=generation,
                                 logits_processor=LogitsProcessorList([RefuseNonFinite()]), **stopping, **ours_only)
        answers = out[:, inputs["input_ids"].shape[1]:]  # (B * n, <= max_new_tokens)
        before = generated
        for row, tokens in enumerate(answers.tolist()):
            ended = next((i for i, token in enumerate(tokens) if token in eos), None)
            kept = tokens if ended is None else tokens[:ended]
            generated += len(kept) + (ended is not None)
            text, stopped = cut_at_stop(tokenizer.decode(kept, skip_special_tokens=True), cfg.stop)
            prompt_index = first + lo + row // cfg.n
            context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in batch[row // cfg.n]]
            records.append({  # earlier answers in the prompt are context (weight 0): the loss is on the teacher's
                "messages": [*context, {"role": "assistant", "content": text}],
                "prompt_index": prompt_index, "answer_index": row % cfg.n, "truncated": ended is None and not stopped,
                "answer_tokens": len(kept), "teacher": teacher, "settings": settings})
        if progress is not None:
            progress(len(batch) * cfg.n, generated - before)
    return records, generated


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(the answer up to the first stop string, whether one was there)."""
    cut = min((at for s in stop if (at := text.find(s)) >= 0), default=None)
    return (text, False) if cut is None else (text[:cut], True)


def shard_count(prompts: int, per_shard: int) -> int:
    return math.ceil(prompts / per_shard)
