"""Peak memory of `finetune collect` against source size: the check that collect streams.

Generates JSONL sources of the given sizes (unique English/Chinese texts, 8 labels), runs
`finetune collect` on each in a subprocess with its own FINETUNE_HOME, and records the child's
peak RSS (from /usr/bin/time -v, else getrusage), wall time, rows and source bytes. Streaming
means the peak stays roughly flat as the source grows. Generated data is deleted afterwards.

    .venv/bin/python bench/collect_memory.py --sizes-mb 50 500 --out bench/results/collect.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LABELS = ["order_status", "refund_request", "password_reset", "billing", "shipping", "cancel", "complaint", "other"]
WORDS = (
    "where is my parcel please refund the order password reset account billing invoice cancel "
    "subscription delivery late broken item 我的 订单 在 哪里 请 退款 密码 重置 账户 发票 取消 配送"
).split()


def generate(path: Path, target_bytes: int, seed: int = 0) -> int:
    """A JSONL file of about ``target_bytes``; every text unique (it carries its row number)."""
    rng = random.Random(seed)
    rows = 0
    with path.open("w", encoding="utf-8") as out:
        while out.tell() < target_bytes:
            block = []
            for _ in range(10_000):
                text = " ".join(rng.choices(WORDS, k=rng.randint(8, 60)))
                block.append(
                    json.dumps({"text": f"{text} #{rows}", "label": rng.choice(LABELS)}, ensure_ascii=False) + "\n"
                )
                rows += 1
            out.write("".join(block))
    return rows


def measure(source: Path, home: Path) -> dict:
    """Run `finetune collect` on ``source``; its peak RSS (KiB), wall seconds and result."""
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "collect",
        "--set",
        f"collect.sources={json.dumps([str(source)])}",
        "--set",
        "run_id=bench",
    ]
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    env = {**os.environ, "FINETUNE_HOME": str(home)}
    env.pop("FINETUNE_ARTIFACT_ROOT", None)
    started = time.perf_counter()
    done = subprocess.run(
        [timer, "-v", *command] if timer else command,
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"collect failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if timer:
        peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
        how = "/usr/bin/time -v"
    else:  # the largest of all children so far: run sources smallest first
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        how = "getrusage(RUSAGE_CHILDREN)"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"peak_kib": peak_kib, "wall_s": wall, "rows": result["rows"], "how": how}


def machine() -> str:
    cores = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cores} cores, {memory:.0f} GiB RAM, no GPU; {platform.platform()}; Python {platform.python_version()}"


def report(rows: list[dict], command: str) -> str:
    lines = [
        "# collect: peak memory against source size",
        "",
        "Recorded by `bench/collect_memory.py` (not a timed test). Each run is `finetune collect` on one",
        "generated JSONL file in a subprocess with its own `FINETUNE_HOME`; defaults otherwise",
        "(`collect.row_group_rows` = 100000).",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        f"- Peak RSS measured with: {rows[0]['how']} (the collect child process only)",
        "",
        "| source | source bytes | rows | wall time | peak RSS | peak RSS : source size |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rss = row["peak_kib"] * 1024
        lines.append(
            f"| {row['name']} | {row['bytes']:,} ({row['bytes'] / 2**20:.0f} MiB) | {row['rows']:,} "
            f"| {row['wall_s']:.1f} s | {rss / 2**20:.0f} MiB | {rss / row['bytes']:.2f} |"
        )
    small, large = rows[0], rows[-1]
    lines += [
        "",
        f"Source grew {large['bytes'] / small['bytes']:.1f}x; peak RSS grew "
        f"{large['peak_kib'] / small['peak_kib']:.2f}x. Memory is set by the chunk size and the imported",
        "libraries (pandas, pyarrow), not by the source: the whole source is never held in memory.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 500], help="source sizes, MiB")
    parser.add_argument("--workdir", default=None, help="where to put generated data (deleted afterwards)")
    parser.add_argument("--out", default="bench/results/collect.md", help="Markdown report to write")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="collect-bench-", dir=args.workdir) as tmp:
        for size in sorted(args.sizes_mb):
            source = Path(tmp) / f"source-{size}mb.jsonl"
            generate(source, size << 20)
            measured = measure(source, Path(tmp) / f"home-{size}")
            results.append({"name": source.name, "bytes": source.stat().st_size, **measured})
            print(json.dumps(results[-1]), file=sys.stderr)
            source.unlink()
            shutil.rmtree(Path(tmp) / f"home-{size}")
    command = "python bench/collect_memory.py " + " ".join(sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report(results, command.strip()), encoding="utf-8")
    print(Path(args.out).read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
