"""`make demo` from a fresh clone, timed as a newcomer meets it: the install, each step of the run,
the checkpoints train saved (how many, how large, how long from its step to its marker) and the
per-language accuracies evaluate printed, against issue 26's targets (6 minutes with the install;
eval English >= 0.99, Chinese >= 0.90; challenge English >= 0.94, Chinese >= 0.88). Writes
bench/results/demo.json for BENCHMARKS.md.

    .venv/bin/python bench/demo.py [--runs 2]

Each run clones this checkout's HEAD into a temporary folder and runs `make demo` there, with its
own FINETUNE_HOME. uv's package cache stays as it is (a first install on a machine downloads what
later ones take from it); every install builds DeepSpeed's CPU ops into its own venv.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import spread, timed_lines, write_result  # noqa: E402

TARGET_S = 360
FLOORS = {"latin": 0.99, "zh": 0.90, "challenge:latin": 0.94, "challenge:zh": 0.88}
STEP = re.compile(r"launch: step '(\w+)' ended \((-?\d+)\) after ([0-9.]+) s")
SLICE = re.compile(r"evaluate:\s+slice (\S+) \((\d+) rows\) accuracy=([0-9.]+)")
SAVED = re.compile(r"checkpoint at step (\d+) saved to .* \(([0-9.]+) MiB")
TRAIN_STEP = re.compile(r"train: step (\d+)/(\d+) ")


def parse(lines: list[tuple[float, str]]) -> dict[str, Any]:
    """The figures of one `make demo`'s output (each line with its arrival, seconds from the start)."""
    installed = next((t for t, line in lines if line.startswith("touch .venv/.installed")), None)
    steps = {m[1]: float(m[3]) for _, line in lines if (m := STEP.search(line)) and m[2] == "0"}
    accuracy = {m[1]: float(m[3]) for _, line in lines if (m := SLICE.search(line))}
    logged = {int(m[1]): t for t, line in lines if (m := TRAIN_STEP.search(line))}
    saves = []
    for arrived, line in lines:
        if m := SAVED.search(line):
            step = int(m[1])
            saves.append(
                # the last step's line comes after its save: no figure for that one
                {
                    "step": step,
                    "mib": float(m[2]),
                    "s": round(arrived - logged[step], 1) if logged.get(step, 1e9) <= arrived else None,
                }
            )
    return {
        "install_s": round(installed, 1) if installed is not None else None,
        "built_deepspeed_ops": any("train: building DeepSpeed's" in line for _, line in lines),
        "steps_s": steps,
        "checkpoints": saves,
        "accuracy": accuracy,
        "floors_met": all(accuracy.get(name, 0.0) >= floor for name, floor in FLOORS.items()),
    }


def one_run(scratch: Path) -> dict[str, Any]:
    clone = scratch / "finetune-pipeline"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    code, lines, wall = timed_lines(
        ["make", "-C", str(clone), "demo", f"FINETUNE_HOME={scratch / 'home'}"], timeout_s=3600
    )
    if code != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise SystemExit(f"make demo exited {code} after {wall:.0f} s:\n{tail}")
    return {"wall_s": round(wall, 1), **parse(lines)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="Fresh clones to run make demo in, one after another.")
    parser.add_argument("--out", type=Path, default=None, help="Result file (default: bench/results/demo.json).")
    args = parser.parse_args(argv)
    runs = []
    for number in range(args.runs):
        scratch = Path(tempfile.mkdtemp(prefix="finetune-demo-bench-"))
        try:
            runs.append(one_run(scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"run {number + 1}: {runs[-1]}", flush=True)
    walls = [r["wall_s"] for r in runs]
    report = {
        "target_s": TARGET_S,
        "floors": FLOORS,
        "wall_s": spread(walls),
        "runs": runs,
    }
    print(f"make demo from a fresh clone: {report['wall_s']} (target {TARGET_S} s)")
    print(write_result("demo", report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
