import json

import pytest

from pipeline import evaluate, storage
from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError, ModelError
from tests.helpers import intent_snapshot, write_snapshot


def test_scores_writes_report_and_png_and_a_model_no_better_than_the_majority_class_stays_challenger(
    tmp_path, classifier_dir
):
    """The tiny classifier's random head answers one intent whatever the text: a smoke-quality
    model. With no champion it must still beat the majority class on the same rows."""
    cfg = load_config(
        None,
        [
            f"evaluate.snapshot_uri={intent_snapshot(tmp_path)}",
            f"evaluate.model_uri={json.dumps(str(classifier_dir))}",
            "run_id=e",
        ],
    )
    result = evaluate.run(cfg)
    assert result.rows == 12 and set(result.metrics) == {"accuracy", "macro_f1"}
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    # 'order_status' for every row: right on 6 of 12; F1 2/3 on that intent, 0 on the other two.
    assert result.baseline == {"accuracy": 0.5, "macro_f1": pytest.approx(2 / 9)}
    assert result.baseline_name == "majority-class baseline"
    assert result.metrics["accuracy"] <= result.baseline["accuracy"] and result.champion_version == ""
    assert not result.promote and result.reason == (
        f"no champion yet; accuracy={result.metrics['accuracy']:.4f} does not beat the majority-class baseline "
        "0.5000 by more than promotion_margin 0.0 (higher is better)"
    )
    png = storage.read_bytes(result.confusion_matrix_uri)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    report = storage.read_json(result.report_uri)
    assert {"order_status", "password_reset", "refund_request", "macro avg"} <= set(report)
    from pipeline.tracking import client, pipeline_run_id

    logged = client().get_run(pipeline_run_id(cfg))
    assert logged.data.metrics["eval_accuracy"] == pytest.approx(result.metrics["accuracy"])
    assert logged.data.tags["gate.promote"] == "false" and logged.data.tags["gate.reason"] == result.reason
    assert {a.path for a in client().list_artifacts(logged.info.run_id, "evaluate")} == {
        "evaluate/classification_report.json",
        "evaluate/confusion_matrix.png",
        "evaluate/per_class_f1.png",
    }


@pytest.mark.parametrize(
    "ours, theirs, sets, promote",
    [
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
        # No champion: the majority-class baseline (0.3 here) is the bar, by the same margin.
        (0.3, None, [], False),  # a tie with a model that learnt nothing
        (0.305, None, ["evaluate.promotion_margin=0.01"], False),
        (0.2, None, ["evaluate.metric_direction=lower"], True),
        (0.35, None, ["evaluate.metric_direction=lower"], False),
    ],
)
def test_gate(ours, theirs, sets, promote):
    cfg = load_config(None, sets).evaluate
    champion = None if theirs is None else {"accuracy": theirs, "macro_f1": theirs}
    baseline = {"accuracy": 0.3, "macro_f1": 0.3}
    decision, reason = evaluate.decide(
        {"accuracy": ours, "macro_f1": ours}, champion, cfg, baseline=baseline, baseline_name="majority-class baseline"
    )
    assert decision is promote, reason


def test_with_no_champion_the_floor_is_named_in_the_reason_and_no_baseline_refuses():
    cfg = load_config(None, ["evaluate.promotion_margin=0.01"]).evaluate
    ours, floor = {"accuracy": 0.648, "macro_f1": 0.6}, {"accuracy": 0.648, "macro_f1": 0.1}
    assert evaluate.decide(ours, None, cfg, baseline=floor, baseline_name="majority-class baseline") == (
        False,
        "no champion yet; accuracy=0.6480 does not beat the majority-class baseline 0.6480 by more than "
        "promotion_margin 0.01 (higher is better)",
    )
    macro = load_config(None, ["evaluate.gate_metric=macro_f1"]).evaluate  # the baseline's value of that metric
    assert evaluate.decide(ours, None, macro, baseline=floor, baseline_name="majority-class baseline")[0] is True
    assert evaluate.decide(ours, None, cfg) == (
        False,
        "no champion yet; accuracy=0.6480 and no baseline accuracy to beat",
    )


@pytest.mark.parametrize("rule", ["accuracy > 0.9", "recall>=0.5", "accuracy>=high"])
def test_bad_threshold_is_rejected_with_its_text(rule):
    with pytest.raises(ConfigError, match="evaluate.thresholds"):
        load_config(None, [f"evaluate.thresholds={json.dumps([rule])}"])


def test_empty_eval_split_and_missing_inputs(tmp_path, classifier_dir):
    with pytest.raises(DataError, match="the eval split is empty"):
        evaluate.run(
            load_config(
                None,
                [
                    f"evaluate.snapshot_uri={intent_snapshot(tmp_path, 'train')}",
                    f"evaluate.model_uri={json.dumps(str(classifier_dir))}",
                ],
            )
        )
    with pytest.raises(ConfigError, match="evaluate.model_uri is required"):
        evaluate.run(load_config(None, [f"evaluate.snapshot_uri={intent_snapshot(tmp_path)}"]))
    with pytest.raises(ModelError, match="no config.json"):
        evaluate.run(
            load_config(
                None,
                [
                    f"evaluate.snapshot_uri={intent_snapshot(tmp_path)}",
                    f"evaluate.model_uri={json.dumps(str(tmp_path))}",
                ],
            )
        )


def _register_champion(tmp_path, classifier_dir):
    from pipeline import register

    train_uri, evaluate_uri = (tmp_path / "t.json").as_uri(), (tmp_path / "e.json").as_uri()
    tmp_path.mkdir(parents=True, exist_ok=True)
    storage.write_json(train_uri, {"model_uri": str(classifier_dir), "snapshot_uri": "file:///s.parquet"})
    storage.write_json(
        evaluate_uri, {"metrics": {"accuracy": 0.5}, "gate_metric": "accuracy", "promote": True, "reason": "first"}
    )
    return register.run(
        load_config(
            None,
            ["run_id=champ", f"register.train_result_uri={train_uri}", f"register.evaluate_result_uri={evaluate_uri}"],
        )
    )


def test_champion_is_scored_on_the_same_rows_and_a_tie_does_not_promote(tmp_path, classifier_dir):
    _register_champion(tmp_path, classifier_dir)
    cfg = load_config(
        None,
        [
            f"evaluate.snapshot_uri={intent_snapshot(tmp_path)}",
            f"evaluate.model_uri={json.dumps(str(classifier_dir))}",
            "run_id=e2",
        ],
    )
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
    cfg = load_config(
        None,
        [
            f"evaluate.snapshot_uri={intent_snapshot(tmp_path)}",
            f"evaluate.model_uri={json.dumps(str(classifier_dir))}",
            "run_id=e3",
        ],
    )
    with pytest.raises(ModelError, match="champion support-intents version 1 cannot be loaded"):
        evaluate.run(cfg)
    assert not storage.exists(cfg.step_uri("evaluate") + "/result.json")


# --- slices: per language of the eval rows, in the metrics and in the gate ----------------------


def _answering(classifier_dir, path, label):
    """The tiny classifier with its head biased to answer ``label`` whatever the text."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    with torch.no_grad():
        model.classifier.bias.fill_(-10.0)
        model.classifier.bias[model.config.label2id[label]] = 10.0
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(classifier_dir).save_pretrained(path)
    return path


def _bilingual_snapshot(tmp_path):
    """8 English password resets and 4 Chinese order-status questions from the shipped data."""
    from pipeline.text import language_of
    from tests.helpers import SHIPPED_DATA

    rows = [json.loads(line) for line in SHIPPED_DATA.read_text(encoding="utf-8").splitlines()]
    english = [r["text"] for r in rows if r["label"] == "password_reset" and language_of(r["text"]) == "latin"][:8]
    chinese = [r["text"] for r in rows if r["label"] == "order_status" and language_of(r["text"]) == "zh"][:4]
    table = [(t, "password_reset", "eval") for t in english] + [(t, "order_status", "eval") for t in chinese]
    return write_snapshot(tmp_path / "bilingual.parquet", table, ["text", "label", "split"])


def test_a_challenger_better_overall_but_worse_on_one_language_is_refused(tmp_path, classifier_dir):
    champion = _answering(classifier_dir, tmp_path / "champion", "order_status")  # right on the Chinese rows only
    challenger = _answering(classifier_dir, tmp_path / "challenger", "password_reset")  # right on the English ones
    _register_champion(tmp_path / "registered", champion)
    snapshot = _bilingual_snapshot(tmp_path)
    sets = [
        f"evaluate.snapshot_uri={snapshot}",
        f"evaluate.model_uri={json.dumps(str(challenger))}",
        "evaluate.min_slice_rows=4",
    ]
    result = evaluate.run(load_config(None, [*sets, "run_id=s1"]))
    assert result.metrics["accuracy"] == pytest.approx(8 / 12)
    assert result.champion_metrics["accuracy"] == pytest.approx(4 / 12)
    assert result.slices["zh"] == {"rows": 4.0, "accuracy": 0.0, "macro_f1": 0.0}
    assert result.slices["latin"]["accuracy"] == 1.0 and result.champion_slices["zh"]["accuracy"] == 1.0
    assert not result.promote
    assert result.reason.startswith("accuracy[zh] 0.0000 is worse than the champion's 1.0000 on slice 'zh' (4 rows)")
    assert storage.exists(result.confusion_matrix_uri.replace("confusion_matrix.png", "confusion_matrix_zh.png"))
    from pipeline.tracking import client, pipeline_run_id

    logged = client().get_run(pipeline_run_id(load_config(None, ["run_id=s1"]))).data.metrics
    assert logged["eval_accuracy_zh"] == 0.0 and logged["eval_rows_latin"] == 8.0

    # The same challenger, with the slice gate loosened by the deployment: it wins overall.
    loose = evaluate.run(load_config(None, [*sets, "run_id=s2", "evaluate.max_slice_regression=1.0"]))
    assert loose.promote and "beats champion" in loose.reason
    # A smoke run (finetune run --no-promote): the same win, and still not promoted, saying so.
    smoke = evaluate.run(
        load_config(None, [*sets, "run_id=s2b", "evaluate.max_slice_regression=1.0", "evaluate.promote=false"])
    )
    assert not smoke.promote and smoke.reason == (
        f"promotion is off (evaluate.promote=false): registered as challenger, champion untouched; the gate would "
        f"have promoted: {loose.reason}"
    )
    # Too few rows in a slice to judge: reported, not gated.
    few = evaluate.run(load_config(None, [*sets[:2], "run_id=s3", "evaluate.min_slice_rows=5"]))
    assert few.promote and few.slices["zh"]["rows"] == 4


@pytest.mark.parametrize(
    "rule, promote, reason",
    [
        # Past the bar, then the floor: the model answers the majority intent for every row.
        ("accuracy[latin]>=0.9", False, "no champion yet; accuracy=0.6667 does not beat the majority-class baseline"),
        ("accuracy[zh]>=0.5", False, "accuracy[zh] 0.0000 fails the threshold accuracy[zh] >= 0.5"),
        ("accuracy[ko]>=0.5", False, "accuracy[ko] cannot be checked: the eval split has no rows of slice 'ko'"),
    ],
)
def test_a_bar_on_one_language(tmp_path, classifier_dir, rule, promote, reason):
    challenger = _answering(classifier_dir, tmp_path / "challenger", "password_reset")
    result = evaluate.run(
        load_config(
            None,
            [
                f"evaluate.snapshot_uri={_bilingual_snapshot(tmp_path)}",
                f"evaluate.model_uri={json.dumps(str(challenger))}",
                f"evaluate.thresholds={json.dumps([rule])}",
            ],
        )
    )
    assert result.promote is promote and result.reason.startswith(reason)


def test_a_causal_lm_no_better_than_its_base_model_stays_challenger(tiny_lm_dir, tmp_path):
    """The tiny random-weights Llama evaluated as its own fine-tune (what a run that learnt nothing
    publishes): its perplexity is the base model's on the same tokens, which it must beat."""
    from pipeline import chat

    shipped = storage.read_bytes("pkg://pipeline/data/support_instructions.jsonl").decode("utf-8").splitlines()
    messages = [chat.dumps(chat.to_messages(json.loads(line))) for line in shipped[:12]]  # as collect writes them
    snapshot = write_snapshot(tmp_path / "chat.parquet", {"messages": messages, "split": ["eval"] * len(messages)})
    result = evaluate.run(
        load_config(
            None,
            [
                "task=causal-lm",
                "model_name=chat-floor",
                "train.max_seq_len=192",
                f"base_model={json.dumps(str(tiny_lm_dir))}",
                f"evaluate.snapshot_uri={snapshot}",
                f"evaluate.model_uri={json.dumps(str(tiny_lm_dir))}",
                "evaluate.generate_rows=0",
                "run_id=lm-floor",
            ],
        )
    )
    perplexity = result.metrics["perplexity"]
    assert perplexity == result.baseline["perplexity"] == result.base_metrics["perplexity"] > 100  # random: ~vocab
    assert not result.promote and result.reason == (
        f"no champion yet; perplexity={perplexity:.4f} does not beat the base model {perplexity:.4f} by more than "
        "promotion_margin 0.0 (lower is better)"
    )
