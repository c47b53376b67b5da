"""Helpers for writing small real inputs; imported by tests and fixtures."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
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



def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def moto_server(env: dict[str, str] | None = None, probe_path: str = "") -> Iterator[str]:
    """Moto's S3 (and IAM) API in server mode on a free loopback port; yields its endpoint.

    ``probe_path`` is what the start-up check requests: ``/moto-api/`` is not an AWS action, so
    it does not use up a server's INITIAL_NO_AUTH_ACTION_COUNT.
    """
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint + probe_path, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
