"""What the benchmarks share: the machine and commit a figure was measured on, a command run with
the arrival time of each output line, median/min/max of repetitions, and the result file
``bench/results/<name>.json`` that ``bench/report.py`` turns into the tables of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> dict[str, Any]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "gpus": gpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def timed_lines(
    command: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float = 1800
) -> tuple[int, list[tuple[float, str]], float]:
    """Run ``command``; its exit code, each output line (stdout and stderr) with the seconds since
    the start at which it arrived, and the wall time."""
    started = time.perf_counter()
    process = subprocess.Popen(
        list(command),
        env=dict(env or os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append((time.perf_counter() - started, line.rstrip("\n")))
        if time.perf_counter() - started > timeout_s:
            process.kill()
            break
    code = process.wait()
    return code, lines, time.perf_counter() - started


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max, rounded for a table."""
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def provenance() -> dict[str, Any]:
    """The exact command, the machine, the commit and the date of a measurement."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_result(name: str, report: dict[str, Any], out: Path | None = None) -> Path:
    """``bench/results/<name>.json`` with the figures, the machine, the commit, the date and the command."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, **provenance(), **report}, indent=2) + "\n")
    return path


def update_result(
    name: str, sections: dict[str, dict[str, Any]], out: Path | None = None, drop: Sequence[str] = ()
) -> Path:
    """Replace ``sections`` of ``bench/results/<name>.json``, each with its own command, machine,
    commit and date, and keep the rest as it was measured: a benchmark measured in parts (one path
    at a time) keeps one result file. ``drop`` removes keys the new sections supersede."""
    path = out or RESULTS / f"{name}.json"
    full = json.loads(path.read_text()) if path.exists() else {"name": name}
    for key in drop:
        full.pop(key, None)
    stamp = provenance()
    full.update({key: {**stamp, **section} for key, section in sections.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full, indent=2) + "\n")
    return path
