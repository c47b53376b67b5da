"""Helpers for writing small real inputs; imported by tests and fixtures."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DATA = ROOT / "pipeline" / "data" / "support_intents.jsonl"
PYTHON = sys.executable


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def shipped_rows(labels: int, per_label: int) -> list[dict]:
    """The first ``per_label`` rows of each of the first ``labels`` intents of the shipped data."""
    rows = [json.loads(line) for line in SHIPPED_DATA.read_text(encoding="utf-8").splitlines()]
    chosen = sorted({r["label"] for r in rows})[:labels]
    out: list[dict] = []
    for label in chosen:
        out += [r for r in rows if r["label"] == label][:per_label]
    return out


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env

