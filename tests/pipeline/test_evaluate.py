import json

import pytest

from pipeline import evaluate, storage
from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError, ModelError
from tests.helpers import write_snapshot


def _snapshot(tmp_path, split="eval"):
    rows = [("where is my order", "order_status"), ("reset my password", "password_reset"),
            ("I want my money back", "refund_request"), ("我的订单在哪", "order_status")] * 3
    return write_snapshot(tmp_path / "snap.parquet", [(t, l, split) for t, l in rows], ["text", "label", "split"])


def test_scores_writes_report_and_png_and_promotes_without_champion(tmp_path, classifier_dir):
    cfg = load_config(None, [f"evaluate.snapshot_uri={_snapshot(tmp_path)}",
                             f"evaluate.model_uri={json.dumps(str(classifier_dir))}", "run_id=e"])
    result = evaluate.run(cfg)
    assert result.rows == 12 and set(result.metrics) == {"accuracy", "macro_f1"}
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert result.promote and "no champion" in result.reason and result.champion_version == ""
    png = storage.read_bytes(result.confusion_matrix_uri)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    report = storage.read_json(result.report_uri)
    assert {"order_status", "password_reset", "refund_request", "macro avg"} <= set(report)
    from pipeline.tracking import client, pipeline_run_id

    logged = client().get_run(pipeline_run_id(cfg))
    assert logged.data.metrics["eval_accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert {a.path for a in client().list_artifacts(logged.info.run_id, "evaluate")} == {
        "evaluate/classification_report.json", "evaluate/confusion_matrix.png"}


@pytest.mark.parametrize("ours, theirs, sets, promote", [
    (0.9, None, [], True),
    (0.91, 0.90, [], True),
    (0.90, 0.90, [], False),  # a tie is not a win
    (0.905, 0.90, ["evaluate.promotion_margin=0.01"], False),
    (0.92, 0.90, ["evaluate.promotion_margin=0.01"], True),
    (0.5, 0.9, [], False),
    (0.9, None, ['evaluate.thresholds=["accuracy>=0.95"]'], False),  # first model, but below the bar
    (0.96, 0.5, ['evaluate.thresholds=["accuracy>=0.95", "macro_f1>=0.5"]'], True),
    (0.4, 0.5, ["evaluate.metric_direction=lower"], True),  # lower is better, e.g. a loss
    (0.6, 0.5, ["evaluate.metric_direction=lower"], False),
])
def test_gate(ours, theirs, sets, promote):
    cfg = load_config(None, sets).evaluate
    champion = None if theirs is None else {"accuracy": theirs, "macro_f1": theirs}
    decision, reason = evaluate.decide({"accuracy": ours, "macro_f1": ours}, champion, cfg)
    assert decision is promote, reason


@pytest.mark.parametrize("rule", ["accuracy > 0.9", "recall>=0.5", "accuracy>=high"])
def test_bad_threshold_is_rejected_with_its_text(rule):
    with pytest.raises(ConfigError, match="evaluate.thresholds"):
        load_config(None, [f"evaluate.thresholds={json.dumps([rule])}"])


def test_empty_eval_split_and_missing_inputs(tmp_path, classifier_dir):
    with pytest.raises(DataError, match="the eval split is empty"):
        evaluate.run(load_config(None, [f"evaluate.snapshot_uri={_snapshot(tmp_path, 'train')}",
                                        f"evaluate.model_uri={json.dumps(str(classifier_dir))}"]))
    with pytest.raises(ConfigError, match="evaluate.model_uri is required"):
        evaluate.run(load_config(None, [f"evaluate.snapshot_uri={_snapshot(tmp_path)}"]))
    with pytest.raises(ModelError, match="no config.json"):
        evaluate.run(load_config(None, [f"evaluate.snapshot_uri={_snapshot(tmp_path)}",
                                        f"evaluate.model_uri={json.dumps(str(tmp_path))}"]))


def _register_champion(tmp_path, classifier_dir):
    from pipeline import register

    train_uri, evaluate_uri = (tmp_path / "t.json").as_uri(), (tmp_path / "e.json").as_uri()
    storage.write_json(train_uri, {"model_uri": str(classifier_dir), "snapshot_uri": "file:///s.parquet"})
    storage.write_json(evaluate_uri, {"metrics": {"accuracy": 0.5}, "gate_metric": "accuracy", "promote": True,
                                      "reason": "first"})
    return register.run(load_config(None, ["run_id=champ", f"register.train_result_uri={train_uri}",
                                           f"register.evaluate_result_uri={evaluate_uri}"]))


def test_champion_is_scored_on_the_same_rows_and_a_tie_does_not_promote(tmp_path, classifier_dir):
    _register_champion(tmp_path, classifier_dir)
    cfg = load_config(None, [f"evaluate.snapshot_uri={_snapshot(tmp_path)}",
                             f"evaluate.model_uri={json.dumps(str(classifier_dir))}", "run_id=e2"])
    result = evaluate.run(cfg)
    assert result.champion_version == "1"
    assert result.champion_metrics == result.metrics  # the same weights on the same rows
    assert not result.promote and "does not beat champion" in result.reason


def test_a_champion_that_cannot_be_loaded_fails_closed(tmp_path, classifier_dir):
    import shutil

    from pipeline.tracking import client

    registered = _register_champion(tmp_path, classifier_dir)
    source = client().get_model_version("support-intents", registered.version).source
    artifacts = client().get_logged_model(source.rsplit("/", 1)[-1]).artifact_location
    shutil.rmtree(storage.local_path(artifacts))
    cfg = load_config(None, [f"evaluate.snapshot_uri={_snapshot(tmp_path)}",
                             f"evaluate.model_uri={json.dumps(str(classifier_dir))}", "run_id=e3"])
    with pytest.raises(ModelError, match="champion support-intents version 1 cannot be loaded"):
        evaluate.run(cfg)
    assert not storage.exists(cfg.step_uri("evaluate") + "/result.json")
