"""Text normalisation shared by splitting, duplicate detection, drift and answer scoring.

python -c "from pipeline.text import normalize_text; print(normalize_text('  Where IS   my order?'))"
"""

from __future__ import annotations

import functools
import re
import unicodedata

# Kana and CJK ideographs: scripts without spaces between words, so each character counts as a
# word (ROUGE-L in pipeline/chat.py, the OOV rate in pipeline/drift.py).
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"


def normalize_text(text: str) -> str:
    """The form used for hashing, splitting and duplicate detection: NFKC, case-folded, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


# Writing systems the evaluation slices by: a row is the first of these its text contains, in this
# order (kana marks Japanese even beside kanji; Han alone reads as Chinese), else "latin" when it
# has Latin letters, else "other".
SCRIPTS = (
    ("ja", "[\u3040-\u30ff]"),
    ("ko", "[\uac00-\ud7af\u1100-\u11ff]"),
    ("zh", "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"),
    ("latin", "[A-Za-z\u00c0-\u024f]"),
)
LANGUAGES = ("ja", "ko", "zh", "latin", "other")


@functools.cache
def compiled(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled on first use rather than at import: classes over thousands of code points
    take milliseconds each to compile, and every DAG parse imports this module through the step
    table (BENCHMARKS.md, DAG parse)."""
    return re.compile(pattern)


def language_of(text: str) -> str:
    """The writing system of ``text`` as an evaluation slice: ja, ko, zh, latin or other."""
    for name, pattern in SCRIPTS:
        if compiled(pattern).search(text):
            return name
    return "other"
