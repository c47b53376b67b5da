"""Helpers for writing small real inputs and reading the registry back; imported by tests and
fixtures. Test modules import from here, never from each other."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import cli, collect, storage
from pipeline.chat import CHATML
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "dags"
SHIPPED_DATA = ROOT / "pipeline" / "data" / "support_intents.jsonl"
PYTHON = sys.executable
MODEL_NAME = "support-intents"  # the default model_name


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


def write_snapshot(path: Path, rows: Any, columns: list[str] | None = None) -> str:
    """A snapshot-shaped Parquet file written by hand (rows as tuples with ``columns``, or a dict
    of columns), for inputs collect would refuse to publish; its URI."""
    import pandas as pd

    pd.DataFrame(rows, columns=columns).to_parquet(path, index=False)
    return path.as_uri()


# Four rows of the classifier fixture's three intents (conftest.py's classifier_dir), one in Chinese.
INTENT_ROWS = [
    ("where is my order", "order_status"),
    ("reset my password", "password_reset"),
    ("I want my money back", "refund_request"),
    ("我的订单在哪", "order_status"),
]


def intent_snapshot(tmp_path: Path, split: str = "eval") -> str:
    """``INTENT_ROWS`` three times (12 rows, 3 in Chinese), all in ``split``, as
    ``tmp_path/snap.parquet``: the small snapshot the evaluate tests score; its URI."""
    rows = [(text, label, split) for text, label in INTENT_ROWS * 3]
    return write_snapshot(tmp_path / "snap.parquet", rows, ["text", "label", "split"])


def collect_snapshot(sources: list[Any], *sets: str) -> collect.CollectResult:
    """A snapshot published by the real collect step from ``sources`` (paths or URIs)."""
    return collect.run(load_config(None, [f"collect.sources={json.dumps([str(s) for s in sources])}", *sets]))


def train_settings(snapshot: collect.CollectResult, model_dir: Any, run_id: str, *settings: str) -> list[str]:
    """The train step's settings for ``snapshot`` and the base model at ``model_dir``, on 2
    processes, followed by ``settings`` (later ones win)."""
    return [
        f"run_id={run_id}",
        f"base_model={json.dumps(str(model_dir))}",
        f"train.snapshot_uri={snapshot.snapshot_uri}",
        "train.num_processes=2",
        *settings,
    ]


def run_step_here(step: str, overrides: list[str]) -> dict[str, Any]:
    """``finetune <step> --set ...`` in this process, for tests where the process boundary is not
    what is checked (a step process costs seconds of imports); its result JSON, as
    ``local.launch_local`` returns it."""
    code = cli.main([step, *(arg for override in overrides for arg in ("--set", override))])
    assert code == 0, f"finetune {step} exited with {code}"
    return storage.read_json(load_config(None, overrides).step_uri(step) + "/result.json")


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


MOTO_START_S = 120


@contextlib.contextmanager
def moto_server(env: dict[str, str] | None = None, probe_path: str = "", host: str = "127.0.0.1") -> Iterator[str]:
    """Moto's S3 (and IAM) API in server mode on a free port of ``host`` (loopback unless a test's
    own bridge); yields its endpoint.

    ``probe_path`` is what the start-up check requests: ``/moto-api/`` is not an AWS action, so
    it does not use up a server's INITIAL_NO_AUTH_ACTION_COUNT.
    """
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://{host}:{port}"
    # Moto's start-up (its imports) has taken over 10 s on a loaded 2-core machine: wait for it by a
    # deadline, and fail here, naming it, rather than hand the test a server that is not listening.
    deadline = time.monotonic() + MOTO_START_S
    try:
        while True:
            try:
                urllib.request.urlopen(endpoint + probe_path, timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answered
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"moto server on {endpoint} exited {server.returncode} at start-up") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on {endpoint} did not answer within {MOTO_START_S} s") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def build_tiny_lm(path: Path, chat_template: bool = True) -> Path:
    """A 2-layer Llama (random weights) with a byte-level BPE tokenizer trained here on the
    project's shipped text, saved like a pretrained checkpoint: a causal LM that loads offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in SHIPPED_DATA.read_text(encoding="utf-8").splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=1000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    if chat_template:
        tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def task_result(dag_run: Any, task_id: str) -> Any:
    """The XCom result a task of ``dag_run`` returned, as Airflow stored it."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        value = session.scalar(
            select(XComModel.value).where(
                XComModel.dag_id == dag_run.dag_id,
                XComModel.run_id == dag_run.run_id,
                XComModel.task_id == task_id,
                XComModel.key == "return_value",
            )
        )
    return json.loads(value) if isinstance(value, str) else value


# --- the registry, as register leaves it and as promotion reads it -----------------------------


def register_version(tracker: Any, accuracy: float, passed: bool = True, name: str = MODEL_NAME) -> str:
    """A registered version as register leaves it: gate verdict and metrics as tags. Never loaded:
    promotion works on the registry only, and the server accepts a non-local source."""
    try:
        tracker.create_registered_model(name)
    except Exception:  # already there
        pass
    tags = {
        "finetune.gate_passed": str(passed).lower(),
        "metric.accuracy": f"{accuracy:.6f}",
        "finetune.gate": json.dumps({"gate_metric": "accuracy", "greater_is_better": True}),
    }
    return str(tracker.create_model_version(name, "s3://registry-test/model", tags=tags).version)


def aliases(tracker: Any, name: str = MODEL_NAME) -> dict[str, str]:
    return {k: str(v) for k, v in tracker.get_registered_model(name).aliases.items()}


def promotion_audit(tracker: Any, name: str = MODEL_NAME) -> list[Any]:
    """The audit runs of every promotion attempt on ``name``."""
    experiment = tracker.get_experiment_by_name(f"{name}-promotions")
    return tracker.search_runs([experiment.experiment_id]) if experiment else []


def lock_generations(tracker: Any, name: str = MODEL_NAME) -> dict[str, dict[str, str]]:
    """The registry lock's generations of ``name`` (pipeline/lock.py) and their tags."""
    prefix = f"{name}.promotion-lock."
    return {m.name: dict(m.tags) for m in tracker.search_registered_models(f"name LIKE '{prefix}%'")}


def lock_is_free(tracker: Any, name: str = MODEL_NAME) -> bool:
    """No generation of the registry lock is held: every one left is released."""
    return all(tags.get("released") == "true" for tags in lock_generations(tracker, name).values())


def built_ops_copy(into: Path, *names: str) -> Path:
    """A TORCH_EXTENSIONS_DIR holding copies of the ops the venv has built (built first if not):
    the same interpreter paths, so torch finds them up to date and builds nothing."""
    env = subprocess_env(DS_ACCELERATOR="cpu")
    source = Path(
        subprocess.run(
            [sys.executable, "-c", "from pipeline.train import ops; print(ops.extensions_dir())"],
            env={k: v for k, v in env.items() if k != "TORCH_EXTENSIONS_DIR"},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    for name in names:
        if not (source / name / f"{name}.so").exists():  # make install was skipped: build it once
            subprocess.run(
                [sys.executable, "-c", "from pipeline.train import ops; ops.main()"],
                env={**env, "TORCH_EXTENSIONS_DIR": str(source)},
                check=True,
                timeout=900,
            )
        shutil.copytree(source / name, into / name, symlinks=True)
    return into
