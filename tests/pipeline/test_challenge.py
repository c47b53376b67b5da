"""The challenge set: the shipped hand-written file keeps its promises (size, languages, labels,
no overlap with the training data, no order numbers), evaluate scores it as the slices challenge,
challenge:zh and challenge:latin and logs them, a threshold on one gates, the regression rule
leaves them alone, and a file whose labels the model does not know is refused by name."""

import json
import re

import pytest

from pipeline import evaluate, register, storage
from pipeline.config import DEFAULT_CHALLENGE, load_config
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate.challenge import challenge_rows
from pipeline.text import language_of, normalize_text
from tests.helpers import SHIPPED_DATA, intent_snapshot, write_jsonl

# The generator's order references (#A1234, A1234, 订单号 58231, 单号58231) and any long number.
ORDER_NUMBER = re.compile(r"#\s*\w*\d|\b[A-Za-z]\d{3,}\b|\d{4,}|单号\s*\d")
CLASSIFIER_LABELS = ["order_status", "password_reset", "refund_request"]  # the classifier_dir fixture's


def _shipped(uri):
    return [json.loads(line) for line in storage.read_bytes(uri).decode("utf-8").splitlines() if line.strip()]


def test_the_shipped_challenge_set_is_big_bilingual_known_and_apart_from_the_training_data():
    training = [json.loads(line) for line in SHIPPED_DATA.read_text(encoding="utf-8").splitlines()]
    labels = {r["label"] for r in training}
    texts, truth = challenge_rows(DEFAULT_CHALLENGE, labels)
    assert len(texts) >= 200 and len(texts) == len(_shipped(DEFAULT_CHALLENGE))
    chinese = sum(language_of(t) == "zh" for t in texts)
    assert 0.45 <= chinese / len(texts) <= 0.55, chinese
    per_label = {label: truth.count(label) for label in labels}
    assert set(truth) == labels and min(per_label.values()) >= 0.8 * max(per_label.values()), per_label
    seen = {normalize_text(r["text"]) for r in training}
    assert [t for t in texts if normalize_text(t) in seen] == []
    assert len({normalize_text(t) for t in texts}) == len(texts)  # no duplicates within the file either
    assert [t for t in texts if ORDER_NUMBER.search(t)] == []
    assert ORDER_NUMBER.search("where is #A1234") and ORDER_NUMBER.search("订单号 58231")  # the pattern bites


@pytest.fixture
def snapshot(tmp_path):
    return intent_snapshot(tmp_path)


@pytest.fixture
def challenge(tmp_path):
    """The shipped challenge rows of the fixture classifier's three intents: 66 rows, 33 Chinese."""
    rows = [r for r in _shipped(DEFAULT_CHALLENGE) if r["label"] in CLASSIFIER_LABELS]
    return write_jsonl(tmp_path / "challenge.jsonl", rows)


def test_the_challenge_slices_are_scored_logged_and_drawn_and_a_bar_on_one_gates(
    snapshot, challenge, classifier_dir, tmp_path
):
    from pipeline.tracking import client, pipeline_run_id

    common = [
        f"evaluate.snapshot_uri={snapshot}",
        f"evaluate.model_uri={json.dumps(str(classifier_dir))}",
        f"evaluate.challenge_uri={json.dumps(str(challenge))}",
        "evaluate.min_slice_rows=5",
    ]
    cfg = load_config(None, [*common, "run_id=challenge"])
    result = evaluate.run(cfg)
    rows = _shipped(challenge.as_uri())
    assert {"challenge", "challenge:zh", "challenge:latin"} <= set(result.slices)
    assert result.slices["challenge"]["rows"] == len(rows) == 66
    assert result.slices["challenge:zh"]["rows"] == sum(language_of(r["text"]) == "zh" for r in rows) == 33
    assert result.rows == 12 and result.slices["zh"]["rows"] == 3  # the eval split is scored as before
    # The challenge slices bar nothing unless a threshold names them: the floor for a first champion
    # decides (this random head answers one intent for every row, no better than the majority class).
    assert result.reason.startswith("no champion yet; accuracy=") and "majority-class baseline" in result.reason

    logged = client().get_run(pipeline_run_id(cfg))
    for name in ("challenge", "challenge:zh", "challenge:latin"):
        assert logged.data.metrics[f"eval_accuracy_{name}"] == pytest.approx(result.slices[name]["accuracy"])
        assert logged.data.metrics[f"eval_rows_{name}"] == result.slices[name]["rows"]
    assert {d.dataset.name for d in logged.inputs.dataset_inputs} == {"eval", "challenge"}
    drawn = {a.path for a in client().list_artifacts(logged.info.run_id, "evaluate")}
    assert {"evaluate/confusion_matrix_challenge.png", "evaluate/confusion_matrix_challenge_zh.png"} <= drawn
    assert {
        "path": "evaluate/confusion_matrix_challenge_zh.png",
        "caption": "Confusion matrix of the challenge set's rows in zh",
    } in result.pictures

    zh = result.slices["challenge:zh"]["accuracy"]
    barred = evaluate.run(
        load_config(
            None, [*common, "run_id=barred", f'evaluate.thresholds=["accuracy[challenge:zh]>={zh + 0.01:.4f}"]']
        )
    )
    assert not barred.promote and barred.reason.startswith("accuracy[challenge:zh]")

    _register_champion(tmp_path, classifier_dir)  # the same weights: scored on the same challenge rows
    cleared = evaluate.run(
        load_config(
            None, [*common, "run_id=cleared", f'evaluate.thresholds=["accuracy[challenge:zh]>={zh - 0.0001:.4f}"]']
        )
    )
    assert cleared.champion_version == "1"
    assert {k: v for k, v in cleared.champion_slices.items() if k.startswith("challenge")} == {
        k: v for k, v in result.slices.items() if k.startswith("challenge")
    }
    assert not cleared.promote and "does not beat champion" in cleared.reason  # past the bar, then a tie


def _register_champion(tmp_path, model_dir):
    train_uri, evaluate_uri = (tmp_path / "t.json").as_uri(), (tmp_path / "e.json").as_uri()
    storage.write_json(train_uri, {"model_uri": str(model_dir), "snapshot_uri": "file:///s.parquet"})
    storage.write_json(
        evaluate_uri, {"metrics": {"accuracy": 0.5}, "gate_metric": "accuracy", "promote": True, "reason": "first"}
    )
    register.run(
        load_config(
            None,
            ["run_id=champ", f"register.train_result_uri={train_uri}", f"register.evaluate_result_uri={evaluate_uri}"],
        )
    )


def test_the_shipped_set_is_skipped_for_other_intents_and_a_bar_on_it_says_why(snapshot, classifier_dir, capfd):
    common = [f"evaluate.snapshot_uri={snapshot}", f"evaluate.model_uri={json.dumps(str(classifier_dir))}"]
    result = evaluate.run(load_config(None, [*common, 'evaluate.thresholds=["accuracy[challenge]>=0.1"]']))
    assert not any(name.startswith("challenge") for name in result.slices)
    assert "the shipped challenge set is skipped" in capfd.readouterr().err
    assert not result.promote and "the challenge set was not scored" in result.reason
    assert load_config(None, ["task=causal-lm"]).evaluate.challenge_uri == ""  # intents, not conversations


def test_a_challenge_file_with_labels_the_model_does_not_know_is_refused_by_name(snapshot, classifier_dir, tmp_path):
    odd = write_jsonl(
        tmp_path / "odd.jsonl",
        [
            {"text": "wheres my stuff", "label": "order_status"},
            {"text": "give me my money back", "label": "refund"},
            {"text": "还有货吗", "label": "stock"},
        ],
    )
    common = [f"evaluate.snapshot_uri={snapshot}", f"evaluate.model_uri={json.dumps(str(classifier_dir))}"]
    with pytest.raises(DataError, match=r"odd.jsonl: label\(s\) \['refund', 'stock'\] \(2 of 3 rows\)"):
        evaluate.run(load_config(None, [*common, f"evaluate.challenge_uri={json.dumps(str(odd))}"]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "hi", "label": "order_status"}\n{"text": "no label"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="broken.jsonl: line 2 is not a JSON object with 'text' and 'label'"):
        evaluate.run(load_config(None, [*common, f"evaluate.challenge_uri={json.dumps(str(broken))}"]))
    with pytest.raises(ConfigError, match="sequence-classification only"):
        evaluate.run(load_config(None, ["task=causal-lm", *common, f"evaluate.challenge_uri={json.dumps(str(odd))}"]))


def test_the_regression_rule_leaves_the_challenge_slices_to_thresholds():
    cfg = load_config(None, []).evaluate
    ours = {"accuracy": 0.95, "macro_f1": 0.95}
    champion = {"accuracy": 0.90, "macro_f1": 0.90}
    theirs_slices = {"zh": {"rows": 100.0, "accuracy": 0.9}, "challenge:zh": {"rows": 110.0, "accuracy": 0.9}}
    worse_on_challenge = {"zh": {"rows": 100.0, "accuracy": 0.9}, "challenge:zh": {"rows": 110.0, "accuracy": 0.6}}
    promote, reason = evaluate.decide(ours, champion, cfg, slices=worse_on_challenge, champion_slices=theirs_slices)
    assert promote, reason
    worse_on_zh = {"zh": {"rows": 100.0, "accuracy": 0.6}, "challenge:zh": {"rows": 110.0, "accuracy": 0.9}}
    promote, reason = evaluate.decide(ours, champion, cfg, slices=worse_on_zh, champion_slices=theirs_slices)
    assert not promote and "slice 'zh'" in reason


def test_the_model_card_shows_the_challenge_set_apart_from_the_eval_split():
    slices = {
        "latin": {"rows": 80.0, "accuracy": 1.0},
        "zh": {"rows": 80.0, "accuracy": 0.9},
        "challenge": {"rows": 220.0, "accuracy": 0.7},
        "challenge:zh": {"rows": 110.0, "accuracy": 0.6},
    }
    inputs = {
        "train": {"snapshot_uri": "file:///s.parquet", "labels": CLASSIFIER_LABELS},
        "evaluate": {
            "metrics": {"accuracy": 0.95},
            "slices": slices,
            "gate_metric": "accuracy",
            "reason": "no champion yet",
            "champion_slices": {"challenge:zh": {"accuracy": 0.5}},
        },
        "collect": {},
    }
    card = register.model_card(load_config(None, []), inputs)
    eval_table, _, challenge_table = card.partition("### Challenge set (accuracy)")
    assert "| zh | 80 | 0.9000 | - |" in eval_table and "challenge" not in eval_table.split("### By language")[1]
    assert "| challenge:zh | 110 | 0.6000 | 0.5000 |" in challenge_table
    assert "| challenge | 220 | 0.7000 | - |" in challenge_table
