"""Keys: the split of a column of texts, from the sha256 of each text's normalised form
(``pipeline.text.normalize_text``), the normalising done a column at a time: the split scheme 1
gave each text, so a snapshot re-collected under scheme 2 (``pipeline.snapshot``) keeps every
row in its split and a champion trained before the change has seen none of the new eval rows.

The form is normalize_text's exactly (NFKC, case-folded, single spaces), so two texts that
validate counts as duplicates or as leakage always get the same key and land in the same split.
Arrow computes it (NFKC where needed, lower case, whitespace runs to one space) for ASCII rows and
for rows whose characters all lie in ``LOWER_ONLY`` or all in ``ARROW_NFKC``: classes (from
``derive_classes``) where that is, character by character, what normalize_text does, and where
NFKC never joins two characters. Other rows (Greek, whose final sigma case-folds apart from lower
case; ß; combining accents; Hangul beside full-width punctuation; ...) are normalised by
normalize_text itself, a row at a time (tests/pipeline/test_collect_keys.py).

A row's key is the first 8 bytes of the sha256 of its form's UTF-8 (big-endian); it is ``eval``
when the key over 2**64 is below ``eval_fraction``, exactly scheme 1's test. Deterministic and
content-based: it depends on the text alone, never on the file, the batch or the row's position.
The sha256 is a Python call a row (about 1.3 s a million rows here, the price of keeping the
split across the change; a polynomial hash over the Arrow buffers took 0.2 s but moved 80% of
the eval rows).

    python -c "from pipeline.collect.keys import split_of; print(split_of('Where is my order?', 0.2))"

numpy and pyarrow are imported inside the functions that compute.
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Any

from pipeline.text import normalize_text

# Where Arrow may compute normalize_text's form: blocks of characters, each then sorted by the
# check in ``derive_classes`` (ASCII, Latin-1, general punctuation, CJK punctuation and kana, CJK
# ideographs, Hangul syllables, full-width forms, emoji).
BLOCKS = (
    (0x00, 0x7F),
    (0xA0, 0xFF),
    (0x2010, 0x205F),
    (0x3000, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0xFF01, 0xFF5E),
    (0x1F300, 0x1FAFF),
)
# The two classes ``derive_classes`` gives for this Python and this pyarrow, written out: deriving
# them costs 0.3 s a process, and tests/pipeline/test_collect_keys.py fails if they ever differ.
LOWER_ONLY = (
    r"\x{0}-\x{7f}\x{a1}-\x{a7}\x{a9}\x{ab}-\x{ae}\x{b0}-\x{b1}\x{b6}-\x{b7}\x{bb}\x{bf}-\x{de}"
    r"\x{e0}-\x{ff}\x{2010}\x{2012}-\x{2016}\x{2018}-\x{2023}\x{2027}\x{202a}-\x{202e}\x{2030}-"
    r"\x{2032}\x{2035}\x{2038}-\x{203b}\x{203d}\x{203f}-\x{2046}\x{204a}-\x{2056}\x{2058}-\x{205e}"
    r"\x{3001}-\x{3029}\x{3030}-\x{3035}\x{3037}\x{303b}-\x{3098}\x{309d}-\x{309e}\x{30a0}-"
    r"\x{30fe}\x{4e00}-\x{9fff}\x{ac00}-\x{d7a3}\x{1f300}-\x{1faff}"
)
ARROW_NFKC = (
    r"\x{0}-\x{7f}\x{a1}-\x{a7}\x{a9}-\x{ae}\x{b0}-\x{b3}\x{b6}-\x{b7}\x{b9}-\x{bb}\x{bf}\x{c6}"
    r"\x{d0}\x{d7}-\x{d8}\x{de}\x{e6}\x{f0}\x{f7}-\x{f8}\x{fe}\x{2010}\x{2012}-\x{2016}\x{2018}-"
    r"\x{2027}\x{202a}-\x{202e}\x{2030}-\x{2032}\x{2035}\x{2038}-\x{203d}\x{203f}-\x{2056}"
    r"\x{2058}-\x{205e}\x{3001}-\x{3029}\x{3030}-\x{3035}\x{3037}\x{303b}-\x{304b}\x{304d}\x{304f}"
    r"\x{3051}\x{3053}\x{3055}\x{3057}\x{3059}\x{305b}\x{305d}\x{305f}\x{3061}\x{3063}-\x{3064}"
    r"\x{3066}\x{3068}\x{306a}-\x{306f}\x{3072}\x{3075}\x{3078}\x{307b}\x{307e}-\x{3093}\x{3095}-"
    r"\x{3098}\x{309d}\x{30a0}-\x{30ab}\x{30ad}\x{30af}\x{30b1}\x{30b3}\x{30b5}\x{30b7}\x{30b9}"
    r"\x{30bb}\x{30bd}\x{30bf}\x{30c1}\x{30c3}-\x{30c4}\x{30c6}\x{30c8}\x{30ca}-\x{30cf}\x{30d2}"
    r"\x{30d5}\x{30d8}\x{30db}\x{30de}-\x{30f3}\x{30f5}-\x{30f6}\x{30fb}-\x{30fd}\x{4e00}-\x{9fff}"
    r"\x{ff01}-\x{ff5e}\x{1f300}-\x{1faff}"
)
WHITESPACE = "[\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f ]"  # str.split()'s whitespace among those characters' forms
BLOCK_BYTES = 1 << 20  # bytes scanned per numpy pass (the whitespace check)


def split_of(text: str, eval_fraction: float) -> str:
    """The split of one text (what ``split_column`` gives it in a column). A string UTF-8 cannot
    hold (an unpaired surrogate) raises UnicodeEncodeError."""
    import pyarrow as pa

    text.encode()
    return str(split_column(pa.array([text], pa.string()), eval_fraction)[0])


def split_column(texts: Any, eval_fraction: float) -> Any:
    """``train`` or ``eval`` for each text of an Arrow string array; a null text is ``train``."""
    import numpy as np
    import pyarrow as pa

    is_eval = text_keys(texts).astype(np.float64) / 2.0**64 < eval_fraction  # as int / 2**64 rounds
    if texts.null_count:
        is_eval &= ~np.asarray(texts.is_null().to_numpy(zero_copy_only=False))
    return pa.array(["train", "eval"], pa.string()).take(pa.array(is_eval.view(np.int8)))  # no numpy strings


def text_keys(texts: Any) -> Any:
    """The 64-bit key (numpy uint64) of each text's normalised form; a null's is that of ''."""
    import numpy as np

    keys = np.zeros(len(texts), np.uint64)
    for rows, forms in _forms(texts):
        keys[rows] = np.fromiter(
            (int.from_bytes(hashlib.sha256(form.encode()).digest()[:8], "big") for form in forms.to_pylist()),
            np.uint64,
            len(forms),
        )
    return keys


def normalized(texts: Any) -> Any:
    """normalize_text of each text of an Arrow string array, as a Python list (nulls as '')."""
    out: list[str] = [""] * len(texts)
    for rows, forms in _forms(texts):
        for row, form in zip(rows.tolist(), forms.to_pylist()):
            out[row] = form
    return out


def _forms(texts: Any) -> list[tuple[Any, Any]]:
    """normalize_text's form of every text, in parts: (row numbers, their forms as an Arrow string
    array), a later part's rows overriding an earlier's (the whitespace pass)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = texts.cast(pa.string()).fill_null("")
    ascii_rows = pc.string_is_ascii(texts)
    parts = []
    if pc.all(ascii_rows).as_py():
        parts.append((np.arange(len(texts)), pc.ascii_lower(texts)))
    else:
        other = pc.invert(ascii_rows)
        parts.append((_where(ascii_rows), pc.ascii_lower(texts.filter(ascii_rows))))
        rows = texts.filter(other)
        kept = pc.invert(pc.match_substring_regex(rows, f"[^{LOWER_ONLY}]"))
        mapped = pc.and_(pc.invert(kept), pc.invert(pc.match_substring_regex(rows, f"[^{ARROW_NFKC}]")))
        python = pc.invert(pc.or_(kept, mapped))
        numbers = _where(other)
        parts.append((numbers[_where(kept)], pc.utf8_lower(rows.filter(kept))))
        if pc.any(mapped).as_py():
            parts.append((numbers[_where(mapped)], pc.utf8_lower(_nfkc(rows.filter(mapped)))))
        if pc.any(python).as_py():  # normalize_text's own answer, which the whitespace pass keeps
            own = [normalize_text(t) for t in rows.filter(python).to_pylist()]
            parts.append((numbers[_where(python)], pa.array(own, pa.string())))
    tidied = []
    for numbers, forms in parts:  # only rows with a run, an edge space or a break need the regex
        messy = _messy(forms)
        if messy.any():
            tidy = pc.replace_substring_regex(forms.filter(pa.array(messy)), f"{WHITESPACE}+", " ")
            tidied.append((numbers[messy], pc.utf8_trim(tidy, " ")))
    return parts + tidied


def _nfkc(texts: Any) -> Any:
    import pyarrow.compute as pc

    return pc.utf8_normalize(texts, "NFKC")  # type: ignore[attr-defined]  # not in pyarrow-stubs


def _where(mask: Any) -> Any:
    import numpy as np

    return np.flatnonzero(mask.to_numpy(zero_copy_only=False))


def derive_classes() -> tuple[str, str]:
    """The two RE2 character classes over BLOCKS, from this Python and this pyarrow.

    ``LOWER_ONLY``: characters NFKC leaves alone, that are no combining mark and no whitespace
    beyond ASCII, and whose case fold is Arrow's lower case: normalize_text of a row of them is
    Arrow's lower case and the whitespace pass. ``ARROW_NFKC``: such characters that Arrow's NFKC
    also leaves alone, and characters whose NFKC is ASCII in both (full-width forms): there it is
    Arrow's NFKC, then lower case. (This pyarrow's NFKC decomposes what Python's keeps composed,
    such as a grave a or a Hangul syllable, hence two classes.) Neither holds a character NFKC
    could join to its neighbour: no combining mark, and Hangul jamo and the like lie outside BLOCKS.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    chars = [chr(c) for first, last in BLOCKS for c in range(first, last + 1)]
    arrow = pa.array(chars, pa.string())
    arrow_lower = pc.utf8_lower(arrow).to_pylist()
    arrow_nfkc = _nfkc(arrow).to_pylist()
    lower_only, nfkc_ok = [], []
    for char, lowered, decomposed in zip(chars, arrow_lower, arrow_nfkc):
        python = unicodedata.normalize("NFKC", char)
        plain = not unicodedata.combining(char) and (char.isascii() or not char.isspace())
        folds = char.casefold() == lowered
        if python == char and plain and folds:
            lower_only.append(ord(char))
        if plain and decomposed == python and (python == char and folds or python.isascii()):
            nfkc_ok.append(ord(char))
    return _class(lower_only), _class(nfkc_ok)


def _class(points: list[int]) -> str:
    """An RE2 class body for these code points, as ranges."""
    runs: list[list[int]] = []
    for point in points:
        if runs and runs[-1][1] == point - 1:
            runs[-1][1] = point
        else:
            runs.append([point, point])
    return "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in runs)


def _messy(texts: Any) -> Any:
    """Which strings (numpy bool) hold whitespace that normalize_text would change: a space at
    either end, two in a row, or any other ASCII whitespace; found in the bytes, a block at a time."""
    import numpy as np

    offsets, values = _buffers(texts)
    messy = np.zeros(len(texts), bool)
    filled = offsets[1:] > offsets[:-1]
    if not filled.any():
        return messy
    messy[filled] = (values[offsets[:-1][filled]] == 32) | (values[offsets[1:][filled] - 1] == 32)
    low, high = int(offsets[0]), int(offsets[-1])
    for start in range(low, high, BLOCK_BYTES):
        stop = min(start + BLOCK_BYTES, high)
        block = values[start : min(stop + 1, high)]  # one byte more: a pair across two blocks
        head = block[: stop - start]
        breaks = np.flatnonzero(((head >= 9) & (head <= 13)) | ((head >= 28) & (head <= 31))) + start
        messy[np.searchsorted(offsets, breaks, "right") - 1] = True
        pairs = np.flatnonzero((block[:-1] == 32) & (block[1:] == 32)) + start
        first, second = (np.searchsorted(offsets, pairs + k, "right") - 1 for k in (0, 1))
        messy[first[first == second]] = True  # both spaces in one string
    return messy


def _buffers(texts: Any) -> tuple[Any, Any]:
    """An Arrow string array's offsets (int64) and bytes (uint8), as numpy views where they can be."""
    import numpy as np

    offsets = np.frombuffer(texts.buffers()[1], np.int32, len(texts) + 1, texts.offset * 4).astype(np.int64)
    data = texts.buffers()[2]
    return offsets, np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
