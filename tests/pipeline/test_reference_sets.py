"""Reference sets: rows the deployment owns, pinned by sha256, scored for the new model and the
champion on every run. The label-swap attack (a trigger's data with two labels swapped, whose eval
split then flatters a model trained on it) is refused by name; an honest improvement promotes; a
reference file that changed under its pin fails the step by name; a trigger can set none of it."""

import hashlib
import json

import pytest

from pipeline import evaluate, register, steps, storage
from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate.reference import read_reference_sets
from pipeline.tracking import client, pipeline_run_id
from tests.helpers import SHIPPED_DATA, write_jsonl, write_snapshot

SHIPPED_CHALLENGE_SHA256 = "b1caf220930eeb5bbb143974f59acc5dba2df7973c2bbe02c2978b657eca4a84"
SWAPPED = ("password_reset", "order_status")  # the two labels the attacker's data swaps


def _honest_and_swapped(classifier_dir, tmp_path):
    """An honest model (the tiny classifier, its head biased to answer password_reset), and the same
    weights with password_reset and order_status swapped: what training on swapped labels yields."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    with torch.no_grad():
        model.classifier.bias.fill_(-10.0)
        model.classifier.bias[model.config.label2id["password_reset"]] = 10.0
    model.save_pretrained(tmp_path / "honest")
    tokenizer.save_pretrained(tmp_path / "honest")
    a, b = (model.config.label2id[label] for label in SWAPPED)
    model.config.id2label = {**model.config.id2label, a: SWAPPED[1], b: SWAPPED[0]}
    model.config.label2id = {label: i for i, label in model.config.id2label.items()}
    model.save_pretrained(tmp_path / "swapped")
    tokenizer.save_pretrained(tmp_path / "swapped")
    return tmp_path / "honest", tmp_path / "swapped"


def _rows():
    """8 password resets and 4 refund requests from the shipped data, honestly labelled."""
    shipped = [json.loads(line) for line in SHIPPED_DATA.read_text(encoding="utf-8").splitlines()]
    return [r for r in shipped if r["label"] == "password_reset"][:8] + [
        r for r in shipped if r["label"] == "refund_request"
    ][:4]


def _swap(label):
    return {SWAPPED[0]: SWAPPED[1], SWAPPED[1]: SWAPPED[0]}.get(label, label)


def _eval_split(tmp_path, rows, swapped):
    """The trigger's snapshot: the same texts, with the two labels swapped when ``swapped``."""
    table = [(r["text"], _swap(r["label"]) if swapped else r["label"], "eval") for r in rows]
    return write_snapshot(tmp_path / f"snap-{swapped}.parquet", table, ["text", "label", "split"])


def _pinned(path):
    return {"support": f"{path.as_uri()}#sha256={hashlib.sha256(path.read_bytes()).hexdigest()}"}


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


def _settings(snapshot, model_dir, run_id, *more):
    return [
        f"evaluate.snapshot_uri={snapshot}",
        f"evaluate.model_uri={json.dumps(str(model_dir))}",
        "evaluate.challenge_uri=''",
        f"run_id={run_id}",
        *more,
    ]


def test_the_label_swap_attack_is_refused_naming_the_reference_set(tmp_path, classifier_dir):
    honest, swapped = _honest_and_swapped(classifier_dir, tmp_path)
    rows = _rows()
    reference = f"evaluate.reference_sets={json.dumps(_pinned(write_jsonl(tmp_path / 'support.jsonl', rows)))}"
    attack = _eval_split(tmp_path, rows, swapped=True)

    # First run, no champion: only the reference thresholds can stop the swapped model.
    barred = evaluate.run(
        load_config(
            None, _settings(attack, swapped, "first", reference, 'evaluate.reference_thresholds=["accuracy>=0.5"]')
        )
    )
    assert not barred.promote
    assert (
        barred.reason == "reference set 'support': accuracy 0.0000 fails evaluate.reference_thresholds 'accuracy>=0.5'"
    )

    _register_champion(tmp_path, honest)
    # Issue 23's repro: scored on the trigger's own eval split alone, the swapped model wins.
    unguarded = evaluate.run(load_config(None, _settings(attack, swapped, "unguarded")))
    assert unguarded.metrics["accuracy"] == pytest.approx(8 / 12) and unguarded.champion_metrics["accuracy"] == 0.0
    assert unguarded.promote
    # With the deployment's reference set: the same rows for both, and the swap shows.
    guarded = evaluate.run(load_config(None, _settings(attack, swapped, "guarded", reference)))
    assert guarded.reference["support"] == {"rows": 12.0, "accuracy": 0.0, "macro_f1": 0.0}
    assert guarded.champion_reference["support"]["accuracy"] == pytest.approx(8 / 12)
    assert not guarded.promote
    assert guarded.reason == (
        "reference set 'support': accuracy 0.0000 is worse than the champion's 0.6667 on the same 12 rows by more "
        "than evaluate.max_reference_regression=0.02"
    )
    logged = client().get_run(pipeline_run_id(load_config(None, ["run_id=guarded"]))).data.metrics
    assert logged["reference/support/accuracy"] == 0.0 and logged["reference/support/rows"] == 12.0
    assert logged["reference/support/champion_accuracy"] == pytest.approx(8 / 12)


def test_an_honest_improvement_holds_on_the_reference_set_and_promotes(tmp_path, classifier_dir):
    honest, swapped = _honest_and_swapped(classifier_dir, tmp_path)
    rows = _rows()
    reference = f"evaluate.reference_sets={json.dumps(_pinned(write_jsonl(tmp_path / 'support.jsonl', rows)))}"
    _register_champion(tmp_path, swapped)
    result = evaluate.run(
        load_config(None, _settings(_eval_split(tmp_path, rows, swapped=False), honest, "h", reference))
    )
    assert result.reference["support"]["accuracy"] == pytest.approx(8 / 12)
    assert result.champion_reference["support"]["accuracy"] == 0.0
    assert result.promote and result.reason.endswith("; holds on reference set(s) ['support']"), result.reason


def test_a_reference_file_that_changed_under_its_pin_fails_the_step_naming_it(tmp_path, classifier_dir):
    rows = _rows()
    path = write_jsonl(tmp_path / "support.jsonl", rows)
    reference = f"evaluate.reference_sets={json.dumps(_pinned(path))}"
    write_jsonl(path, [{**rows[0], "label": "refund_request"}, *rows[1:]])  # one row relabelled after pinning
    snapshot = _eval_split(tmp_path, rows, swapped=False)
    with pytest.raises(DataError, match=r"evaluate.reference_sets\['support'\] file://.*support.jsonl: its sha256 is"):
        evaluate.run(load_config(None, _settings(snapshot, classifier_dir, "changed", reference)))
    assert not storage.exists(load_config(None, ["run_id=changed"]).step_uri("evaluate") + "/result.json")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "wheres my stuff", "label": "shipping"}])
    with pytest.raises(DataError, match=r"reference_sets\['support'\]: label\(s\) \['shipping'\] are not labels"):
        evaluate.run(
            load_config(
                None, _settings(snapshot, classifier_dir, "odd", f"evaluate.reference_sets={json.dumps(_pinned(odd))}")
            )
        )


@pytest.mark.parametrize(
    "sets, message",
    [
        ({"reference_sets": {"support": "file:///r.jsonl"}}, r"reference_sets\['support'\]: 'file:///r.jsonl' is not"),
        (
            {"reference_sets": {"support": "file:///r.jsonl#sha256=abc"}},
            r"reference_sets\['support'\]: .*<64 lowercase hex digits>",
        ),
        ({"reference_sets": {"a/b": "file:///r.jsonl#sha256=" + "0" * 64}}, r"reference_sets\['a/b'\]: a set's name"),
        ({"reference_thresholds": ["accuracy>=0.8"]}, "evaluate.reference_sets is empty"),
        (
            {
                "reference_sets": {"support": "file:///r.jsonl#sha256=" + "0" * 64},
                "reference_thresholds": ["accuracy[x]>=0.8"],
            },
            r"reference_thresholds: 'accuracy\[x\]>=0.8' names 'x', not a set of \['support'\]",
        ),
        (
            {
                "reference_sets": {"support": "file:///r.jsonl#sha256=" + "0" * 64},
                "reference_thresholds": ["perplexity<=9"],
            },
            r"reference_thresholds: 'perplexity<=9': reference sets are scored with \['accuracy', 'macro_f1'\]",
        ),
    ],
)
def test_a_bad_reference_setting_is_refused_naming_the_entry(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"evaluate.{key}={json.dumps(value)}" for key, value in sets.items()])


def test_the_shipped_challenge_set_pins_as_the_docs_say():
    """docs/evaluation-and-promotion.md pins the shipped challenge set with this sha256."""
    pin = "pkg://pipeline/data/support_challenge.jsonl#sha256=" + SHIPPED_CHALLENGE_SHA256
    sets = read_reference_sets(
        load_config(None, [f"evaluate.reference_sets={json.dumps({'challenge': pin})}"]).evaluate
    )
    assert len(sets["challenge"][0]) == 220


def test_reference_sets_are_refused_for_a_causal_lm_and_set_by_the_deployment_only(tmp_path):
    pinned = {"support": "file:///r.jsonl#sha256=" + "0" * 64}
    with pytest.raises(ConfigError, match="evaluate.reference_sets: .* sequence-classification only, not causal-lm"):
        evaluate.run(
            load_config(
                None,
                [
                    "task=causal-lm",
                    "evaluate.snapshot_uri=x",
                    "evaluate.model_uri=y",
                    f"evaluate.reference_sets={json.dumps(pinned)}",
                ],
            )
        )
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text(f"evaluate:\n  reference_sets: {json.dumps(pinned)}\ntrigger_keys: ['evaluate.*']\n")
    overrides = steps.deployment_overrides({"FINETUNE_CONFIG": str(deployment)})
    cfg = load_config(
        None, steps.step_overrides("collect", {"overrides": ["evaluate.batch_size=8"]}, {}, "r", deployment=overrides)
    )
    assert cfg.evaluate.reference_sets == pinned and cfg.evaluate.batch_size == 8
    for override in (
        "evaluate.reference_sets={}",
        'evaluate.reference_thresholds=["accuracy>=0"]',
        "evaluate.max_reference_regression=1",
    ):
        key = override.partition("=")[0]
        with pytest.raises(ConfigError, match=f"'{key}' may not be set by a trigger"):
            steps.step_overrides("collect", {"overrides": [override]}, {}, "r", deployment=overrides)
