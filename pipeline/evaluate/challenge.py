"""The challenge set: hand-written rows (``evaluate.challenge_uri``) the model was never trained
on, read and checked against the model's labels, and its slices (``challenge``, ``challenge:zh``,
``challenge:latin``)."""

from __future__ import annotations

import json
import sys

from pipeline import storage
from pipeline.config import CHALLENGE, DEFAULT_CHALLENGE
from pipeline.errors import DataError
from pipeline.text import language_of


def challenge_rows(uri: str, known_labels: set[str]) -> tuple[list[str], list[str]]:
    """The texts and labels of the challenge file ``uri`` (JSONL, ``{"text", "label"}`` a line);
    none when ``uri`` is empty. A label the model cannot predict is a DataError naming the file
    and the labels, not rows scored as wrong: such a slice would measure the mismatch (a renamed
    intent, a typo in a label), not the model. The shipped default is for the demo's intents, so
    a model of other intents skips it with a note instead."""
    if not uri:
        return [], []
    texts, labels = parse_rows(storage.read_bytes(uri), f"evaluate.challenge_uri {uri}")
    if not texts:
        raise DataError(f"evaluate.challenge_uri {uri} has no rows; set evaluate.challenge_uri='' for none")
    unknown = sorted(set(labels) - known_labels)
    if unknown and uri == DEFAULT_CHALLENGE:
        print(
            f"evaluate: the shipped challenge set is skipped: its intents {unknown} are not this model's "
            f"(it knows {sorted(known_labels)}); set evaluate.challenge_uri to a file of your own labels, or '' "
            f"to say none",
            file=sys.stderr,
            flush=True,
        )
        return [], []
    if unknown:
        raise DataError(
            f"evaluate.challenge_uri {uri}: label(s) {unknown} "
            f"({sum(label in unknown for label in labels)} of {len(labels)} rows) are not labels the "
            f"model knows ({sorted(known_labels)}); relabel those rows or drop them"
        )
    return texts, labels


def parse_rows(content: bytes, where: str) -> tuple[list[str], list[str]]:
    """The texts and labels of a JSONL file of ``{"text", "label"}`` lines (the challenge set, a
    reference set); a line that is not one is a DataError starting with ``where``."""
    texts, labels = [], []
    for number, line in enumerate(content.decode("utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text, label = record["text"], record["label"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{where}: line {number} is not a JSON object with 'text' and 'label' ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(text, str) or not text.strip() or not isinstance(label, str) or not label:
            raise DataError(f"{where}: line {number}: 'text' and 'label' must be non-empty strings")
        texts.append(text)
        labels.append(label)
    return texts, labels


def challenge_slice_groups(texts: list[str]) -> dict[str, list[int]]:
    """Slice name -> positions of the challenge rows: all of them (``challenge``) and each language
    of them (``challenge:zh``, ``challenge:latin``), by ``text.language_of`` as for the eval rows."""
    if not texts:
        return {}
    groups: dict[str, list[int]] = {CHALLENGE: list(range(len(texts)))}
    for i, text in enumerate(texts):
        groups.setdefault(f"{CHALLENGE}:{language_of(text)}", []).append(i)
    return groups
