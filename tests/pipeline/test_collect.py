import gzip
import hashlib
import json
import subprocess

import pytest

from pipeline import chat, cli, collect, storage
from pipeline.config import load_config
from pipeline.config.collect import DEFAULT_SOURCE
from pipeline.errors import DataError
from pipeline.snapshot import load_snapshot
from pipeline.text import normalize_text
from tests.helpers import PYTHON, collect_snapshot, shipped_rows, subprocess_env, write_jsonl


def _run(*sources, **sets):
    return collect_snapshot(list(sources), "run_id=t", *(f"{k}={v}" for k, v in sets.items()))


def _published_snapshots(**sets) -> list:
    root = load_config(None, [f"{k}={v}" for k, v in sets.items()]).artifact_root
    snapshots = storage.local_path(root) / "snapshots"
    return sorted(snapshots.rglob("*")) if snapshots.exists() else []


def _fails(*sources, **sets) -> str:
    """Run `finetune collect` in-process as a container would; it must exit 2, publish nothing and
    record why in error.json. Returns that message."""
    argv = ["--set", f"collect.sources={json.dumps([str(s) for s in sources])}", "--set", "run_id=bad"]
    argv += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert cli.main(["collect", *argv]) == 2
    assert _published_snapshots(**sets) == []
    return storage.read_json(load_config(None, ["run_id=bad"]).step_uri("collect") + "/error.json")["error"]


def _parquet(path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


def test_jsonl_csv_and_gzip_merge_into_one_snapshot_with_a_manifest(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "where is my parcel", "label": "order_status", "extra": 1}])
    (tmp_path / "b.csv").write_text('\ufefftext,label\r\n"line one\nline two",refund_request\r\n', encoding="utf-8")
    (tmp_path / "c.jsonl.gz").write_bytes(
        gzip.compress('{"text": "我想退款 🙏", "label": "refund_request"}\n'.encode())
    )
    result = _run(tmp_path / "a.jsonl", tmp_path / "b.csv", tmp_path / "c.jsonl.gz")
    frame = load_snapshot(result.snapshot_uri)
    assert list(frame.columns) == ["text", "label", "split"]
    assert list(frame["text"]) == ["where is my parcel", "line one\nline two", "我想退款 🙏"]  # source order kept
    assert result.rows == 3 and result.labels == ["order_status", "refund_request"]
    manifest = storage.read_json(result.manifest_uri)
    assert (manifest["sha256"], manifest["rows"]) == (result.sha256, 3)
    assert manifest["task"] == "sequence-classification"
    assert manifest["schema"] == {"text": "string", "label": "string", "split": "string"}
    for entry, name in zip(manifest["sources"], ("a.jsonl", "b.csv", "c.jsonl.gz")):
        raw = (tmp_path / name).read_bytes()
        assert entry["uri"] == str(tmp_path / name) and entry["rows"] == 1 and entry["bytes"] == len(raw)
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest() and entry["last_modified"].startswith("20")
        assert entry["etag"] is None  # local files have none
    assert manifest["created_at"] and manifest["row_groups"] == 1


def test_same_data_gives_the_same_snapshot_and_rewrites_nothing(small_data):
    first = _run(small_data)
    path = storage.local_path(first.snapshot_uri)
    mtime = path.stat().st_mtime_ns
    second = _run(small_data)
    assert second.snapshot_uri == first.snapshot_uri and path.stat().st_mtime_ns == mtime
    changed = _run(small_data, **{"collect.eval_fraction": 0.3})
    assert changed.snapshot_uri != first.snapshot_uri
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.parquet", "manifest.json"]  # no temp files left


def test_split_is_by_text_hash_and_never_leaks(small_data):
    frame = load_snapshot(_run(small_data).snapshot_uri)
    for text, split in zip(frame["text"], frame["split"]):
        assert split == collect.split_of(text, 0.2)
        assert collect.split_of(text.upper() + "  ", 0.2) == split  # normalised before hashing
    assert 0.05 < (frame["split"] == "eval").mean() < 0.4


def test_shipped_data_is_large_bilingual_and_balanced():
    frame = load_snapshot(_run(DEFAULT_SOURCE).snapshot_uri)
    assert len(frame) >= 1000 and frame["label"].nunique() >= 8
    chinese = frame["text"].str.contains(r"[\u4e00-\u9fff]")
    assert 0.3 < chinese.mean() < 0.7
    assert frame["text"].map(normalize_text).is_unique


def test_streaming_writes_row_groups_and_the_hash_ignores_chunking(tmp_path):
    import pyarrow.parquet as pq

    rows = shipped_rows(labels=2, per_label=30)
    write_jsonl(tmp_path / "a.jsonl", rows[:22])
    (tmp_path / "b.csv").write_text(
        "text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in rows[22:40]), encoding="utf-8"
    )
    _parquet(tmp_path / "c.parquet", {"text": [r["text"] for r in rows[40:]], "label": [r["label"] for r in rows[40:]]})
    sources = [tmp_path / "a.jsonl", tmp_path / "b.csv", tmp_path / "c.parquet"]
    chunked = _run(*sources, **{"collect.row_group_rows": 7, "artifact_root": (tmp_path / "small").as_uri()})
    whole = _run(*sources, **{"artifact_root": (tmp_path / "big").as_uri()})
    assert chunked.sha256 == whole.sha256 and chunked.rows == whole.rows == 60
    sizes = [pq.ParquetFile(storage.local_path(chunked.snapshot_uri)).metadata.row_group(i).num_rows for i in range(9)]
    assert sizes == [7] * 8 + [4]  # exactly row_group_rows each, across file and chunk boundaries
    assert pq.ParquetFile(storage.local_path(whole.snapshot_uri)).metadata.num_row_groups == 1
    assert storage.read_json(chunked.manifest_uri)["row_groups"] == 9
    assert load_snapshot(chunked.snapshot_uri).equals(load_snapshot(whole.snapshot_uri))


def test_awkward_but_valid_input_is_collected(tmp_path):
    big = "我" * 700_000 + " 🙂"  # ~2.1 MB: a UTF-8 character straddles every 1 MiB read; validate judges length
    (tmp_path / "a.jsonl").write_bytes(
        b'\xef\xbb\xbf{"text": "emoji \\ud83d\\ude00 \xe2\x80\xa8 inside", "label": "x"}\r\n\r\n\n'
        + json.dumps({"text": big, "label": "y"}, ensure_ascii=False).encode()
        + b"\n"
    )
    (tmp_path / "b.csv").write_bytes('\ufefftext,label\r\n"引号 ""内"" ,\r\n换行",z\r\nplain,\r\n'.encode())
    frame = load_snapshot(_run(tmp_path / "a.jsonl", tmp_path / "b.csv").snapshot_uri)
    assert list(frame["text"]) == ["emoji 😀 \u2028 inside", big, '引号 "内" ,\r\n换行', "plain"]
    assert list(frame["label"].fillna("<null>")) == ["x", "y", "z", "<null>"]  # an empty cell is null, for validate


def test_parquet_and_gzipped_parquet_sources(tmp_path):
    _parquet(tmp_path / "a.parquet", {"text": ["one", "two"], "label": [0, 1]})
    plain = (tmp_path / "a.parquet").read_bytes()
    (tmp_path / "b.parquet.gz").write_bytes(gzip.compress(plain))
    result = _run(tmp_path / "a.parquet", tmp_path / "b.parquet.gz")
    assert result.rows == 4 and result.labels == ["0", "1"]


# Ids are the file names: the gzip bytes carry a timestamp, and ids built from them differ between
# xdist workers that collect a second apart, which stops the whole run at collection.
BAD_FILES = [
    ("empty.jsonl", b"", "empty.jsonl: file is empty"),
    ("blank.jsonl", b"\n  \n", "blank.jsonl: file is empty"),
    ("empty.csv.gz", gzip.compress(b"", mtime=0), "empty.csv.gz: file is empty"),
    ("header.csv", b"text,label\r\n", "header.csv: has a header but no rows"),
    (
        "nolabel.jsonl",
        b'{"text": "hi"}\n',
        "nolabel.jsonl: missing column(s) 'label' (collect.label_column); the file's columns are ['text']: "
        "set collect.label_column=<column>",
    ),
    (
        "notext.csv",
        b"body,label\nhi,x\n",
        "notext.csv: missing column(s) 'text' (collect.text_column); the file's columns are ['body', 'label']: "
        "set collect.text_column=<column>",
    ),
    (
        "broken.jsonl",
        b'{"text": "a", "label": "b"}\n{"text": oops}\n',
        "broken.jsonl: line 2 is not valid JSON (Expecting value at column 10)",
    ),
    (
        "list.jsonl",
        b'{"text": "a", "label": "b"}\n["a", "b"]\n',
        "list.jsonl: line 2 is not a JSON object but list",
    ),
    ("latin1.csv", "text,label\ncaf\xe9,x\n".encode("latin-1"), "latin1.csv: not valid UTF-8 at byte 14 (line 2)"),
    (
        "bad.jsonl",
        b'{"text": "a", "label": "b"}\n{"text": "\xff", "label": "b"}\n',
        "bad.jsonl: not valid UTF-8 at byte 38 (line 2)",
    ),
    ("data.txt", b"hello", "data.txt: unknown format"),
    (
        "cut.jsonl.gz",
        gzip.compress(b'{"text": "a", "label": "b"}\n' * 50)[:-12],
        "cut.jsonl.gz: cannot decompress gzip data (Compressed file ended before the end-of-stream marker",
    ),
    ("cut.csv.gz", gzip.compress(b"text,label\n" + b"a,b\n" * 50)[:-12], "cut.csv.gz: cannot decompress gzip"),
    (
        "fake.jsonl.gz",
        b'{"text": "a", "label": "b"}\n',
        "fake.jsonl.gz: cannot decompress gzip data (Not a gzipped",
    ),
    (
        "num.jsonl",
        b'{"text": "ok", "label": 1}\n\n{"text": 42, "label": 0}\n',
        "num.jsonl: row 2 (line 3): 'text' is int 42, not a string",
    ),
    (
        "badlabel.jsonl",
        b'{"text": "ok", "label": "\\udc00"}\n',
        "badlabel.jsonl: row 1: a value is not valid Unicode",
    ),
    (
        "nested.jsonl",
        b'{"text": "ok", "label": ["a"]}\n',
        "nested.jsonl: row 1: 'label' is list ['a'], not a string",
    ),
    (
        "surrogate.jsonl",
        b'{"text": "ok", "label": "a"}\n{"text": "\\ud800", "label": "a"}\n',
        "surrogate.jsonl: row 2: 'text' is not valid Unicode",
    ),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_files_name_the_file_and_publish_nothing(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    assert message in _fails(tmp_path / name)


def test_bad_utf8_far_into_a_file_gives_the_exact_byte_and_line(tmp_path):
    head = "text,label\n" + "".join(f"{'é' * 1000},x\n" for _ in range(1500))  # ~3 MB: many reads
    (tmp_path / "late.csv").write_bytes(head.encode() + b"caf\xc3(,x\n")
    assert f"late.csv: not valid UTF-8 at byte {len(head.encode()) + 3} (line 1502)" in _fails(tmp_path / "late.csv")


def _many_rows(count: int) -> list[dict]:
    """``count`` unique shipped-like rows: past pyarrow's first 1 MiB block from about 10,000."""
    shipped = shipped_rows(labels=8, per_label=200)
    return [{**shipped[i % len(shipped)], "text": f"{shipped[i % len(shipped)]['text']} #{i}"} for i in range(count)]


def test_where_pyarrow_stops_late_in_a_file_the_row_by_row_reader_gives_the_same_snapshot(tmp_path):
    rows = _many_rows(30_000)
    write_jsonl(tmp_path / "strings.jsonl", rows)  # read by pyarrow from first to last
    numbers = [dict(r) for r in rows]
    numbers[25_000]["label"] = 7  # pyarrow stops here, blocks after its first; a number label is valid
    write_jsonl(tmp_path / "numbers.jsonl", numbers)
    rows[25_000]["label"] = "7"  # what the row-by-row reader makes of the number
    write_jsonl(tmp_path / "expected.jsonl", rows)
    fast = _run(tmp_path / "expected.jsonl", **{"artifact_root": (tmp_path / "fast").as_uri()})
    mixed = _run(tmp_path / "numbers.jsonl", **{"artifact_root": (tmp_path / "mixed").as_uri()})
    assert (mixed.sha256, mixed.rows, mixed.rows_eval) == (fast.sha256, 30_000, fast.rows_eval)
    assert load_snapshot(mixed.snapshot_uri).equals(load_snapshot(fast.snapshot_uri))


def test_bad_json_late_in_a_file_names_its_line(tmp_path):
    lines = [json.dumps(r, ensure_ascii=False) for r in _many_rows(20_000)]
    lines[17_000] = '{"text": "cut off", "label": '
    (tmp_path / "late.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert "late.jsonl: line 17001 is not valid JSON (Expecting value" in _fails(tmp_path / "late.jsonl")


def test_a_later_bad_file_publishes_nothing_from_the_good_ones(small_data, tmp_path):
    (tmp_path / "zero.parquet").write_bytes(b"PAR1 not really")
    assert "zero.parquet: not a readable Parquet file" in _fails(small_data, tmp_path / "zero.parquet")
    _parquet(tmp_path / "none.parquet", {"text": [], "label": []})
    assert "none.parquet: has a header but no rows" in _fails(small_data, tmp_path / "none.parquet")


def test_a_source_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"matches no files"):
        _run(tmp_path / "missing-*.csv")
    assert "matches no files" in _fails(tmp_path / "empty-dir-*")


def test_step_main_exit_code_and_error_file(tmp_path, capsys):
    code = cli.main(["collect", "--set", f"collect.sources={tmp_path}/none.jsonl", "--set", "run_id=r9"])
    assert code == 2
    assert "error: collect: source" in capsys.readouterr().err
    cfg = load_config(None, ["run_id=r9"])
    assert "matches no files" in storage.read_json(cfg.step_uri("collect") + "/error.json")["error"]


def test_a_rerun_that_fails_leaves_no_result_of_the_run_before(small_data, tmp_path):
    step_uri = load_config(None, ["run_id=again"]).step_uri("collect")
    argv = ["collect", "--set", "run_id=again", "--set"]
    assert cli.main([*argv, f"collect.sources={json.dumps([str(small_data)])}"]) == 0
    assert storage.exists(f"{step_uri}/result.json") and not storage.exists(f"{step_uri}/error.json")
    assert cli.main([*argv, f"collect.sources={json.dumps([str(tmp_path / 'gone.jsonl')])}"]) == 2
    assert not storage.exists(f"{step_uri}/result.json")  # a reader must not take it for this run's
    assert "gone.jsonl matches no files" in storage.read_json(f"{step_uri}/error.json")["error"]


def test_finetune_command_exits_2_and_publishes_nothing(tmp_path, finetune_home):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a", "label": "b"}\n{oops\n')
    done = subprocess.run(
        [PYTHON, "-m", "pipeline", "collect", "--set", f"collect.sources={tmp_path}/bad.jsonl"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"error: collect: {tmp_path}/bad.jsonl: line 2 is not valid JSON" in done.stderr
    assert not (finetune_home / "artifacts" / "snapshots").exists()


def test_numeric_labels_are_kept_as_strings(tmp_path):
    write_jsonl(tmp_path / "n.jsonl", [{"text": "yes please", "label": 1}, {"text": "no thanks", "label": 0}])
    assert _run(tmp_path / "n.jsonl").labels == ["0", "1"]


def test_configured_column_names(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"question": "hi there", "intent": "greet"}])
    result = _run(tmp_path / "q.jsonl", **{"collect.text_column": "question", "collect.label_column": "intent"})
    assert load_snapshot(result.snapshot_uri)[["text", "label"]].values.tolist() == [["hi there", "greet"]]


def _chat_sources(tmp_path):
    conversation = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello! 👋"}]
    write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": conversation},
            {"messages": json.dumps(conversation)},  # as JSON text, the way a snapshot holds it
            {"system": "Be brief.", "prompt": "Reset my password", "response": "Use the link on the login page."},
            {
                "prompt": "wrong order is validate's job",
                "response": "ok",
                "messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "then"}],
            },
        ],
    )
    (tmp_path / "pairs.csv").write_text('prompt,response\n"Where, exactly?","Here.\nThere."\n', encoding="utf-8")
    return [tmp_path / "chat.jsonl", tmp_path / "pairs.csv"]


def test_causal_lm_collects_messages_and_instructions(tmp_path):
    result = _run(*_chat_sources(tmp_path), task="causal-lm")
    frame = load_snapshot(result.snapshot_uri)
    assert list(frame.columns) == ["messages", "split"] and result.rows == 5 and result.labels == []
    conversations = [json.loads(m) for m in frame["messages"]]
    assert (
        conversations[0]
        == conversations[1]
        == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hello! 👋"}]
    )
    assert [m["role"] for m in conversations[2]] == ["system", "user", "assistant"]
    assert conversations[3][0] == {"role": "assistant", "content": "first"}  # 'messages' wins; order not judged
    assert conversations[4][1]["content"] == "Here.\nThere."
    assert list(frame["split"]) == [collect.split_of(m, 0.2) for m in frame["messages"]]
    assert frame["messages"][0] == chat.dumps(conversations[0])
    manifest = storage.read_json(result.manifest_uri)
    assert manifest["task"] == "causal-lm" and manifest["schema"] == {"messages": "string", "split": "string"}


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_recollecting_a_snapshot_gives_the_same_sha_and_uri(tmp_path, small_data, task):
    sources = [small_data] if task == "sequence-classification" else _chat_sources(tmp_path)
    first = _run(*sources, task=task)
    manifest = storage.local_path(first.manifest_uri).read_bytes()
    again = _run(first.snapshot_uri, task=task, **{"collect.row_group_rows": 3})
    assert (again.sha256, again.snapshot_uri, again.rows) == (first.sha256, first.snapshot_uri, first.rows)
    assert storage.local_path(first.manifest_uri).read_bytes() == manifest  # nothing rewritten
    elsewhere = _run(first.snapshot_uri, task=task, artifact_root=(tmp_path / "other").as_uri())
    assert elsewhere.sha256 == first.sha256
    assert load_snapshot(elsewhere.snapshot_uri).equals(load_snapshot(first.snapshot_uri))


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "a", "response": "b"}] * 6 + [{"messages": [{"role": "robot", "content": "beep"}]}],
            "chat.jsonl: row 7: message 1: role 'robot' is not one of ['system', 'user', 'assistant']",
        ),
        (
            [{"prompt": "a", "response": "b"}, {"prompt": "only a prompt"}],
            "chat.jsonl: row 2: needs either 'messages' or both 'prompt' and 'response'",
        ),
        ([{"prompt": "a", "response": 5}], "chat.jsonl: row 1: 'response' is int 5, not a string"),
        ([{"messages": "[{not json"}], "chat.jsonl: row 1: 'messages' is not valid JSON"),
    ],
)
def test_causal_lm_bad_records_name_the_file_and_row(tmp_path, rows, message):
    write_jsonl(tmp_path / "chat.jsonl", rows)
    assert message in _fails(tmp_path / "chat.jsonl", task="causal-lm")


def test_causal_lm_file_without_chat_columns(tmp_path):
    (tmp_path / "plain.csv").write_text("text,label\nhi,x\n", encoding="utf-8")
    assert (
        "plain.csv: missing column(s): needs 'messages', or 'prompt' and 'response' (task=causal-lm reads these "
        "names; no setting maps another column to them); the file's columns are ['label', 'text']"
        in _fails(tmp_path / "plain.csv", task="causal-lm")
    )


@pytest.mark.parametrize(
    "lines, reason",
    [
        ('{"text": "a", "label": "x"} {"text": "b", "label": "y"}', "is not valid JSON (Extra data"),
        ('{"text": "a", "label": "x"}\r{"text": "b", "label": "y"}', "is not valid JSON (Extra data"),
        ('{"text":\n "a", "label": "x"}', "is not valid JSON (Expecting value"),
        ("null", "is not a JSON object but NoneType"),  # pyarrow reads it as a row of nulls
        ("  [1]", "is not a JSON object but list"),
    ],
    ids=["two-objects-on-a-line", "two-split-by-cr", "one-across-lines", "null", "a-list"],
)
def test_what_pyarrow_would_read_but_jsonl_is_not_is_refused_naming_the_line(tmp_path, lines, reason):
    # pyarrow's reader takes these; a JSONL record is one line, so the row-by-row reader names it.
    rows = [json.dumps(r, ensure_ascii=False) for r in _many_rows(12_000)]  # line 11,001: pyarrow's second block
    (tmp_path / "odd.jsonl").write_text("\n".join([*rows[:11_000], lines, *rows[11_000:]]) + "\n", encoding="utf-8")
    assert f"odd.jsonl: line 11001 {reason}" in _fails(tmp_path / "odd.jsonl")
    (tmp_path / "first.jsonl").write_text(lines + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert f"first.jsonl: line 1 {reason}" in _fails(tmp_path / "first.jsonl")  # a lone null line crashes pyarrow
