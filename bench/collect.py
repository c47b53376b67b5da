"""collect against a plain download: one JSONL object of --rows rows on Moto's S3 API on loopback,
`collect.run` on it against boto3's download_file of the same object, interleaved, --repeats times.

Each collect runs in a child process of its own (imports paid before the clock starts), so its
peak RSS (VmHWM) is its own. With ``--base REV`` the same object is also collected by the
pipeline package of git revision REV (``git archive`` into a temporary directory), interleaved
with this tree's: base and new share the machine's load, and their ratios are comparable.
Target (issue 26): >= 0.5x the plain download, peak RSS within 2x of the base's.

  .venv/bin/python bench/collect.py --rows 1000000 --repeats 5 --base HEAD   # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.data_throughput import moto  # noqa: E402
from bench.harness import spread, write_result  # noqa: E402

BUCKET = "bench-collect"
KEY = "intents/rows.jsonl"

# The child: import what collect imports, then time collect.run alone; prints seconds and the snapshot.
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy, pandas, pyarrow, pyarrow.compute, pyarrow.json, pyarrow.parquet, boto3
from pipeline import collect
from pipeline.config import load_config
cfg = load_config(None, json.loads(sys.argv[2]))
started = time.perf_counter()
result = collect.run(cfg)
seconds = time.perf_counter() - started
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"seconds": seconds, "sha256": result.sha256, "rows": result.rows, "rows_eval": result.rows_eval,
                  "peak_rss_kib": int(status["VmHWM"].split()[0]), "package": collect.__file__}))
"""


def source_object(client, rows: int) -> int:
    """``rows`` shipped-like JSONL records (English and Chinese), every text unique; its bytes."""
    shipped = [json.loads(line) for line in (ROOT / "pipeline/data/support_intents.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    lines = []
    for number in range(rows):
        row = rng.choice(shipped)
        lines.append(json.dumps({"text": f"{row['text']} #{number}", "label": row["label"]}, ensure_ascii=False))
    body = ("\n".join(lines) + "\n").encode()
    client.put_object(Bucket=BUCKET, Key=KEY, Body=body)
    return len(body)


def plain_download(client, dest: Path) -> float:
    started = time.perf_counter()
    client.download_file(BUCKET, KEY, str(dest))
    seconds = time.perf_counter() - started
    dest.unlink()
    return seconds


def run_alone(tree: Path, home: Path, run: str) -> tuple[float, int, dict]:
    """Seconds of collect.run in a child process, the child's peak RSS in bytes (its own VmHWM: after
    fork and exec, wait4's ru_maxrss still counts the parent's pages), and what it printed."""
    settings = [f'collect.sources=["s3://{BUCKET}/{KEY}"]', f"run_id=bench-{run}", f"model_name=bench-{run}"]
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tree), json.dumps(settings)],
            env={**os.environ, "FINETUNE_HOME": str(home)},
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
        _, status, _ = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            raise SystemExit(f"collect ({tree}) failed with exit code {process.returncode}")
        out.seek(0)
        printed = json.loads(out.read().strip().splitlines()[-1])
    return printed["seconds"], printed["peak_rss_kib"] * 1024, printed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base", help="a git revision whose collect runs interleaved with this tree's")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        HF_HUB_OFFLINE="1",
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops its server
    trees = {"new": ROOT}
    download_s: list[float] = []
    runs: dict[str, list[tuple[float, int, dict]]] = {}
    server = moto(port)
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-collect-bench-") as tmp_name:
            tmp = Path(tmp_name)
            if args.base:
                base = tmp / "base"
                base.mkdir()
                archive = subprocess.run(
                    ["git", "archive", args.base, "pipeline"], cwd=ROOT, capture_output=True, check=True
                )
                subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
                trees = {"base": base, "new": ROOT}
            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            size = source_object(client, args.rows)
            for repeat in range(args.repeats):  # interleaved: download, then each tree's collect
                download_s.append(plain_download(client, tmp / "download.jsonl"))
                line = f"collect bench: run {repeat + 1}/{args.repeats}: download {download_s[-1]:.2f} s"
                for name, tree in trees.items():
                    home = tmp / f"home-{name}-{repeat}"
                    runs.setdefault(name, []).append(run_alone(tree, home, f"{name}-{repeat}"))
                    seconds, rss, _ = runs[name][-1]
                    line += f", {name} {seconds:.2f} s ({rss / 2**20:.0f} MiB)"
                print(line, file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
    mib = size / 2**20
    report: dict = {
        "setup": {
            "s3": "moto server on loopback",
            "rows": args.rows,
            "source_mib": round(mib, 1),
            "repeats": args.repeats,
            "base": args.base,
            "base_commit": _short(args.base) if args.base else None,
        },
        "plain_boto3_mib_per_s": spread([mib / s for s in download_s]),
    }
    for name, measured in runs.items():
        report[name] = {
            "seconds": spread([s for s, _, _ in measured]),
            "mib_per_s": spread([mib / s for s, _, _ in measured]),
            "ratio": spread([d / s for d, (s, _, _) in zip(download_s, measured)]),
            "peak_rss_mib": spread([r / 2**20 for _, r, _ in measured]),
            "sha256": sorted({p["sha256"] for _, _, p in measured}),
            "rows_eval": sorted({p["rows_eval"] for _, _, p in measured}),
        }
    path = write_result("collect", report, args.out)
    print(json.dumps({k: v["ratio"] for k, v in report.items() if isinstance(v, dict) and "ratio" in v}, indent=2))
    print(f"collect bench: wrote {path}", file=sys.stderr)
    return 0


def _short(revision: str) -> str:
    """The abbreviated commit a revision (``63307b7~1``, ``HEAD``) names."""
    named = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, capture_output=True, text=True)
    return named.stdout.strip() or revision


if __name__ == "__main__":
    sys.exit(main())
