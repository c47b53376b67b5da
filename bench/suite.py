"""Where `make test`'s time goes: the JUnit report of one whole run, summed per test module, with
the slowest tests (setup, call and teardown together, as pytest's report counts them), written to
bench/results/suite.json for BENCHMARKS.md. `make test` writes the report
(.finetune/test-report.xml); the wall times are what the run took, measured outside it.

    .venv/bin/python bench/suite.py --junit .finetune/test-report.xml --tests-s 1606 --wall-s 1760
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import write_result  # noqa: E402


def summarize(junit: Path, top: int = 12) -> dict[str, Any]:
    """Per module: tests and seconds, most first; the ``top`` slowest tests; the outcome counts."""
    modules: dict[str, dict[str, float]] = defaultdict(lambda: {"tests": 0, "seconds": 0.0})
    tests, outcomes = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for case in ET.parse(junit).iter("testcase"):
        module = case.get("classname", "")  # tests.pipeline.test_train (a module, or module.Class)
        seconds = float(case.get("time", 0))
        modules[module]["tests"] += 1
        modules[module]["seconds"] += seconds
        tests.append((seconds, f"{module}::{case.get('name')}"))
        kinds = {child.tag for child in case}
        outcome = (
            "failed"
            if "failure" in kinds
            else "error"
            if "error" in kinds
            else "skipped"
            if "skipped" in kinds
            else "passed"
        )
        outcomes[outcome] += 1
    ranked = sorted(modules.items(), key=lambda item: -item[1]["seconds"])
    return {
        "outcomes": outcomes,
        "tests": len(tests),
        "seconds_in_tests": round(sum(s for s, _ in tests), 1),
        "modules": [
            {"module": name, "tests": int(m["tests"]), "seconds": round(m["seconds"], 1)} for name, m in ranked
        ],
        "slowest": [{"test": name, "seconds": round(s, 1)} for s, name in sorted(tests, reverse=True)[:top]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, required=True, help="the JUnit XML of one whole `make test` run")
    parser.add_argument("--tests-s", type=float, required=True, help="pytest's own wall time (its last line)")
    parser.add_argument("--wall-s", type=float, required=True, help="the whole command's wall time, install included")
    parser.add_argument("--how", default="", help="how the run was made (clean clone, load, ...)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    # The target (issue 26): a clean clone through CI=true bash .ci/run, install included, 12 minutes.
    report = {
        "setup": {"how": args.how, "tests_s": args.tests_s, "wall_s": args.wall_s, "target_wall_s": 12 * 60},
        **summarize(args.junit),
    }
    print(write_result("suite", report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
