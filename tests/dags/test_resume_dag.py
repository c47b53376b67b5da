"""A preempted training, through Airflow: the `finetune` DAG up to `train` runs under `dag.test()`
(Airflow's own task runner, retries included); once train saved its first checkpoint, every
process of the step is SIGKILLed, as a node loss or an OOM kill would. Airflow retries the task
and the retry resumes from the checkpoint instead of step 0."""

import json
import signal
import threading
import time
from datetime import timedelta

import psutil
import pytest

from pipeline import checkpoints, storage
from pipeline.config import load_config


def _kill_train_after_first_checkpoint(killed: dict, stop: threading.Event) -> None:
    """Watch the artifact store; at the first complete checkpoint of any run, SIGKILL the train step."""
    runs = storage.local_path(load_config().artifact_root) / "runs"
    while not stop.is_set():
        markers = sorted(runs.glob(f"*/train/checkpoints/*/{checkpoints.MARKER}"))
        if markers:
            for proc in psutil.Process().children(recursive=True):
                try:
                    if "pipeline" in proc.cmdline() and "train" in proc.cmdline():
                        proc.send_signal(signal.SIGKILL)
                except psutil.Error:
                    continue
            killed["step"] = json.loads(markers[0].read_text())["step"]
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_airflow_retries_a_killed_train_task_and_the_retry_resumes(
    airflow_db, tiny_model_dir, small_data, tmp_path, monkeypatch, capfd
):
    deployment = tmp_path / "deployment.yaml"
    allowed = f"collect:\n  allowed_sources: [{json.dumps(str(small_data))}]\n"  # the run's source Param
    deployment.write_text(f"train:\n  checkpoint_steps: 2\n  logging_steps: 2\n{allowed}")
    monkeypatch.setenv("FINETUNE_CONFIG", str(deployment))
    from airflow.dag_processing.dagbag import BundleDagBag

    from tests.helpers import DAGS

    # A DAG of its own, parsed here: the session's DagBag is shared with tests that run and change it.
    fresh = BundleDagBag(dag_folder=str(DAGS / "finetune.py"), bundle_path=DAGS)
    assert fresh.import_errors == {}
    dag = fresh.dags["finetune"].partial_subset(task_ids=["train"], include_upstream=True)
    assert set(dag.task_ids) == {"collect", "validate", "train"}
    train = dag.get_task("train")
    train.retry_delay = train.max_retry_delay = timedelta(seconds=1)
    killed, stop = {}, threading.Event()
    watcher = threading.Thread(target=_kill_train_after_first_checkpoint, args=(killed, stop), daemon=True)
    watcher.start()
    try:
        run = dag.test(
            run_conf={"source": [str(small_data)], "base_model": str(tiny_model_dir), "epochs": 2, "batch_size": 8}
        )
    finally:
        stop.set()
        watcher.join()
    logged = "".join(capfd.readouterr())
    assert killed, "train finished before its first checkpoint"
    ti = run.get_task_instance("train")
    assert run.state == "success" and ti.state == "success"
    assert ti.try_number == 2, "the killed attempt was not retried by Airflow"
    assert f"resuming from step {killed['step']} " in logged
    steps_per_epoch = ti.xcom_pull(task_ids="train")["global_step"] // 2
    assert killed["step"] < 2 * steps_per_epoch
