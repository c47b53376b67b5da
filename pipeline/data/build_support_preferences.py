"""Generate the project's shipped preference set (support_preferences.jsonl) for task ``preference``.

Each pair is built from one record of the shipped support chats, ``support_instructions.jsonl``:
the ``prompt`` is the conversation up to its last assistant turn (as chat messages), ``chosen`` is
that turn, the reference answer, and ``rejected`` is one of two worse answers, alternately:

- **another request's answer**: the reference answer of another record in the same language that
  answers another request: of another intent (as ``support_intents.jsonl`` names the first
  customer message's intent) and sharing under ``MAX_OVERLAP`` ROUGE-L with the reference either
  way (``pipeline.chat.rouge_l``), so the rejected answer is fluent but off-topic, and a chat's
  generic thanks reply is never rejected for another chat's;
- **a truncated answer**: the reference answer cut off after about a third of its characters,
  mid-sentence, without its final punctuation, so the rejected answer is on-topic but unfinished.

Every other record of the chats becomes a pair (400 of 800). A fixed seed drives one
``random.Random``, so running the script again writes a byte-identical file. Before writing, each
pair is checked with ``pipeline.preference.pair_problem``; the script exits non-zero and writes
nothing when a check fails.

    python pipeline/data/build_support_preferences.py

It writes ``support_preferences.jsonl`` next to this script: one JSON object per line, UTF-8
(``prompt``: a message list; ``chosen``, ``rejected``: one assistant message each, as lists).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from pipeline import chat, preference

SEED = 20251204
HERE = Path(__file__).resolve().parent
CHATS = HERE / "support_instructions.jsonl"
INTENTS = HERE / "support_intents.jsonl"
OUT = HERE / "support_preferences.jsonl"
MAX_OVERLAP = 0.15


def is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def truncated(answer: str) -> str:
    cut = max(4 if is_chinese(answer) else 12, len(answer) // 3)
    return answer[:cut].rstrip(" ,.;:!?，。；：！？")


def main() -> int:
    intent_of = {}
    for line in INTENTS.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        intent_of[row["text"]] = row["label"]
    records = [json.loads(line) for line in CHATS.read_text(encoding="utf-8").splitlines()]
    conversations = []
    for record in records:
        messages = chat.to_messages(record)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        first_user = next(m["content"] for m in messages if m["role"] == "user")
        conversations.append((messages[:last], messages[last]["content"], intent_of.get(first_user)))
    rng = random.Random(SEED)
    pairs, problems = [], []
    for number, (prompt, chosen, intent) in enumerate(conversations[::2]):
        if number % 2 == 0:
            others = [
                answer
                for _, answer, other in conversations
                if is_chinese(answer) == is_chinese(chosen)
                and (other != intent or None in (other, intent))
                and chat.rouge_l(chosen, answer) < MAX_OVERLAP
                and chat.rouge_l(answer, chosen) < MAX_OVERLAP
            ]
            rejected = rng.choice(others)
        else:
            rejected = truncated(chosen)
        pair = (prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}])
        problem = preference.pair_problem(*pair)
        if problem:
            problems.append(f"pair {number + 1}: {problem}")
        pairs.append(dict(zip(preference.FIELDS, pair)))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    OUT.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    print(f"wrote {len(pairs)} pairs to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
