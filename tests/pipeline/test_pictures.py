"""The pictures a person looks at instead of reading: evaluate's loss curves, confusion matrix,
per-class F1 and perplexity bars, register's drift plot, all logged to the pipeline's MLflow run
and linked from the registered version's model card. Each check reads back what was plotted (the
data the drawing function returns) or the PNG in MLflow, never only that a call was made."""

import dataclasses
import io
import json
import time
from pathlib import Path

import pytest

from pipeline import drift, evaluate, local, register, storage
from pipeline.config import load_config
from pipeline.evaluate.classifier import predict
from pipeline.evaluate.pictures import PICTURES, loss_curves_png, loss_history, per_class_f1_png, perplexity_png
from pipeline.register import card as model_card
from pipeline.tracking import RUN_TAG, artifact_url, client, pipeline_run_id
from tests.helpers import collect_snapshot, intent_snapshot

INSTRUCTIONS = "pkg://pipeline/data/support_instructions.jsonl"
LM = ["task=causal-lm", "train.max_seq_len=192", "train.batch_size=8"]
PER_STEP = {2: 1.20, 4: 1.05, 6: 0.98, 8: 0.91}  # step -> loss, as the Trainer's per-step logs give it
EVAL_DURING = {4: 1.10, 8: 1.02}


def _png_size(content: bytes) -> tuple[int, int]:
    from PIL import Image

    image = Image.open(io.BytesIO(content))
    image.verify()  # a truncated or corrupt file raises here
    assert image.format == "PNG"
    return image.size


def _logged_png(run_id: str, path: str, tmp_path: Path) -> bytes:
    """The PNG at ``path`` on the MLflow run, downloaded through the tracking client."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    local = client().download_artifacts(run_id, path, str(tmp_path))
    return Path(local).read_bytes()


def _log_training_history(cfg, with_eval: bool = True) -> str:
    """Metrics as the train step's callback logs them to the pipeline's MLflow run: one batch per
    Trainer log (keys prefixed train_), the end-of-training summary last, at the last step."""
    from mlflow.entities import Metric

    run_id = pipeline_run_id(cfg)
    tracker = client()

    def batch(step, **values):
        now = int(time.time() * 1000)
        tracker.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        time.sleep(0.01)

    for step, loss in PER_STEP.items():
        batch(step, train_loss=loss, train_learning_rate=1e-4 * step, train_grad_norm=2.0, train_epoch=step / 8)
        if with_eval and step in EVAL_DURING:
            batch(step, train_eval_loss=EVAL_DURING[step], train_epoch=step / 8)
    batch(8, train_loss=sum(PER_STEP.values()) / len(PER_STEP), train_runtime=12.0, train_epoch=1.0)
    return run_id


def _validate_result_with_drift(tmp_path) -> str:
    """A validate result whose drift report compares two label sets, written as validate writes it."""
    import pandas as pd

    report = drift.compare(
        pd.Series(["where is my order"] * 6 + ["reset my password"] * 6),
        pd.Series(["where is my order #12"] * 3 + ["我的订单在哪"] * 9),
        pd.Series(["order_status"] * 6 + ["password_reset"] * 6),
        pd.Series(["order_status"] * 9 + ["password_reset"] * 3),
        0.1,
        0.2,
        0.1,
    )
    report["reference"] = {"snapshot_uri": "file:///data/earlier.parquet"}
    folder = tmp_path / "validate"
    folder.mkdir()
    (folder / "drift.json").write_text(json.dumps(report))
    (folder / "drift.html").write_text(drift.render_html(report, "drift"))
    uri = (tmp_path / "validate-result.json").as_uri()
    storage.write_json(uri, {"drift_report_uri": (folder / "drift.html").as_uri(), "summary_uri": ""})
    return uri


def _register(tmp_path, cfg_sets, evaluated, model_uri, validate_uri=""):
    """register.run on the evaluate result as the CLI would have written it."""
    storage.write_json(evaluated.result_uri, dataclasses.asdict(evaluated))
    uris = {step: (tmp_path / f"{step}-result.json").as_uri() for step in ("collect", "train")}
    storage.write_json(uris["collect"], {"sha256": "ab" * 32, "rows": 12, "rows_train": 0, "rows_eval": 12})
    storage.write_json(
        uris["train"], {"model_uri": str(model_uri), "mlflow_run_id": "", "snapshot_uri": "file:///data/snap.parquet"}
    )
    sets = [
        *cfg_sets,
        f"register.evaluate_result_uri={evaluated.result_uri}",
        *(f"register.{step}_result_uri={uri}" for step, uri in uris.items()),
    ]
    if validate_uri:
        sets.append(f"register.validate_result_uri={validate_uri}")
    cfg = load_config(None, sets)
    registered = register.run(cfg)
    return cfg, client().get_model_version(cfg.model_name, registered.version)


def test_loss_curves_are_the_per_step_losses_not_the_end_of_training_mean(tmp_path):
    cfg = load_config(None, ["run_id=curves"])
    run_id = _log_training_history(cfg)
    curves = loss_history(run_id)
    assert curves["train_loss"] == (list(PER_STEP), list(PER_STEP.values()))  # 4 points, not 5
    assert curves["eval_loss"] == (list(EVAL_DURING), list(EVAL_DURING.values()))
    assert _png_size(loss_curves_png(curves)) == (825, 495)  # 7.5 x 4.5 in at 110 dpi


def test_a_step_logged_again_by_a_resumed_attempt_keeps_its_latest_loss(tmp_path):
    from mlflow.entities import Metric

    cfg = load_config(None, ["run_id=resumed"])
    run_id = _log_training_history(cfg, with_eval=False)
    time.sleep(0.01)
    now = int(time.time() * 1000)  # the attempt resumed from step 4's checkpoint logs 6 again
    client().log_batch(run_id, metrics=[Metric("train_loss", 0.5, now, 6), Metric("train_learning_rate", 6e-4, now, 6)])
    steps_, losses = loss_history(run_id)["train_loss"]
    assert steps_ == [2, 4, 6, 8] and losses[2] == 0.5
    assert "eval_loss" not in loss_history(run_id)


def test_classification_pictures_are_in_mlflow_and_linked_from_the_model_card(tmp_path, classifier_dir):
    from sklearn.metrics import f1_score

    sets = ["run_id=pics"]
    cfg = load_config(
        None,
        [
            *sets,
            f"evaluate.snapshot_uri={intent_snapshot(tmp_path)}",
            f"evaluate.model_uri={json.dumps(str(classifier_dir))}",
        ],
    )
    run_id = _log_training_history(cfg)
    evaluated = evaluate.run(cfg)
    assert evaluated.mlflow_run_id == run_id
    pictures = [p["path"] for p in evaluated.pictures]
    assert pictures == ["evaluate/loss_curves.png", "evaluate/confusion_matrix.png", "evaluate/per_class_f1.png"]
    for path in pictures:
        width, height = _png_size(_logged_png(run_id, path, tmp_path / path.replace("/", "_")))
        assert 400 <= width <= 2500 and 250 <= height <= 2500, (path, width, height)
        # and the same picture under the step's own prefix of the artifact store
        assert storage.read_bytes(storage.join(cfg.step_uri("evaluate"), path.split("/")[-1]))[:4] == b"\x89PNG"

    # The bars are the per-class F1 of the model's own predictions on the eval rows.
    frame = storage.local_path(cfg.evaluate.snapshot_uri)
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = pd.read_parquet(frame)
    texts, truth = list(rows["text"]), list(rows["label"])
    predicted = predict(
        AutoModelForSequenceClassification.from_pretrained(classifier_dir),
        AutoTokenizer.from_pretrained(classifier_dir),
        texts,
        cfg.evaluate.batch_size,
        cfg.evaluate.max_seq_len,
    )
    labels = sorted(set(truth) | set(predicted))
    _, drawn = per_class_f1_png(storage.read_json(evaluated.report_uri), labels)
    expected = f1_score(truth, predicted, labels=labels, average=None, zero_division=0)
    assert drawn == pytest.approx(dict(zip(labels, map(float, expected))))

    _, version = _register(tmp_path, sets, evaluated, classifier_dir, _validate_result_with_drift(tmp_path))
    card = version.description
    assert "## Pictures" in card
    for path in [*pictures, register.DRIFT_PICTURE]:
        assert f"([`{path}`]({artifact_url(run_id, path)}))" in card and f"![{path}]" in card
    # In the order a person reads a run: how training went, then the eval split, then the data.
    assert [card.index(f"![{path}]") for path in [*pictures, register.DRIFT_PICTURE]] == sorted(
        card.index(f"![{path}]") for path in [*pictures, register.DRIFT_PICTURE]
    )
    assert "get-artifact?path=evaluate%2Floss_curves.png&run_uuid=" + run_id in card
    width, height = _png_size(_logged_png(run_id, register.DRIFT_PICTURE, tmp_path / "drift"))
    assert width >= 1000 and height >= 300  # two panels side by side: label shares, lengths
    assert "Sample answers" not in card  # a classifier has none


def test_drift_plot_draws_the_reports_shares_and_without_a_report_there_is_no_picture(tmp_path):
    report = json.loads(
        (storage.local_path(_validate_result_with_drift(tmp_path)).parent / "validate" / "drift.json").read_text()
    )
    png, drawn = drift.plot_png(report)
    assert drawn["label_shares"] == {k: (v["reference"], v["current"]) for k, v in report["label_shares"].items()}
    assert drawn["label_shares"]["order_status"] == (0.5, 0.75)
    assert drawn["length"]["current"] == report["length_histogram"]["current"]
    assert len(drawn["length"]["bins"]) == drift.LENGTH_BINS and drawn["length"]["bins"][-1].endswith("+")
    assert _png_size(png)[0] >= 1000
    # A chat report has no labels: one panel, the lengths.
    del report["label_shares"]
    png, drawn = drift.plot_png(report)
    assert set(drawn) == {"length"} and _png_size(png)[0] < 1000
    # The first run of a model has nothing to compare with: validate writes no drift report.
    assert register.drift_picture({"drift_report_uri": ""}, "unused") == {}
    assert register.drift_picture({}, "unused") == {}


def test_causal_lm_perplexity_and_samples_are_in_mlflow_and_the_model_card(tmp_path, tiny_lm_dir):
    snapshot = collect_snapshot([INSTRUCTIONS], "task=causal-lm")
    sets = [*LM, "run_id=lm-pics", "model_name=chat-pics", f"base_model={json.dumps(str(tiny_lm_dir))}"]
    cfg = load_config(
        None,
        [
            *sets,
            f"evaluate.snapshot_uri={snapshot.snapshot_uri}",
            f"evaluate.model_uri={json.dumps(str(tiny_lm_dir))}",
            "evaluate.generate_rows=3",
        ],
    )
    run_id = _log_training_history(cfg, with_eval=False)
    evaluated = evaluate.run(cfg)
    assert [p["path"] for p in evaluated.pictures] == ["evaluate/loss_curves.png", "evaluate/perplexity.png"]
    width, height = _png_size(_logged_png(run_id, "evaluate/perplexity.png", tmp_path / "ppl"))
    assert (width, height) == (715, 495)
    # The bars are the perplexities evaluate measured: base and fine-tuned, no champion yet.
    _, drawn = perplexity_png(evaluated.metrics, evaluated.base_metrics, evaluated.champion_metrics)
    assert drawn == {"base model": evaluated.base_metrics["perplexity"], "fine-tuned": evaluated.metrics["perplexity"]}
    assert {a.path for a in client().list_artifacts(run_id, "evaluate")} >= {
        "evaluate/loss_curves.png",
        "evaluate/perplexity.png",
        "evaluate/samples.json",
    }

    _, version = _register(tmp_path, sets, evaluated, tiny_lm_dir)
    card = version.description
    assert "### Sample answers (the first 3 of 3; all in `evaluate/samples.json`)" in card
    samples = storage.read_json(evaluated.report_uri)
    assert f"| {model_card._cell(samples[0]['prompt'])} | {model_card._cell(samples[0]['reference'])} |" in card
    for picture in evaluated.pictures:
        assert artifact_url(run_id, picture["path"]) in card
    assert register.DRIFT_PICTURE not in card  # no validate result: nothing to draw


@pytest.mark.slow
def test_the_loss_curve_of_a_real_training_run_has_one_point_per_logged_step(tmp_path, small_data, tiny_model_dir):
    snapshot = collect_snapshot([small_data])
    trained = local.launch_local(
        "train",
        [
            "run_id=real-curve",
            f"base_model={json.dumps(str(tiny_model_dir))}",
            f"train.snapshot_uri={snapshot.snapshot_uri}",
            "train.epochs=1",
            "train.batch_size=8",
            "train.num_processes=1",
            "train.logging_steps=2",
        ],
    )
    cfg = load_config(
        None,
        [
            "run_id=real-curve",
            f"evaluate.snapshot_uri={snapshot.snapshot_uri}",
            f"evaluate.model_uri={trained['model_uri']}",
        ],
    )
    evaluated = evaluate.run(cfg)
    run_id = pipeline_run_id(cfg)
    assert client().get_run(run_id).data.tags[RUN_TAG] == "real-curve" and evaluated.mlflow_run_id == run_id
    steps_, losses = loss_history(run_id)["train_loss"]
    assert steps_ == list(range(2, trained["global_step"] + 1, 2))  # every logging step, once
    # The history also holds the run's mean loss at the last step, which is no step's loss.
    from pipeline.tracking import metric_history

    assert len(metric_history(run_id, "train_loss")) == len(steps_) + 1
    assert {"path": "evaluate/loss_curves.png", "caption": PICTURES["loss_curves.png"]} in evaluated.pictures
