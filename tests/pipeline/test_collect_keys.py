"""The split of scheme-2 snapshots (pipeline.collect.keys): normalised a column at a time, yet always
the split of normalize_text's form as scheme 1 gave it, so duplicates and leakage as validate
counts them stay in one split and no row changes split across the scheme change."""

import hashlib
import random

import pyarrow as pa

from pipeline.collect import keys
from pipeline.text import normalize_text
from tests.helpers import shipped_rows


def test_the_written_classes_are_what_this_python_and_pyarrow_give():
    # Deriving them costs 0.3 s a process, so keys.py holds them written out; a Python or pyarrow
    # whose Unicode data differs must regenerate them (keys.derive_classes()), never run with stale ones.
    assert keys.derive_classes() == (keys.LOWER_ONLY, keys.ARROW_NFKC)


def test_the_form_is_normalize_texts_for_every_character_and_mixes_of_them():
    chars = [chr(c) for first, last in keys.BLOCKS for c in range(first, last + 1)]
    # Beside them, what must take normalize_text's own way: final sigma, ß, a combining accent
    # after a letter, Hangul jamo that NFKC joins, a kana voicing mark, line separator, dotted I.
    awkward = ["ΟΔΟΣ", "ς", "Straße", "e\u0301", "\u1100\u1161\u11a8", "か\u3099", "a\u2028b", "İ", "\u00a0x\u3000"]
    assert keys.normalized(pa.array(chars + awkward)) == [normalize_text(t) for t in chars + awkward]
    rng = random.Random(0)
    pool = chars + awkward + [" ", "  ", "\t", "\n", "\x1c", "A", "Ｑ", "，"]
    mixed = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(20_000)]
    assert keys.normalized(pa.array(mixed)) == [normalize_text(t) for t in mixed]


def test_keys_are_pinned_content_based_and_ignore_the_batch():
    texts = [
        "Where is my order?",
        "  WHERE is   my\torder? ",
        "我的订单在哪里，请尽快！",
        "Ｗｈｅｒｅ ｉｓ",
        "Straße",
        "ΟΔΟΣ",
        "",
    ]
    got = keys.text_keys(pa.array(texts))
    # Pinned, and scheme 1's: the first 8 bytes of the sha256 of the normalised text, so a snapshot
    # re-collected under scheme 2 keeps every row in its split.
    assert [f"{int(k):016x}" for k in got] == [
        "2b72e2ae144137de",
        "2b72e2ae144137de",
        "7ab518c758b50f2b",
        "0d39029fbd50c194",
        "16d96952087774fe",
        "15846f275ca06b00",
        "e3b0c44298fc1c14",
    ]
    scheme_1 = [int.from_bytes(hashlib.sha256(normalize_text(t).encode()).digest()[:8], "big") for t in texts]
    assert [int(k) for k in got] == scheme_1
    assert [keys.split_of(t, 0.2) for t in texts] == ["eval", "eval", "train", "eval", "eval", "eval", "train"]
    rows = [r["text"] for r in shipped_rows(labels=8, per_label=100)]
    column = pa.array(rows)
    whole = keys.text_keys(column)
    assert list(whole[7:300]) == list(keys.text_keys(column.slice(7, 293)))  # a slice: its own offsets
    assert list(whole[:5]) == [keys.text_keys(pa.array([t]))[0] for t in rows[:5]]
    splits = keys.split_column(pa.array(rows + [None]), 0.2).to_pylist()
    assert splits[-1] == "train" and 0.12 < splits.count("eval") / len(rows) < 0.28
