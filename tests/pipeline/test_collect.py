import gzip
import json

import pytest

from pipeline import collect, storage
from pipeline.config import load_config
from pipeline.errors import DataError
from tests.helpers import write_jsonl


def _run(*sources, **sets):
    overrides = [f"collect.sources={json.dumps([str(s) for s in sources])}", "run_id=t"]
    overrides += [f"{k}={v}" for k, v in sets.items()]
    return collect.run(load_config(None, overrides))


def test_jsonl_csv_and_gzip_merge_into_one_snapshot(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "where is my parcel", "label": "order_status", "extra": 1}])
    (tmp_path / "b.csv").write_text('\ufefftext,label\r\n"line one\nline two",refund_request\r\n', encoding="utf-8")
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress('{"text": "我想退款 🙏", "label": "refund_request"}\n'.encode()))
    result = _run(tmp_path / "a.jsonl", tmp_path / "b.csv", tmp_path / "c.jsonl.gz")
    frame = collect.load_snapshot(result.snapshot_uri)
    assert list(frame.columns) == ["text", "label", "split"]
    assert sorted(frame["text"]) == sorted(["where is my parcel", "line one\nline two", "我想退款 🙏"])
    assert result.rows == 3 and result.labels == ["order_status", "refund_request"]
    manifest = storage.read_json(result.manifest_uri)
    assert manifest["sha256"] == result.sha256 and [s["rows"] for s in manifest["sources"]] == [1, 1, 1]


def test_same_data_gives_the_same_snapshot_and_rewrites_nothing(small_data):
    first = _run(small_data)
    path = storage.local_path(first.snapshot_uri)
    mtime = path.stat().st_mtime_ns
    second = _run(small_data)
    assert second.snapshot_uri == first.snapshot_uri and path.stat().st_mtime_ns == mtime
    changed = _run(small_data, **{"collect.eval_fraction": 0.3})
    assert changed.snapshot_uri != first.snapshot_uri


def test_split_is_by_text_hash_and_never_leaks(small_data):
    frame = collect.load_snapshot(_run(small_data).snapshot_uri)
    for text, split in zip(frame["text"], frame["split"]):
        assert split == collect.split_of(text, 0.2)
        assert collect.split_of(text.upper() + "  ", 0.2) == split  # normalised before hashing
    assert 0.05 < (frame["split"] == "eval").mean() < 0.4


def test_shipped_data_is_large_bilingual_and_balanced():
    frame = collect.load_snapshot(_run(collect.DEFAULT_SOURCE).snapshot_uri)
    assert len(frame) >= 1000 and frame["label"].nunique() >= 8
    chinese = frame["text"].str.contains(r"[\u4e00-\u9fff]")
    assert 0.3 < chinese.mean() < 0.7
    assert frame["text"].map(collect.normalize_text).is_unique


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "empty.jsonl: file is empty"),
    ("header.csv", b"text,label\n", "header.csv: has a header but no rows"),
    ("nolabel.jsonl", b'{"text": "hi"}\n', "nolabel.jsonl: missing column(s) ['label']"),
    ("broken.jsonl", b'{"text": "a", "label": "b"}\n{"text": oops}\n', "broken.jsonl: line 2 is not valid JSON"),
    ("latin1.csv", "text,label\ncaf\xe9,x\n".encode("latin-1"), "latin1.csv: not valid UTF-8 at byte"),
    ("data.txt", b"hello", "data.txt: unknown format"),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "a", "label": "b"}\n' * 50)[:-12], "cut.jsonl.gz: cannot decompress"),
    ("num.jsonl", b'{"text": "ok", "label": 1}\n{"text": 42, "label": 0}\n',
     "num.jsonl: row 2: 'text' is int 42, not a string (1 such row(s))"),
])
def test_bad_files_name_the_file_and_publish_nothing(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as error:
        _run(tmp_path / name)
    assert message in str(error.value)
    snapshots = storage.local_path(load_config(None, []).artifact_root) / "snapshots"
    assert not snapshots.exists()


def test_a_source_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"matches no files"):
        _run(tmp_path / "missing-*.csv")


def test_step_main_exit_code_and_error_file(tmp_path, capsys):
    code = collect.main(["--set", f"collect.sources={tmp_path}/none.jsonl", "--set", "run_id=r9"])
    assert code == 2
    assert "error: collect: source" in capsys.readouterr().err
    cfg = load_config(None, ["run_id=r9"])
    assert "matches no files" in storage.read_json(cfg.step_uri("collect") + "/error.json")["error"]


def test_numeric_labels_are_kept_as_strings(tmp_path):
    write_jsonl(tmp_path / "n.jsonl", [{"text": "yes please", "label": 1}, {"text": "no thanks", "label": 0}])
    assert _run(tmp_path / "n.jsonl").labels == ["0", "1"]
