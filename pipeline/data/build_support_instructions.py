"""Generate the project's shipped instruction / chat data set (support_instructions.jsonl).

The data set is for the ``causal-lm`` task family: a customer-support assistant answering an online
shop's customers. Every customer message is taken from the shipped ``support_intents.jsonl`` (its
``text`` and ``label``), and every reply comes from hand-written reply templates per intent and
language (English replies for English messages, Chinese for Chinese). When the message names an
order (``#A1234``, ``订单号 58231``) the reply echoes it. Replies are short and say the same thing
for the same intent, so a small model can learn the pattern in a few hundred steps.

Three quarters of the records are instructions (``prompt``, ``response``, and in a third of them
a ``system`` prompt); a quarter are chats (``messages``: optional system, user, assistant, a
follow-up user turn such as "thanks" or "要等多久？", and a matching assistant reply). A fixed seed
drives one ``random.Random``, so running the script again writes a byte-identical file. Before
writing, every record is checked with ``pipeline.chat.role_problem(pipeline.chat.to_messages(r))``,
prompts are de-duplicated after normalisation and replies are held to ``MAX_REPLY_CHARS``; the
script exits non-zero and writes nothing when a check fails.

Regenerate (from the repository root, with the project installed, e.g. in its virtualenv):

    python pipeline/data/build_support_instructions.py

It reads the hand-written replies, system prompts and follow-ups from
``support_instructions_templates.json`` and writes ``support_instructions.jsonl``, both next to this script: one JSON object per line, UTF-8,
in a seeded shuffled order. Standard library only, plus this project's ``pipeline.chat``.
"""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

from pipeline import chat

SEED = 20240612
HERE = Path(__file__).resolve().parent
SOURCE = HERE / "support_intents.jsonl"
OUTPUT = HERE / "support_instructions.jsonl"
# The hand-written replies, system prompts and follow-up turns are data, kept beside this script.
WRITTEN_FILE = HERE / "support_instructions_templates.json"
WRITTEN = json.loads(WRITTEN_FILE.read_text(encoding="utf-8"))
PER_INTENT_AND_LANGUAGE = 40  # 10 intents x 2 languages x 40 = 800 records
CHATS_PER_GROUP = 10  # of the 40: 10 chats, 30 instructions (the 75% / 25% mix)
SYSTEM_INSTRUCTIONS_PER_GROUP = 10  # a third of the 30 instructions carry a system prompt
SYSTEM_CHATS_PER_GROUP = 5  # half of the chats open with a system message
MAX_REPLY_CHARS = 160

SYSTEM: dict[str, str] = WRITTEN["system"]

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Order references as build_support_intents.py writes them: "#A1234" / "A1234", "订单号 58231" / "单号58231".
ORDER = {
    "en": re.compile(r"(?<![A-Za-z0-9])#?([A-Za-z]\d{4})(?!\d)"),
    "zh": re.compile(r"(?:订单号|订单|单号)\s?(\d{5})(?!\d)"),
}

# --------------------------------------------------------------------------- replies
# Per intent and language: "order" templates (used when the message names an order; {order} is
# echoed as "#A1234" or "58231") and "plain" templates (used otherwise).

REPLIES: dict[str, dict[str, dict[str, list[str]]]] = WRITTEN["replies"]

# --------------------------------------------------------------------------- follow-ups
# The second user turn of a chat and its reply: half generic thanks, half a question about the intent.

THANKS: dict[str, dict[str, list[str]]] = WRITTEN["thanks"]

FOLLOW_UPS: dict[str, dict[str, list[tuple[str, str]]]] = {
    lang: {intent: [(user, reply) for user, reply in turns] for intent, turns in intents.items()}
    for lang, intents in WRITTEN["follow_ups"].items()
}

# --------------------------------------------------------------------------- generation


def normalize(text: str) -> str:
    """Form used for de-duplication (as in build_support_intents.py): NFKC, case-folded,
    punctuation/symbols/emoji removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def language(text: str) -> str:
    return "zh" if CJK.search(text) else "en"


def order_reference(text: str, lang: str) -> str | None:
    """The order named in a message, as the reply writes it ("#A1234" / "58231"), or None."""
    match = ORDER[lang].search(text)
    if not match:
        return None
    return "#" + match.group(1).upper() if lang == "en" else match.group(1)


class ReplyPicker:
    """Cycles through each template list in a seeded order, so every template is used about equally."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.queues: dict[tuple[str, ...], list[str]] = {}
        self.used: Counter[str] = Counter()

    def pick(self, key: tuple[str, ...], templates: list[str]) -> str:
        queue = self.queues.setdefault(key, [])
        if not queue:
            queue.extend(templates)
            self.rng.shuffle(queue)
        template = queue.pop()
        self.used[template] += 1
        return template


def load_messages() -> dict[tuple[str, str], list[str]]:
    """The shipped customer messages grouped by (intent, language), in file order."""
    groups: dict[tuple[str, str], list[str]] = {}
    with SOURCE.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            groups.setdefault((row["label"], language(row["text"])), []).append(row["text"])
    return groups


def reply_for(message: str, intent: str, lang: str, picker: ReplyPicker) -> str:
    templates = REPLIES[lang][intent]
    order = order_reference(message, lang)
    if order and "order" in templates:
        return picker.pick((lang, intent, "order"), templates["order"]).format(order=order)
    return picker.pick((lang, intent, "plain"), templates["plain"])


def follow_up(intent: str, lang: str, rng: random.Random, picker: ReplyPicker) -> tuple[str, str]:
    if rng.random() < 0.5:
        user = picker.pick((lang, "thanks", "user"), THANKS[lang]["users"])
        return user, picker.pick((lang, "thanks", "reply"), THANKS[lang]["replies"])
    pairs = FOLLOW_UPS[lang][intent]
    user = picker.pick((lang, intent, "follow-up"), [question for question, _ in pairs])
    return user, dict(pairs)[user]


def choose(messages: list[str], intent: str, lang: str, rng: random.Random) -> list[str]:
    """PER_INTENT_AND_LANGUAGE messages, naming an order about as often as the source does, but at
    least twice per order template so that every order reply is seen (some intents rarely name one)."""
    with_order = [m for m in messages if order_reference(m, lang)]
    without = [m for m in messages if not order_reference(m, lang)]
    share = round(PER_INTENT_AND_LANGUAGE * len(with_order) / len(messages))
    floor = 2 * len(REPLIES[lang][intent].get("order", []))
    take = min(len(with_order), max(share, floor))
    chosen = rng.sample(with_order, take) + rng.sample(without, PER_INTENT_AND_LANGUAGE - take)
    rng.shuffle(chosen)  # the position decides the record shape below
    return chosen


def generate(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    picker = ReplyPicker(rng)
    seen: set[str] = set()
    records: list[dict] = []
    for (intent, lang), messages in sorted(load_messages().items()):
        unique = []
        for message in messages:
            key = normalize(message)
            if key and key not in seen:
                seen.add(key)
                unique.append(message)
        chosen = choose(unique, intent, lang, rng)
        for number, message in enumerate(chosen):
            reply = reply_for(message, intent, lang, picker)
            if number < CHATS_PER_GROUP:
                question, answer = follow_up(intent, lang, rng, picker)
                turns = [{"role": "system", "content": SYSTEM[lang]}] if number < SYSTEM_CHATS_PER_GROUP else []
                turns += [
                    {"role": "user", "content": message},
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
                records.append({"messages": turns})
            elif number < CHATS_PER_GROUP + SYSTEM_INSTRUCTIONS_PER_GROUP:
                records.append({"system": SYSTEM[lang], "prompt": message, "response": reply})
            else:
                records.append({"prompt": message, "response": reply})
    every_template = [
        t
        for by_lang in REPLIES.values()
        for by_intent in by_lang.values()
        for templates in by_intent.values()
        for t in templates
    ]
    unused = [t for t in every_template if not picker.used[t]]
    if unused:
        raise RuntimeError(f"reply templates never used (change SEED or the templates): {unused}")
    rng.shuffle(records)
    return records


def problems(records: list[dict]) -> list[str]:
    """Every rule a record breaks, as 'record N: ...' lines; empty when the data set is clean."""
    found = []
    prompts: Counter[str] = Counter()
    for number, record in enumerate(records, start=1):
        try:
            messages = chat.to_messages(record)
        except ValueError as exc:
            found.append(f"record {number}: {exc}")
            continue
        problem = chat.role_problem(messages)
        if problem:
            found.append(f"record {number}: {problem}")
        if any(not m["content"].strip() for m in messages):
            found.append(f"record {number}: empty turn")
        first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
        prompts[normalize(first_user)] += 1
        lang = language(first_user)
        for m in messages:
            if m["role"] == "assistant" and len(m["content"]) > MAX_REPLY_CHARS:
                found.append(f"record {number}: reply of {len(m['content'])} characters > {MAX_REPLY_CHARS}")
            if m["role"] != "user" and language(m["content"]) != lang:
                found.append(f"record {number}: {m['role']} turn not in the customer's language ({lang})")
    found += [f"prompt repeated {n} times after normalisation: {key!r}" for key, n in prompts.items() if n > 1]
    return found


def shape(record: dict) -> str:
    if "messages" in record:
        return "chat+system" if record["messages"][0]["role"] == "system" else "chat"
    return "instruction+system" if "system" in record else "instruction"


def main() -> int:
    records = generate()
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    found = problems([json.loads(line) for line in lines])  # check what a reader of the file will see
    if found:
        print(f"{len(found)} problem(s); {OUTPUT.name} not written:", *found[:20], sep="\n  ", file=sys.stderr)
        return 1
    with OUTPUT.open("w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(line + "\n" for line in lines)
    print(f"wrote {len(records)} records to {OUTPUT}", file=sys.stderr)
    counts = Counter((shape(r), language(chat.to_messages(r)[-1]["content"])) for r in records)
    for kind in ("instruction", "instruction+system", "chat", "chat+system"):
        print(f"  {kind:<20} en {counts[kind, 'en']:>3}  zh {counts[kind, 'zh']:>3}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
