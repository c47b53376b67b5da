"""Benchmark: the validate step's Great Expectations suite on 1,000,000 classification rows against
a vectorised pandas implementation of the same checks on the same data.

Each measurement runs in a subprocess of its own, so its peak RSS is its own; wall time is the
subprocess's, imports included. The snapshot is built once: the shipped support intents with a
running suffix, so no two texts are equal and the suite passes (the work is that of a good day).

    .venv/bin/python bench/validate_1m.py --rows 1000000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_snapshot(rows: int, path: Path) -> None:
    import numpy as np
    import pandas as pd

    from pipeline.collect import split_of

    source = [json.loads(line) for line in (ROOT / "pipeline" / "data" / "support_intents.jsonl").open()]
    picks = np.random.default_rng(0).integers(0, len(source), rows)
    texts = [f"{source[i]['text']} (ticket {n})" for n, i in enumerate(picks)]
    frame = pd.DataFrame(
        {"text": texts, "label": [source[i]["label"] for i in picks], "split": [split_of(t, 0.2) for t in texts]}
    )
    frame.to_parquet(path, index=False)


def child_gx(snapshot: Path, home: Path, with_reference: bool) -> dict:
    """validate.run as the step runs it: tokenizer, derived columns, GX suite, Data Docs, MLflow."""
    os.environ["FINETUNE_HOME"] = str(home)
    from pipeline import storage, validate
    from pipeline.config import load_config
    from pipeline.validate.accepted import accepted_uri

    cfg = load_config(None, [f"validate.snapshot_uri={snapshot.as_uri()}", "run_id=bench"])
    if with_reference:  # the snapshot accepted before: drift is then measured against 1M rows
        storage.write_json(accepted_uri(cfg), {"snapshot_uri": snapshot.as_uri(), "labels": [], "task": cfg.task})
    result = validate.run(cfg)
    summary = storage.read_json(result.summary_uri)
    return {
        "passed": result.passed,
        "failed": result.failed,
        "phases_s": summary["timings_s"],
        "tokens_counted": summary["token_count"]["rows_counted"],
    }


def child_pandas(snapshot: Path) -> dict:
    """The same checks in vectorised pandas: same normalisation, same token sample, no report."""
    import numpy as np
    import pandas as pd

    from pipeline.config import load_config
    from pipeline.models import load_tokenizer
    from pipeline.snapshot import load_snapshot
    from pipeline.text import normalize_text
    from pipeline.validate.columns import rows_to_count, utf8_bytes

    phases = {}
    clock = time.perf_counter()
    cfg = load_config(None, [f"validate.snapshot_uri={snapshot.as_uri()}"])
    own = cfg.validate
    frame = load_snapshot(own.snapshot_uri)
    phases["load"] = time.perf_counter() - clock
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(cfg.base_model, Path(tmp))
    text, label, split = frame["text"], frame["label"], frame["split"]
    masks = {}  # check -> boolean mask of failing rows
    masks["text_present"] = text.isna().to_numpy()
    masks["text_not_blank"] = text.str.fullmatch(r"\s*").fillna(False).to_numpy(bool)
    lengths = text.str.len()
    masks["text_length"] = ((lengths < 1) | (lengths > own.max_text_chars)).fillna(False).to_numpy(bool)
    positions = rows_to_count(utf8_bytes(text) + 1, own.max_text_tokens, own.token_sample_rows, cfg.seed)
    encoded = tokenizer(
        [text.iat[i] for i in positions],
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    counts = np.array([len(ids) for ids in encoded])
    tokens_bad = np.zeros(len(frame), bool)
    tokens_bad[positions] = (counts < 1) | (counts > own.max_text_tokens)
    masks["text_tokens"] = tokens_bad
    masks["label_present"] = label.isna().to_numpy()
    per_label = label.map(label.value_counts(dropna=False))
    masks["examples_per_class"] = (per_label < own.min_examples_per_class).to_numpy()
    masks["split_valid"] = (~split.isin(["train", "eval"])).to_numpy()
    normalized = pd.Series([normalize_text(t) if isinstance(t, str) else None for t in text], dtype="str")
    repeated = normalized.duplicated(keep=False).to_numpy()
    splits = split.groupby(normalized).transform("nunique")
    masks["split_leakage"] = (splits.fillna(1) > 1).to_numpy()
    phases["checks"] = time.perf_counter() - clock - phases["load"]
    failed = [name for name, mask in masks.items() if mask.any()]
    if repeated.mean() > own.max_duplicate_rate:
        failed.append("duplicate_rate")
    if label.nunique() < 2:
        failed.append("label_cardinality")
    if len(frame) < own.min_rows:
        failed.append("row_count")
    examples = {name: np.flatnonzero(mask)[:5].tolist() for name, mask in masks.items() if mask.any()}
    return {
        "passed": not failed,
        "failed": failed,
        "examples": examples,
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
        "tokens_counted": len(positions),
    }


def measure(mode: str, snapshot: Path, work: Path) -> dict:
    home = Path(tempfile.mkdtemp(dir=work, prefix=f"{mode}-"))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--snapshot", str(snapshot), "--home", str(home)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "true", "GX_ANALYTICS_ENABLED": "false"},
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["gx", "gx-drift", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = (
            child_pandas(args.snapshot)
            if args.child == "pandas"
            else child_gx(args.snapshot, args.home, args.child == "gx-drift")
        )
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        work = Path(tmp)
        snapshot = work / "data.parquet"
        start = time.perf_counter()
        build_snapshot(args.rows, snapshot)
        print(f"built {args.rows} rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        runs: dict[str, list[dict]] = {"gx": [], "pandas": []}
        for repeat in range(args.repeats):
            for mode in runs:
                runs[mode].append(measure(mode, snapshot, work))
                print(f"{mode} #{repeat + 1}: {json.dumps(runs[mode][-1])}", file=sys.stderr)
        with_drift = measure("gx-drift", snapshot, work)
        print(f"gx-drift: {json.dumps(with_drift)}", file=sys.stderr)
    med = {
        mode: {key: statistics.median(r[key] for r in results) for key in ("wall_s", "peak_rss_mb")}
        for mode, results in runs.items()
    }
    phases = {k: statistics.median(r["phases_s"][k] for r in runs["gx"]) for k in runs["gx"][0]["phases_s"]}
    print(
        json.dumps(
            {
                "rows": args.rows,
                "repeats": args.repeats,
                "median": med,
                "gx_phases_s": phases,
                "ratio_wall": round(med["gx"]["wall_s"] / med["pandas"]["wall_s"], 2),
                "gx_with_drift": with_drift,
                "agree": all(g["passed"] == p["passed"] for g, p in zip(runs["gx"], runs["pandas"])),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
