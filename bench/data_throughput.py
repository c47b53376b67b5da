"""Data throughput next to the plain alternatives, interleaved, --repeats times:

collect   `collect.run` over JSONL objects on Moto's S3 API on loopback (list, download, parse,
          normalise, deduplicate, split, write Parquet) vs a plain boto3 listing and
          download_file of the same objects. Target (issue 14): >= 0.8x.
tokenize  train's tokenization (`train.parts.classification_parts`: the fast tokenizer over the
          train split plus the Dataset it builds) vs one batched fast-tokenizer call over the
          same texts, after one untimed warm-up call of each. Target: >= 0.9x.

  .venv/bin/python bench/data_throughput.py --repeats 5 --mb 64      # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import spread, write_result  # noqa: E402

BUCKET = "bench-data"


def moto(port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return server
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto server did not start")


def objects(client, total_mb: int, files: int) -> int:
    """``files`` JSONL objects of shipped-like rows, ``total_mb`` in all, every text unique."""
    shipped = [json.loads(line) for line in (ROOT / "pipeline/data/support_intents.jsonl").read_text().splitlines()]
    rng, rows, size = random.Random(0), 0, 0
    per_file = total_mb * 2**20 // files
    for index in range(files):
        block, length = [], 0
        while length < per_file:
            row = rng.choice(shipped)
            block.append(
                json.dumps({"text": f"{row['text']} #{rows}", "label": row["label"]}, ensure_ascii=False) + "\n"
            )
            length += len(block[-1])
            rows += 1
        body = "".join(block).encode()
        size += len(body)
        client.put_object(Bucket=BUCKET, Key=f"intents/part-{index:03d}.jsonl", Body=body)
    return size


def plain_download(client, dest: Path) -> float:
    started = time.perf_counter()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="intents/")
    for obj in [o for page in pages for o in page.get("Contents", [])]:
        client.download_file(BUCKET, obj["Key"], str(dest / Path(obj["Key"]).name))
    return time.perf_counter() - started


def pipeline_collect(run: int) -> float:
    from pipeline import collect
    from pipeline.config import load_config

    started = time.perf_counter()
    collect.run(
        load_config(
            None, [f'collect.sources=["s3://{BUCKET}/intents/"]', f"run_id=bench-{run}", f"model_name=bench-{run}"]
        )
    )
    return time.perf_counter() - started


def tokenization(rows: int) -> tuple[float, float]:
    """Seconds of train's tokenization and of one batched tokenizer call, over the same texts."""
    import pandas as pd
    from transformers import AutoTokenizer

    from pipeline import storage
    from pipeline.config import DEFAULT_BASE_MODEL, load_config
    from pipeline.train import parts

    shipped = [json.loads(line) for line in (ROOT / "pipeline/data/support_intents.jsonl").read_text().splitlines()]
    frame = pd.DataFrame(
        [
            {**shipped[i % len(shipped)], "text": f"{shipped[i % len(shipped)]['text']} #{i}", "split": "train"}
            for i in range(rows)
        ]
    )
    model_dir = str(storage.local_path(DEFAULT_BASE_MODEL))
    cfg = load_config(None, ["train.snapshot_uri=bench"])
    started = time.perf_counter()
    parts.classification_parts(cfg, model_dir, frame, {})
    pipeline_s = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = time.perf_counter()
    tokenizer(list(frame["text"]), truncation=True, max_length=cfg.train.max_seq_len)
    return pipeline_s, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mb", type=int, default=64, help="size of the S3 source")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--token-rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        HF_HUB_OFFLINE="1",
    )
    collect_s, download_s, tokenize = [], [], []
    server = moto(port)
    try:
        with tempfile.TemporaryDirectory(prefix="finetune-data-bench-") as tmp:
            os.environ["FINETUNE_HOME"] = str(Path(tmp) / "home")
            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            size = objects(client, args.mb, args.files)
            # Untimed, both sides, on a slice: the first call pays imports (datasets, pyarrow's
            # compute, transformers' model classes) that train pays once per process whatever it
            # tokenizes; the table is about throughput.
            tokenization(1_000)
            for run in range(args.repeats):  # interleaved
                dest = Path(tempfile.mkdtemp(dir=tmp))
                download_s.append(plain_download(client, dest))
                collect_s.append(pipeline_collect(run))
                tokenize.append(tokenization(args.token_rows))
                print(
                    f"data: run {run + 1}/{args.repeats}: download {download_s[-1]:.1f} s, collect "
                    f"{collect_s[-1]:.1f} s, tokenize {tokenize[-1][0]:.2f}/{tokenize[-1][1]:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=10)
    mib = size / 2**20
    report = {
        "setup": {
            "s3": "moto server on loopback",
            "source_mib": round(mib, 1),
            "objects": args.files,
            "token_rows": args.token_rows,
            "repeats": args.repeats,
        },
        "collect": {
            "pipeline_mib_per_s": spread([mib / s for s in collect_s]),
            "plain_boto3_mib_per_s": spread([mib / s for s in download_s]),
            "ratio": spread([d / c for c, d in zip(collect_s, download_s)]),
        },
        "tokenize": {
            "pipeline_rows_per_s": spread([args.token_rows / p for p, _ in tokenize]),
            "one_batched_call_rows_per_s": spread([args.token_rows / b for _, b in tokenize]),
            "ratio": spread([b / p for p, b in tokenize]),
        },
    }
    path = write_result("data_throughput", report, args.out)
    print(json.dumps({k: v["ratio"] for k, v in report.items() if "ratio" in v}, indent=2))
    print(f"data: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
