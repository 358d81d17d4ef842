"""Chat records -> token ids and a loss mask: the teacher tokenizer's chat template, assistant tokens = 1.

A record is a conversation when it has `messages` (a list of {role, content}) or a `prompt` and a
`completion` (strings: one user turn and one assistant turn; or lists of messages). It is rendered
with the chat template of the corpus tokenizer (or `prepare_corpus.chat_template`, a Jinja file):

- a template with `{% generation %}` tags marks the assistant tokens itself
  (`return_assistant_tokens_mask`);
- otherwise (and when a message has `"weight": 0`) each assistant turn's text is found by rendering
  the conversation up to the turn (with
  the generation prompt) and up to its end; a token belongs to the turn when its characters overlap
  the turn's. A template that renders earlier turns differently once later ones follow (some drop
  earlier reasoning) is refused: it needs generation tags.

The rendered text is tokenized once, without adding special tokens (the template writes them), so a
BOS is never doubled. One conversation fills one row, right-padded (pipeline.corpus.tokenize). An
assistant message with `"weight": 0` (axolotl's convention) is context: rendered, not learned (its
tokens are outside the loss mask); `pipeline generate` marks a prompt's earlier answers so.

A truncated answer (a record marked `"truncated": true` by `pipeline generate`: it reached
max_new_tokens without ending its turn) is learned up to where it was cut: the tokens the template
adds after its text (the end of turn, eos) are outside the loss mask, so the student is not taught
to stop where the teacher did not. `messages_of` carries the record's mark onto its last assistant
message (`"truncated": true`, which a message may also carry itself).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError, require

GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
NO_TEMPLATE = ("chat records need a chat template: set prepare_corpus.teacher to a model whose tokenizer has one, "
               "or prepare_corpus.chat_template to a Jinja file")


@dataclass(frozen=True)
class Conversation:
    ids: np.ndarray  # (L,) token ids
    mask: np.ndarray  # (L,) uint8: 1 on the assistant's tokens


def messages_of(record: dict) -> list[dict] | None:
    """The record's messages when it is a conversation, else None; a record marked `"truncated": true`
    has its last assistant message marked so (its end of turn is not learned)."""
    messages = _conversation(record)
    if messages is None or record.get("truncated") is not True:
        return messages
    answers = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    if not answers:
        return messages
    last = answers[-1]
    return [*messages[:last], {**messages[last], "truncated": True}, *messages[last + 1:]]


def _conversation(record: dict) -> list[dict] | None:
    if isinstance(record.get("messages"), list):
        return record["messages"]
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if isinstance(prompt, list) and isinstance(completion, list):
        return [*prompt, *completion]
    return None


def is_truncated(message: dict) -> bool:
    """An assistant turn cut before its end: its text is learned, the template's end of turn is not."""
    return message.get("truncated") is True


def check_messages(messages: list) -> str | None:
    """What is wrong with a conversation (None: nothing)."""
    if not messages:
        return "an empty conversation"
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            return "each message must be an object with string fields 'role' and 'content'"
    if not any(m["role"] == "assistant" for m in messages):
        return "a conversation without an assistant turn (nothing to distil)"
    return None


def read_chat_template(where, option: str) -> str:
    """The text of a chat template file (a Jinja file; a path or URL): one line when it is missing, not
    text, or empty."""
    from pipeline.io import storage

    shown = storage.display(where)
    require(storage.is_file(where), f"{option} {shown}: no such file")
    try:
        text = storage.read_text(where)
    except UnicodeDecodeError:
        raise UserError(f"{option} {shown}: not a text file (a chat template is a Jinja file)") from None
    require(text.strip() != "", f"{option} {shown}: the file is empty (a chat template is a Jinja file)")
    return text


def template_failure(name: str, error: Exception) -> UserError:
    """A chat template that fails on a conversation (a Jinja syntax error, `raise_exception`, an undefined
    name, ...), as one line naming the conversation."""
    return UserError(f"{name}: the chat template cannot render this conversation "
                     f"({str(error).splitlines()[0] if str(error) else type(error).__name__})")


def render_prompt(hf, messages: list[dict], name: str) -> str:
    """The conversation rendered with its generation prompt (what a model answers), by the tokenizer's chat
    template; a template that fails or renders nothing is one line naming the conversation."""
    try:
        text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except UserError:
        raise
    except Exception as error:  # jinja's errors, and whatever the template raises
        raise template_failure(name, error) from None
    require(isinstance(text, str) and text.strip() != "", f"{name}: the chat template renders nothing for this "
                                                          "conversation")
    return text


def chat_tokenizer(tokenizer_json: str, eos_token: str, teacher: str | None, template: str | None):
    """The HF tokenizer that renders conversations: the teacher's, or the corpus tokenizer with `template`."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if teacher:
        hf = AutoTokenizer.from_pretrained(teacher)
    else:
        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), eos_token=eos_token)
    if template:
        hf.chat_template = template
    require(bool(hf.chat_template), NO_TEMPLATE)
    return hf


class ChatRenderer:
    def __init__(self, hf):
        self.hf = hf
        self.tagged = bool(GENERATION_TAG.search(hf.chat_template))

    def render(self, messages: list[dict], name: str) -> Conversation:
        hf = self.hf
        try:
            if self.tagged and not any(m.get("weight", 1) == 0 or is_truncated(m) for m in messages):
                out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
                ids, mask = np.asarray(out["input_ids"]), np.asarray(out["assistant_masks"], np.uint8)
            else:
                ids, mask = self._by_prefixes(messages, name)
        except UserError:
            raise
        except Exception as error:  # jinja errors: the template rejects this conversation
            raise template_failure(name, error) from None
        # (a truncated answer may hold nothing to learn: an empty one; its row is dropped)
        require(mask.any() or any(map(is_truncated, messages)),
                f"{name}: the chat template marks no assistant token (its generation tags do not cover the "
                "assistant's turns)")
        return Conversation(ids, mask)

    def _by_prefixes(self, messages: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
        def text(upto: int, prompt: bool) -> str:
            return self.hf.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)

        full = text(len(messages), False)
        spans = []  # (first, end) characters of each learned turn, and whether it was cut (truncated)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("weight", 1) == 0:  # weight 0: context, not learned
                continue
            before, through = text(i, True), text(i + 1, False)
            require(through.startswith(before) and full.startswith(through),
                    f"{name}: the chat template renders earlier turns differently once later ones follow; "
                    "add {% generation %} tags to it (prepare_corpus.chat_template)")
            cut = is_truncated(message)
            end = len(before) + answer_end(through[len(before):], message["content"], name) if cut else len(through)
            spans.append((len(before), end, cut))
        encoding = self.hf.backend_tokenizer.encode(full, add_special_tokens=False)
        ids = np.asarray(encoding.ids)
        mask = np.zeros(len(ids), np.uint8)
        for t, (start, end) in enumerate(encoding.offsets):
            # a cut turn's last learned token ends with its text: one running on into the end of turn is not learned
            mask[t] = any(start < hi and end > lo and (end <= hi or not cut) for lo, hi, cut in spans)
        return ids, mask


def answer_end(turn: str, content: str, name: str) -> int:
    """Where a truncated answer's text ends in its rendered turn (the template's end of turn follows).
    A template may trim the text; one that rewrites it otherwise is refused: the end could not be told."""
    for text in (content, content.strip()):
        if not text:  # nothing answered (or only spaces the template trims): nothing of the turn is learned
            return 0
        at = turn.find(text)
        if at >= 0:
            return at + len(text)
    raise UserError(f"{name}: the chat template changes the text of a truncated answer, so where its end of turn "
                    "begins cannot be found; drop truncated answers (generate --no-keep-truncated)")
