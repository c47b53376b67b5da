"""Checkpoints and resume, tried by killing real training: the local launcher's torch.distributed.run
over 2 CPU processes, DeepSpeed ZeRO-2, the tiny BERT. A run SIGKILLed mid-epoch, resumed, stopped
by SIGTERM and resumed again must end with the weights, metrics and sharding audit of a run that
was never interrupted."""

import os
import shutil
import signal
import threading
import time

import pytest

from pipeline import checkpoints, local, steps, storage
from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError
from tests.helpers import train_settings

BATCH = 8


def _settings(snapshot, model_dir, run_id, *extra):
    return train_settings(
        snapshot,
        model_dir,
        run_id,
        "train.epochs=2",
        f"train.batch_size={BATCH}",
        "train.logging_steps=2",
        "train.checkpoint_steps=2",
        *extra,
    )


def _root(settings):
    return storage.join(load_config(None, settings).step_uri("train"), "checkpoints")


def _start(settings, tmp_path):
    """The step in a process group of its own, its output collected in ``process.lines``."""
    command = local.local_command("train", settings, str(tmp_path / "result.json"))
    process = local.StepProcess(command, local.local_env())
    process.lines = []
    process.reader = threading.Thread(target=lambda: process.lines.extend(process.popen.stdout), daemon=True)
    process.reader.start()
    return process


def _wait_for_checkpoint(process, root, after_step=0, timeout_s=240):
    """The step of the first complete checkpoint past ``after_step``, polled while the step runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [c.step for c in checkpoints.complete(root) if c.step > after_step]
        if found:
            return min(found)
        assert process.popen.poll() is None, "the step ended before it saved a checkpoint"
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint past step {after_step} within {timeout_s} s")


def _kill_after_first_checkpoint(settings, tmp_path, total_steps=None):
    """SIGKILL every process of a train step once it saved a checkpoint; (first checkpoint, newest
    complete one after the kill). With ``total_steps``, the kill must have come before training ended."""
    root = _root(settings)
    process = _start(settings, tmp_path)
    first = _wait_for_checkpoint(process, root)
    for proc in process.members():
        proc.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL
    time.sleep(0.5)
    assert not process.members(), "a process of the killed step is still running"
    killed_at = checkpoints.complete(root)[0].step
    assert first <= killed_at, "the newest checkpoint is older than the first one seen"
    assert total_steps is None or killed_at < total_steps, "the kill came after training ended"
    return first, killed_at


def _max_diff(a_uri, b_uri):
    a, b = _weights(a_uri), _weights(b_uri)
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _output(process):
    """The step's whole output, once every process of it has ended."""
    process.reader.join(timeout=30)
    return "".join(process.lines)


def _weights(model_uri):
    from safetensors.torch import load_file

    return load_file(str(storage.local_path(model_uri) / "model.safetensors"))


def _eval_logits(model_uri, snapshot):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.snapshot import load_snapshot

    frame = load_snapshot(snapshot.snapshot_uri)
    texts = list(frame[frame["split"] == "eval"]["text"])
    path = storage.local_path(model_uri)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    batch = AutoTokenizer.from_pretrained(path)(
        texts, padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.slow
def test_sigkill_and_sigterm_mid_training_resume_to_the_uninterrupted_result(snapshot, tiny_model_dir, tmp_path, capfd):
    reference = local.launch_local("train", _settings(snapshot, tiny_model_dir, "reference"))
    steps_per_epoch = snapshot.rows_train // (BATCH * 2)
    assert reference["global_step"] == 2 * steps_per_epoch >= 8

    # 1. SIGKILL to every process of the step, right after its first checkpoint.
    settings = _settings(snapshot, tiny_model_dir, "killed")
    root = _root(settings)
    first, killed_at = _kill_after_first_checkpoint(settings, tmp_path, reference["global_step"])

    # What a kill during a checkpoint write leaves (files, no marker) and a checkpoint whose file
    # changed after its marker: neither may be resumed from.
    newest = checkpoints.complete(root)[0]
    partial = storage.local_path(storage.join(root, checkpoints.name(killed_at + 2)))
    shutil.copytree(storage.local_path(newest.uri), partial)
    (partial / checkpoints.MARKER).unlink()
    damaged = storage.local_path(storage.join(root, checkpoints.name(killed_at + 1)))
    shutil.copytree(storage.local_path(newest.uri), damaged)
    state = damaged / "trainer_state.json"
    state.write_text(state.read_text() + " ")
    capfd.readouterr()

    # 2. A new attempt resumes from the newest complete checkpoint; SIGTERM it after one more.
    process = _start(settings, tmp_path)
    second = _wait_for_checkpoint(process, root, after_step=killed_at + 1)  # +1: the damaged one
    sent = time.monotonic()
    for proc in process.members():
        proc.send_signal(signal.SIGTERM)
    code = process.wait(60)
    took = time.monotonic() - sent
    output = _output(process)
    assert f"resuming from step {killed_at} " in output
    assert f"checkpoint at step {killed_at + 1} is damaged" in output and "trainer_state.json does not match" in output
    assert code != 0 and took < load_config(None, settings).train.term_grace_s
    error = steps.step_error(load_config(None, settings).step_uri("train"))
    assert error["exit_code"] == 75, error  # retried, unlike bad input
    stopped = checkpoints.complete(root)[0].step
    assert (
        f"stopped by SIGTERM at step {stopped}" in error["error"] and "a checkpoint was saved there" in error["error"]
    )
    assert second <= stopped < reference["global_step"]
    time.sleep(0.5)
    assert not process.members()

    # 3. The next attempt finishes from there.
    capfd.readouterr()
    resumed = local.launch_local("train", settings)
    assert f"resuming from step {stopped} " in capfd.readouterr().out
    assert resumed["global_step"] == reference["global_step"]
    diff = _max_diff(reference["model_uri"], resumed["model_uri"])
    assert diff <= 1e-6, f"max abs weight difference {diff}"
    assert (
        _eval_logits(reference["model_uri"], snapshot) - _eval_logits(resumed["model_uri"], snapshot)
    ).abs().max() <= 1e-5
    audit = storage.read_json(resumed["summary_uri"])["sharding"]
    per_rank = steps_per_epoch * BATCH
    assert [e["epoch"] for e in audit["epochs"]] == [0, 1]
    for epoch in audit["epochs"]:  # over the three attempts: nothing skipped, nothing seen twice
        assert epoch["seen_per_rank"] == [per_rank, per_rank] and epoch["seen_twice"] == 0
        assert epoch["distinct"] == 2 * per_rank
    assert checkpoints.complete(root) == [], "the checkpoints outlived the published model"
    print(
        f"resume figures: first checkpoint {first}, SIGKILL left step {killed_at}; SIGTERM stopped at step {stopped} "
        f"(checkpoint {second} seen), exited {took:.1f} s after the signal; steps {reference['global_step']}; "
        f"max abs weight diff {diff:g}"
    )


@pytest.mark.slow
def test_zero3_partitioned_states_resume_to_the_uninterrupted_result(snapshot, tiny_model_dir, tmp_path, capfd):
    reference = local.launch_local(
        "train", _settings(snapshot, tiny_model_dir, "z3-reference", "train.zero_stage=3", "train.epochs=1")
    )
    settings = _settings(snapshot, tiny_model_dir, "z3", "train.zero_stage=3", "train.epochs=1")
    _, killed_at = _kill_after_first_checkpoint(settings, tmp_path, reference["global_step"])
    capfd.readouterr()
    resumed = local.launch_local("train", settings)
    assert f"resuming from step {killed_at} " in capfd.readouterr().out
    assert resumed["global_step"] == reference["global_step"]
    assert _max_diff(reference["model_uri"], resumed["model_uri"]) <= 1e-6


def test_checkpoint_from_another_config_is_refused_naming_the_difference(tmp_path):
    root = (tmp_path / "ckpt").as_uri()
    files = tmp_path / "files"
    files.mkdir()
    (files / "state.json").write_text("{}")
    digests = checkpoints.upload(files, root, 4)
    saved = {"world_size": 2, "settings": {"train": {"learning_rate": 5e-5, "epochs": 2}}}
    checkpoints.write_marker(root, 4, digests, saved)
    now = {"world_size": 4, "settings": {"train": {"learning_rate": 1e-4, "epochs": 2}}}
    with pytest.raises(ConfigError) as refused:
        checkpoints.newest_usable(root, now, tmp_path / "dest")
    assert "world_size: checkpoint 2, now 4" in str(refused.value)
    assert "settings.train.learning_rate: checkpoint 5e-05, now 0.0001" in str(refused.value)
    assert "train.resume=false" in str(refused.value)
    found, path = checkpoints.newest_usable(root, saved, tmp_path / "dest")
    assert found.step == 4 and (path / "state.json").read_text() == "{}"


def test_s3_checkpoints_marker_last_damaged_skipped_and_pruned(s3, tmp_path):
    root = f"s3://{s3}/runs/r/train/checkpoints"
    meta = {"world_size": 1, "settings": {}}
    for step in (2, 4, 6):
        files = tmp_path / f"s{step}"
        (files / "global_step").mkdir(parents=True)
        (files / "global_step" / "optim.pt").write_bytes(bytes([step]) * 1000)
        digests = checkpoints.upload(files, root, step)
        if step != 6:  # 6: killed before its marker
            checkpoints.write_marker(root, step, digests, meta)
    assert [c.step for c in checkpoints.complete(root)] == [4, 2]
    storage.write_bytes(f"{root}/{checkpoints.name(4)}/global_step/optim.pt", b"changed")
    found, path = checkpoints.newest_usable(root, meta, tmp_path / "dest")
    assert found.step == 2 and (path / "global_step" / "optim.pt").read_bytes() == bytes([2]) * 1000
    assert checkpoints.prune(root, keep=1) == [2]  # the newest complete (4) stays, and 6 is newer than it
    assert [c.step for c in checkpoints.complete(root)] == [4]
    with pytest.raises(DataError, match="optim.pt does not match its marker"):
        checkpoints.fetch(checkpoints.complete(root)[0], tmp_path / "again")
    checkpoints.delete_all(root)
    assert storage.list_tree(root) == []


def test_resume_false_starts_over_and_deletes_the_runs_checkpoints(tmp_path, monkeypatch):
    from pipeline.train import checkpointing

    cfg = load_config(None, ["run_id=r", "train.resume=false"])
    root = checkpointing.checkpoint_root(cfg)
    files = tmp_path / "files"
    files.mkdir()
    (files / "x").write_text("x")
    checkpoints.write_marker(root, 2, checkpoints.upload(files, root, 2), {"world_size": 1})
    assert checkpointing._resume_point(cfg, {"world_size": 1}, tmp_path / "node") is None
    assert checkpoints.complete(root) == [] and storage.list_tree(root) == []


def test_deepspeed_checkpoint_files_are_read_without_running_pickled_code(tmp_path):
    import pickle

    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from pipeline.train import checkpointing

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    checkpointing.weights_only_deepspeed_loads()
    engine = TorchCheckpointEngine()
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0)}, "w": torch.ones(2)}, tmp_path / "good.pt")
    assert engine.load(str(tmp_path / "good.pt"))["w"].tolist() == [1.0, 1.0]
    torch.save({"w": torch.ones(2), "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        engine.load(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "ran").exists()


def _mlflow_server(port, store):
    """`mlflow server` on loopback over a SQLite store and a local artifact folder (both kept across restarts)."""
    import subprocess
    import sys
    import urllib.request

    store.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return server
        except OSError:
            assert server.poll() is None, "mlflow server exited at start-up"
            time.sleep(0.5)
    raise AssertionError("mlflow server did not become healthy in 120 s")


@pytest.mark.slow
def test_mlflow_stopped_mid_training_exits_75_and_the_retry_after_its_restart_resumes(
    snapshot, tiny_model_dir, tmp_path, monkeypatch, capfd
):
    from tests.helpers import free_port

    port, store = free_port(), tmp_path / "mlflow"
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    settings = _settings(snapshot, tiny_model_dir, "outage")
    cfg = load_config(None, settings)
    server = _mlflow_server(port, store)
    try:
        process = _start(settings, tmp_path)
        _wait_for_checkpoint(process, _root(settings))
        server.terminate()
        server.wait(timeout=30)
        code = process.wait(120)
        assert code not in (None, 0), _output(process)[-3000:]
        error = steps.step_error(cfg.step_uri("train"))
        assert error["exit_code"] == 75, error
        assert f"MLflow tracking server {uri} unreachable or failing" in error["error"]
        assert not storage.exists(storage.join(cfg.step_uri("train"), "model", "config.json"))

        server = _mlflow_server(port, store)  # back, with the same store
        capfd.readouterr()
        resumed = local.launch_local("train", settings)
        assert "resuming from step " in capfd.readouterr().out
        from pipeline import tracking

        runs = tracking.client().search_runs(
            [tracking.experiment_id(cfg)], filter_string=f"tags.`{tracking.RUN_TAG}` = 'outage'"
        )
        assert len(runs) == 1 and runs[0].info.run_id == resumed["mlflow_run_id"]  # one MLflow run for both attempts
        logged = [m.step for m in tracking.client().get_metric_history(resumed["mlflow_run_id"], "train_loss")]
        assert logged and max(logged) == resumed["global_step"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("launcher", ["kubernetes", "pytorchjob"])
def test_training_pods_outlast_train_and_torchruns_grace_after_sigterm(launcher):
    manifest = steps.render("train", ["run_id=r"], launcher)
    pods = (
        [manifest["spec"]]
        if manifest["kind"] == "Pod"
        else [r["template"]["spec"] for r in manifest["spec"]["pytorchReplicaSpecs"].values()]
    )
    for pod in pods:  # Kubernetes' default, 30 s, would SIGKILL while torchrun still waits on the checkpoint
        assert pod["terminationGracePeriodSeconds"] > 30 >= load_config().train.term_grace_s
