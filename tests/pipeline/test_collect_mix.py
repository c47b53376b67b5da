"""Weighted mixing of sources in collect: `#rows=N` and `#weight=W` on a collect.sources entry,
seeded, reproducible, recorded in the manifest, and never moving a row across the split."""

import json

import pytest

from pipeline import collect, storage
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.snapshot import load_snapshot
from tests.helpers import shipped_rows, write_jsonl


@pytest.fixture
def two_sources(tmp_path):
    rows = shipped_rows(labels=4, per_label=125)  # 500 distinct rows
    return (write_jsonl(tmp_path / "small.jsonl", rows[:100]), write_jsonl(tmp_path / "large.jsonl", rows[100:]))


def _collect(sources, *sets):
    result = collect.run(load_config(None, [f"collect.sources={json.dumps(sources)}", *sets]))
    return result, storage.read_json(result.manifest_uri)


def test_weights_set_the_shares_and_the_manifest_records_each_contribution(two_sources):
    small, large = two_sources
    result, manifest = _collect([f"{small}#weight=1", f"{large}#weight=3"])
    # The small source (100 rows) can fill a quarter of 400 rows at most: 100 + 300.
    assert result.rows == 400
    mix = {entry["source"]: entry for entry in manifest["mix"]["sources"]}
    assert mix[f"{small}#weight=1"]["rows_kept"] == 100 and mix[f"{large}#weight=3"]["rows_kept"] == 300
    assert mix[f"{large}#weight=3"]["rows_read"] == 400 and manifest["mix"]["seed"] == 42
    frame = load_snapshot(result.snapshot_uri)
    texts = {row["text"] for row in map(json.loads, small.read_text().splitlines())}
    assert len(frame) == 400 and texts <= set(frame["text"])  # the small source whole
    assert all(collect.split_of(t, 0.2) == s for t, s in zip(frame["text"], frame["split"]))  # same split as unmixed


def test_a_row_count_is_seeded_and_reproducible(two_sources):
    small, large = two_sources
    first, _ = _collect([str(small), f"{large}#rows=50"])
    again, _ = _collect([str(small), f"{large}#rows=50"])
    other, manifest = _collect([str(small), f"{large}#rows=50"], "seed=7")
    assert first.rows == 150 and first.sha256 == again.sha256 and other.sha256 != first.sha256
    kept = set(load_snapshot(first.snapshot_uri)["text"]) - {
        json.loads(line)["text"] for line in small.read_text().splitlines()
    }
    assert len(kept) == 50
    assert [e["rows_kept"] for e in manifest["mix"]["sources"]] == [100, 50]
    everything, _ = _collect([str(small), f"{large}#rows=10000"])  # more than there is: all of it
    assert everything.rows == 500


def test_unsampled_sources_give_the_snapshot_they_always_did(two_sources):
    small, large = two_sources
    plain, manifest = _collect([str(small), str(large)])
    assert plain.rows == 500 and "mix" not in manifest


@pytest.mark.parametrize(
    "fragment, says",
    [
        ("#weight=-1", "#weight must be above 0"),
        ("#rows=abc", "#rows='abc' is not a number"),
        ("#share=2", "unknown '#share'"),
        ("#rows=5&weight=1", "not both"),
    ],
)
def test_a_bad_sampling_suffix_names_the_entry(two_sources, fragment, says):
    small, _ = two_sources
    with pytest.raises(ConfigError) as refused:
        _collect([str(small), f"{small}{fragment}"])
    assert says in str(refused.value) and "collect.sources[1]" in str(refused.value)
