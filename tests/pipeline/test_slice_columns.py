"""Slices on columns the user names: collect carries them (collect.extra_columns), evaluate
scores each value as a slice (evaluate.slice_columns), the gate can bar one, and a missing column
is named at the step that needs it."""

import json

import pytest

from pipeline import collect, evaluate, storage
from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError
from pipeline.snapshot import load_snapshot
from tests.helpers import shipped_rows, write_jsonl


@pytest.fixture
def with_channel(tmp_path):
    rows = shipped_rows(labels=3, per_label=40)
    return write_jsonl(
        tmp_path / "chan.jsonl",
        [{**row, "channel": ["email", "chat"][i % 2], "ticket": i} for i, row in enumerate(rows)],
    )


def _collect(source, *sets):
    return collect.run(load_config(None, [f"collect.sources={json.dumps([str(source)])}", *sets]))


def test_collect_carries_the_named_columns_and_names_one_a_source_lacks(with_channel, tmp_path):
    plain = _collect(with_channel)
    carried = _collect(with_channel, 'collect.extra_columns=["channel", "ticket"]')
    frame = load_snapshot(carried.snapshot_uri)
    assert list(frame.columns) == ["text", "label", "channel", "ticket", "split"] and carried.sha256 != plain.sha256
    assert set(frame["channel"]) == {"email", "chat"} and frame["ticket"].iloc[3] == "3"  # as text
    assert list(load_snapshot(plain.snapshot_uri).columns) == ["text", "label", "split"]  # unchanged without it
    with pytest.raises(DataError, match=r"missing column\(s\) \['product'\] that collect.extra_columns carries"):
        _collect(with_channel, 'collect.extra_columns=["product"]')
    with pytest.raises(ConfigError, match="snapshot's own columns"):
        load_config(None, ['collect.extra_columns=["label"]'])


def test_evaluate_scores_each_value_as_a_slice_and_the_gate_can_bar_one(with_channel, classifier_dir):
    snapshot = _collect(with_channel, 'collect.extra_columns=["channel"]').snapshot_uri
    common = [
        f"evaluate.snapshot_uri={snapshot}",
        f"evaluate.model_uri={json.dumps(str(classifier_dir))}",
        'evaluate.slice_columns=["channel"]',
        "evaluate.min_slice_rows=5",
    ]
    result = evaluate.run(load_config(None, [*common, "run_id=slices"]))
    frame = load_snapshot(snapshot)
    eval_rows = frame[frame["split"] == "eval"]
    for value in ("email", "chat"):
        assert result.slices[f"channel={value}"]["rows"] == (eval_rows["channel"] == value).sum()
    assert {"latin", "zh"} <= set(result.slices)  # languages still sliced
    email = result.slices["channel=email"]["accuracy"]
    barred = evaluate.run(
        load_config(
            None, [*common, "run_id=barred", f'evaluate.thresholds=["accuracy[channel=email]>={email + 0.01:.4f}"]']
        )
    )
    assert not barred.promote and "accuracy[channel=email]" in barred.reason
    run_dir = storage.local_path(load_config(None, ["run_id=slices"]).step_uri("evaluate"))
    assert (run_dir / "confusion_matrix_channel=email.png").is_file()
    with pytest.raises(DataError, match="collect.extra_columns=\\['product'\\]"):
        evaluate.run(load_config(None, [*common[:2], 'evaluate.slice_columns=["product"]', "run_id=missing"]))
