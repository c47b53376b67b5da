"""Snapshot address schemes (pipeline.snapshot): collect writes scheme 2, and a scheme-1 snapshot
(tests/pipeline/snapshots/, published by collect at f5eecd5, before schemes) stays readable, is
never rewritten, and still serves validate as the accepted snapshot and the drift reference."""

import hashlib
import json
import shutil
from pathlib import Path

from pipeline import storage, validate
from pipeline.config import load_config
from pipeline.snapshot import SCHEME, load_snapshot, scheme_of
from tests.helpers import collect_snapshot

OLD = Path(__file__).parent / "snapshots" / "fc54ec251253a9ca653061c9120724f279db86f48b8eb1643f51c4a1c59ccb4e"


def _published_old() -> tuple[str, Path]:
    """The scheme-1 snapshot where collect published it, under this test's artifact root."""
    root = storage.local_path(load_config(None, []).artifact_root) / "snapshots" / OLD.name
    shutil.copytree(OLD, root)
    return storage.join(load_config(None, []).artifact_root, "snapshots", OLD.name, "data.parquet"), root


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_scheme_1_snapshot_reads_as_before_and_its_address_is_its_rows_as_json_lines():
    uri, root = _published_old()
    manifest = storage.read_json(root.as_uri() + "/manifest.json")
    assert scheme_of(manifest) == 1 and "scheme" not in manifest and manifest["sha256"] == OLD.name
    frame = load_snapshot(uri)
    assert list(frame.columns) == ["text", "label", "split"] and len(frame) == manifest["rows"] == 120
    rows = "".join(json.dumps(list(row), ensure_ascii=False) + "\n" for row in frame.itertuples(index=False))
    assert hashlib.sha256(rows.encode()).hexdigest() == OLD.name  # scheme 1's address, recomputed


def test_recollecting_a_scheme_1_snapshot_publishes_scheme_2_beside_it_and_validate_spans_the_change():
    old_uri, root = _published_old()
    before = _files(root)
    accepted = validate.run(load_config(None, [f"validate.snapshot_uri={old_uri}", "run_id=r1"]))
    assert storage.read_json(accepted.accepted_uri)["sha256"] == OLD.name  # accepted under scheme 1

    new = collect_snapshot([old_uri], "run_id=r2")
    manifest = storage.read_json(new.manifest_uri)
    assert scheme_of(manifest) == SCHEME == 2 and new.sha256 != OLD.name
    assert _files(root) == before  # the scheme-1 snapshot is never rewritten
    old, fresh = load_snapshot(old_uri), load_snapshot(new.snapshot_uri)
    assert fresh[["text", "label"]].equals(old[["text", "label"]])  # the same rows, in order
    assert collect_snapshot([new.snapshot_uri], "run_id=r3").sha256 == new.sha256  # scheme 2 is stable

    # validate's next run takes the scheme-1 record as its reference: the labels, and drift of the
    # same texts, which is none; the pointer then moves to the scheme-2 snapshot with its address.
    result = validate.run(load_config(None, [f"validate.snapshot_uri={new.snapshot_uri}", "run_id=r2"]))
    summary = storage.read_json(result.summary_uri)
    assert summary["drift"]["status"] == "compared" and summary["drift"]["reference"]["sha256"] == OLD.name
    checks = {c["check"]: c for c in summary["checks"]}
    assert [checks[n]["observed_value"] for n in ("drift_label_psi", "drift_length_ks", "drift_oov_rate")] == [0, 0, 0]
    record = storage.read_json(result.accepted_uri)
    assert (record["sha256"], record["snapshot_uri"]) == (new.sha256, new.snapshot_uri)


def test_scheme_2_gives_every_row_the_split_scheme_1_gave_it(tmp_path):
    """The rows of the scheme-1 snapshot as a plain source (no split column): collected under
    scheme 2, each keeps its split, so a champion trained before the change has seen no new eval row."""
    uri, _ = _published_old()
    old = load_snapshot(uri)
    source = tmp_path / "rows.jsonl"
    source.write_text(
        "".join(
            json.dumps({"text": t, "label": x}, ensure_ascii=False) + "\n" for t, x in zip(old["text"], old["label"])
        )
    )
    fresh = load_snapshot(collect_snapshot([str(source)], "run_id=r4").snapshot_uri)
    assert fresh["text"].tolist() == old["text"].tolist() and 0 < (old["split"] == "eval").sum() < len(old)
    assert fresh["split"].tolist() == old["split"].tolist()
