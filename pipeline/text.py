"""Text normalisation shared by splitting, duplicate detection, drift and answer scoring.

    python -c "from pipeline.text import normalize_text; print(normalize_text('  Where IS   my order?'))"
"""

from __future__ import annotations

import unicodedata

# Kana and CJK ideographs: scripts without spaces between words, so each character counts as a
# word (ROUGE-L in pipeline/chat.py, the OOV rate in pipeline/drift.py).
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"


def normalize_text(text: str) -> str:
    """The form used for hashing, splitting and duplicate detection: NFKC, case-folded, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())
