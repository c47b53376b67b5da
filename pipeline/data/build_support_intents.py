"""Generate the project's shipped customer-support intent data set (support_intents.jsonl).

The data set is synthetic and written by this project: every utterance comes from hand-written
sentence templates (at least 25 English and 40 Chinese per intent, written as customers type into
a shop's support chat, most of them naming no order) whose slots are filled from lists of fake
order numbers, products, cities, dates, payment methods and so on, then dressed with greetings and
sign-offs, the odd emoji, lower-case/no-punctuation typing, English typos, Chinese homophone slips
and English words inside Chinese. A fixed seed drives one ``random.Random``, so running the script
again writes a byte-identical file. Utterances are de-duplicated after normalisation (NFKC, case-folded,
punctuation and symbols removed, whitespace collapsed) and generation tops up until every intent
reaches its target count.

Regenerate (from the repository root):

    python pipeline/data/build_support_intents.py

It reads the hand-written text (slots, templates, dressing) from ``support_intents_templates.json``
and writes ``support_intents.jsonl``, both next to this script: one JSON object per line with exactly
the keys ``text`` and ``label``, UTF-8, in a seeded shuffled order. Standard library only.
"""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

SEED = 20240611
OUTPUT = Path(__file__).resolve().parent / "support_intents.jsonl"
# The hand-written text the utterances are made of -- slot values, templates, greetings and
# sign-offs, typos, homophone slips, English words in Chinese -- is data, kept beside this script.
WRITTEN_FILE = Path(__file__).resolve().parent / "support_intents_templates.json"
WRITTEN = json.loads(WRITTEN_FILE.read_text(encoding="utf-8"))
MAX_CHARS = 200
MIN_PER_INTENT = 120
MAX_PER_INTENT = 200
MIN_TOTAL = 1400
MIN_TEMPLATES = {"en": 25, "zh": 40}  # per intent: enough that no phrasing dominates an intent

# Examples per intent; each is split evenly between English and Chinese.
TARGETS = {
    "order_status": 170,
    "cancel_order": 160,
    "refund_request": 164,
    "change_shipping_address": 150,
    "payment_issue": 160,
    "account_login": 150,
    "password_reset": 156,
    "product_availability": 164,
    "delivery_complaint": 166,
    "talk_to_human": 160,
}

# Intents whose customers tend to be annoyed (chooses the emoji pool).
UPSET = {"delivery_complaint", "talk_to_human", "payment_issue", "refund_request"}

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

# --------------------------------------------------------------------------- slot fillers

EN_SLOTS: dict[str, list[str]] = WRITTEN["en_slots"]

ZH_SLOTS: dict[str, list[str]] = WRITTEN["zh_slots"]

# --------------------------------------------------------------------------- templates
# English templates are written in lower case with a lower-case "i"; styling capitalises them.
# Most carry no order number: people ask first and look the number up later, if ever.

EN_TEMPLATES: dict[str, list[str]] = WRITTEN["en_templates"]

# Chinese templates read like messages on a Chinese shop's support chat (Taobao/JD style): spoken
# particles (啥, 咋, 呗, 哈, 嘛, 亲), several words for the same thing (取消/撤单/不要了/作废/关闭订单;
# 物流/快递/包裹/运单/揽收/派送/中转), questions, statements and complaints, a few English words, and
# most of them without an order number.

ZH_TEMPLATES: dict[str, list[str]] = WRITTEN["zh_templates"]

# --------------------------------------------------------------------------- dressing

EN_PREFIXES: list[str] = WRITTEN["en_prefixes"]
EN_SUFFIXES: list[str] = WRITTEN["en_suffixes"]
ZH_PREFIXES: list[str] = WRITTEN["zh_prefixes"]
ZH_SUFFIXES: list[str] = WRITTEN["zh_suffixes"]
CALM_EMOJI = ["🙏", "😊", "🙂", "😅", "🤔"]
UPSET_EMOJI = ["😡", "😤", "😞", "🙄", "😩"]
CALM_STICKERS = ["[抱拳]", "[捂脸]", "[微笑]"]  # chat apps' sticker codes, as they show in Chinese text
UPSET_STICKERS = ["[发怒]", "[流泪]", "[白眼]"]

# Misspellings people really type; applied to a few English utterances.
EN_TYPOS: dict[str, str] = WRITTEN["en_typos"]

# Homophone and input-method slips (错别字) and chat spellings; one per utterance, on a few of them.
ZH_TYPOS: dict[str, str] = WRITTEN["zh_typos"]

# English words Chinese customers type in the middle of a sentence; one per utterance, on a few.
ZH_MIXED: dict[str, str] = WRITTEN["zh_mixed"]

# Intents where a customer may paste an order number after the message whatever the template says.
ORDER_TAIL = {
    "order_status",
    "cancel_order",
    "refund_request",
    "change_shipping_address",
    "payment_issue",
    "delivery_complaint",
}

_I_WORDS = re.compile(r"\bi(?=\b|')")


def fake_order(rng: random.Random, lang: str) -> str:
    """Obviously fake order references: #A1234 in English, 订单号 58231 in Chinese."""
    if lang == "en":
        code = rng.choice("ABCDEFGHJKMN") + str(rng.randint(1000, 9999))
        return rng.choices([f"#{code}", code], weights=[4, 1])[0]
    number = str(rng.randint(10000, 99999))
    return rng.choices([f"订单号 {number}", f"订单{number}", f"订单号{number}", f"单号{number}"], weights=[4, 2, 2, 1])[
        0
    ]


def fake_amount(rng: random.Random, lang: str) -> str:
    if lang == "en":
        return f"${rng.randint(9, 260)}.{rng.choice(['00', '99', '50', '49'])}"
    value = rng.randint(19, 1999)
    return rng.choice([f"{value}元", f"¥{value}", f"{value}块", f"{value}块钱", f"{value}.00元"])


def fill(template: str, rng: random.Random, lang: str) -> str:
    slots = EN_SLOTS if lang == "en" else ZH_SLOTS

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "order":
            return fake_order(rng, lang)
        if name == "amount":
            return fake_amount(rng, lang)
        return rng.choice(slots[name])

    return re.sub(r"\{(\w+)\}", one, template)


def add_typo(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    known = [i for i, w in enumerate(words) if w.strip(",.?!'").lower() in EN_TYPOS]
    if known:
        i = rng.choice(known)
        bare = words[i].strip(",.?!'")
        words[i] = words[i].replace(bare, EN_TYPOS[bare.lower()], 1)
        return " ".join(words)
    long = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 5]
    if not long:
        return text
    i = rng.choice(long)
    w = words[i]
    j = rng.randint(1, len(w) - 3)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]  # swap two neighbouring letters
    return " ".join(words)


def add_order(text: str, rng: random.Random, lang: str) -> str:
    """The order number pasted before or after a message whose template names none."""
    order = fake_order(rng, lang)
    if lang == "en":
        return rng.choice([f"{text} order {order}", f"{text} ({order})", f"{order} - {text}"])
    return rng.choice([f"{text}，{order}", f"{text} {order}", f"{order} {text}", f"{order}，{text}"])


def swap_one(text: str, table: dict[str, str], rng: random.Random) -> str:
    """``text`` with the first occurrence of one of ``table``'s keys (chosen at random) replaced."""
    present = [key for key in table if key in text]
    if not present:
        return text
    key = rng.choice(present)
    return text.replace(key, table[key], 1)


def dress_en(core: str, intent: str, rng: random.Random, names_order: bool) -> str:
    text = core
    if intent in ORDER_TAIL and not names_order and rng.random() < 0.06:
        text = add_order(text, rng, "en")
    r = rng.random()
    if r < 0.4:
        suffix = rng.choice(EN_SUFFIXES)
        if suffix == "please" and intent == "delivery_complaint":
            suffix = "Please help."  # a bare "please" reads oddly after a complaint
        if suffix == "please":
            text = text[:-1] + ", please?" if text.endswith("?") else text + " please"
        else:
            if not text.endswith(("?", ".", "!")):
                text += "," if suffix[0].islower() else "."
            text += " " + suffix
    if rng.random() < 0.4:
        text = rng.choice(EN_PREFIXES) + text
    if rng.random() < 0.12:
        text = add_typo(text, rng)
    if rng.random() < 0.08:
        text += " " + rng.choice(UPSET_EMOJI if intent in UPSET else CALM_EMOJI)
    if rng.random() < 0.25:  # typed in a hurry: lower case, no punctuation
        text = re.sub(r"[,.?!]+(?=\s|$)", "", text.lower())  # "$12.49" keeps its point
    else:
        text = _I_WORDS.sub("I", text)
        text = re.sub(r"([.?!] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
        if rng.random() < 0.85:  # the rest leave the first letter as they typed it
            text = text[0].upper() + text[1:]
    return " ".join(text.split())


ZH_HALF_WIDTH = str.maketrans({"，": ",", "？": "?", "！": "!", "。": "."})


def dress_zh(core: str, intent: str, rng: random.Random, names_order: bool) -> str:
    text = core
    if intent in ORDER_TAIL and not names_order and rng.random() < 0.06:
        text = add_order(text, rng, "zh")
    suffixed = rng.random() < 0.35
    if suffixed:
        suffix = rng.choice(ZH_SUFFIXES)
        if not text.endswith(("？", "。", "！")):
            text += rng.choice(["，", " "])
        text += suffix
    if rng.random() < 0.4:
        text = rng.choice(ZH_PREFIXES) + text
    if rng.random() < 0.12:
        text = swap_one(text, ZH_TYPOS, rng)
    if rng.random() < 0.08:
        text = swap_one(text, ZH_MIXED, rng)
    if rng.random() < 0.1:
        text += rng.choice(UPSET_EMOJI + UPSET_STICKERS if intent in UPSET else CALM_EMOJI + CALM_STICKERS)
    style = rng.random()
    if style < 0.15:  # no punctuation, spaces instead
        text = re.sub(r"[，。？！、“”]", " ", text)
    elif style < 0.27:  # typed with the half-width punctuation of an English keyboard
        text = text.translate(ZH_HALF_WIDTH)
    elif style < 0.35 and not suffixed:  # a trailing flourish
        text = text.rstrip("？！。，") + rng.choice(["？？", "？？？", "！！", "。。。", "…", "~", "～", "?"])
    return " ".join(text.split())


def normalize(text: str) -> str:
    """Form used for de-duplication: NFKC, case-folded, punctuation/symbols/emoji removed, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def language(text: str) -> str:
    return "zh" if CJK.search(text) else "en"


def generate(seed: int = SEED) -> list[dict[str, str]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for intent, total in TARGETS.items():
        for lang, templates in (("en", EN_TEMPLATES[intent]), ("zh", ZH_TEMPLATES[intent])):
            want = total // 2 if lang == "en" else total - total // 2
            assert len(templates) >= MIN_TEMPLATES[lang], f"{intent}/{lang}: only {len(templates)} templates"
            order = list(templates)
            rng.shuffle(order)
            used: Counter[str] = Counter()
            made = attempts = 0
            while made < want:  # top up until the target is met, skipping duplicates
                attempts += 1
                if attempts > 200 * want:
                    raise RuntimeError(f"{intent}/{lang}: stuck at {made}/{want} unique utterances")
                template = order[attempts % len(order)]
                core = fill(template, rng, lang)
                names_order = "{order}" in template
                dress = dress_en if lang == "en" else dress_zh
                text = dress(core, intent, rng, names_order)
                key = normalize(text)
                if not key or key in seen or len(text) > MAX_CHARS or language(text) != lang:
                    continue
                seen.add(key)
                used[template] += 1
                rows.append({"text": text, "label": intent})
                made += 1
            unused = [t for t in templates if not used[t]]
            assert not unused, f"{intent}/{lang}: templates never used: {unused}"
    rng.shuffle(rows)
    check(rows)
    return rows


def check(rows: list[dict[str, str]]) -> None:
    keys = [normalize(r["text"]) for r in rows]
    dupes = [k for k, n in Counter(keys).items() if n > 1]
    assert not dupes, f"normalised duplicates: {dupes[:5]}"
    per_label = Counter(r["label"] for r in rows)
    assert set(per_label) == set(TARGETS), sorted(per_label)
    for label, n in per_label.items():
        assert MIN_PER_INTENT <= n <= MAX_PER_INTENT, f"{label}: {n} examples"
        langs = Counter(language(r["text"]) for r in rows if r["label"] == label)
        assert abs(langs["en"] - langs["zh"]) <= n * 0.1, f"{label}: unbalanced languages {dict(langs)}"
    assert len(rows) >= MIN_TOTAL, f"only {len(rows)} rows"
    for r in rows:
        assert list(r) == ["text", "label"], r
        assert r["text"].strip() and len(r["text"]) <= MAX_CHARS, r
        assert "@" not in r["text"], r  # no e-mail addresses
        assert not re.search(r"\d{7,}", r["text"]), r  # nothing that looks like a phone number


def main() -> int:
    rows = generate()
    with OUTPUT.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    per_label = Counter(r["label"] for r in rows)
    print(f"wrote {len(rows)} utterances to {OUTPUT}", file=sys.stderr)
    for label in TARGETS:
        langs = Counter(language(r["text"]) for r in rows if r["label"] == label)
        print(f"  {label:<24} {per_label[label]:>4}  en {langs['en']:>3}  zh {langs['zh']:>3}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
