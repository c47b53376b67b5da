"""Bounded reads: a record, or a .gz's output, past collect's limits is refused by name while it is
being read, so neither memory nor scratch grows with it (issue 23 item 7)."""

import gzip
import json
import os
import subprocess
import textwrap

import pytest

from pipeline import cli, storage
from pipeline.config import load_config
from tests.helpers import PYTHON, collect_snapshot, subprocess_env

KIB, MIB = 1 << 10, 1 << 20
ROW = b'{"text": "hello", "label": "a"}\n'


def _fails(source, *settings: str) -> str:
    """``finetune collect`` in this process: exit 2, nothing published; the error.json message."""
    argv = ["collect", "--set", f"collect.sources={json.dumps([str(source)])}", "--set", "run_id=bad"]
    argv += [a for setting in settings for a in ("--set", setting)]
    cfg = load_config(None, ["run_id=bad"])
    snapshots = storage.local_path(cfg.artifact_root) / "snapshots"
    before = sorted(snapshots.rglob("*"))
    assert cli.main(argv) == 2
    assert sorted(snapshots.rglob("*")) == before
    return storage.read_json(cfg.step_uri("collect") + "/error.json")["error"]


def _line(size: int) -> bytes:
    """A JSONL record of exactly ``size`` bytes, its newline not counted."""
    head, tail = b'{"label": "a", "text": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail + b"\n"


def _parquet(path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


def test_a_line_at_the_limit_is_read_and_one_byte_more_is_refused_naming_the_line(tmp_path):
    ok = tmp_path / "ok.jsonl"
    ok.write_bytes(ROW + _line(64 * KIB) + ROW)
    assert collect_snapshot([ok], "collect.max_record_bytes=65536").rows == 3
    # the long line sits inside one 1 MiB read, between short ones, and then across reads
    for name, body in (("inside.jsonl", ROW * 2 + _line(64 * KIB + 1) + ROW), ("across.jsonl", ROW + _line(MIB))):
        (tmp_path / name).write_bytes(body)
        line = body.count(b"\n", 0, body.index(b'"x')) + 1
        message = f"{name}: line {line} is longer than collect.max_record_bytes (65536 bytes)"
        assert message in _fails(tmp_path / name, "collect.max_record_bytes=65536")


def test_long_csv_records_are_refused_on_one_line_and_across_quoted_lines(tmp_path):
    (tmp_path / "line.csv").write_bytes(b"text,label\nhi,a\n" + b"y" * MIB + b",a\n")
    assert "line.csv: line 3 is longer than collect.max_record_bytes" in _fails(
        tmp_path / "line.csv", "collect.max_record_bytes=65536"
    )
    quoted = b'"' + b"short line\n" * 10_000 + b'",a\n'  # 110 KB in lines of 11 bytes
    (tmp_path / "quoted.csv").write_bytes(b"text,label\nhi,a\n" + quoted)
    assert "quoted.csv: row 2 is longer than collect.max_record_bytes (65536 bytes)" in _fails(
        tmp_path / "quoted.csv", "collect.max_record_bytes=65536"
    )


def test_a_long_parquet_row_is_refused_before_it_becomes_python(tmp_path):
    source = _parquet(tmp_path / "big.parquet", {"text": ["hi", "z" * 40_000, "ok"], "label": ["a", "b", "c"]})
    assert collect_snapshot([source], "collect.max_record_bytes=40002").rows == 3  # 40,000 + 1 label byte
    assert "big.parquet: row 2 is longer than collect.max_record_bytes (40000 bytes)" in _fails(
        source, "collect.max_record_bytes=40000"
    )
    chat = [[{"role": "user", "content": "q" * 30_000}, {"role": "assistant", "content": "r" * 30_000}]]
    source = _parquet(tmp_path / "chat.parquet", {"messages": [[{"role": "user", "content": "hi"}], *chat]})
    message = "chat.parquet: row 2 is longer than collect.max_record_bytes (50000 bytes)"  # lists of structs too
    assert message in _fails(source, "task=causal-lm", "collect.max_record_bytes=50000")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ["collect.max_decompressed_bytes=2097152", "collect.max_compression_ratio=1e9"],
            "bomb.jsonl.gz: decompresses to more than 2097152 bytes (collect.max_decompressed_bytes); "
            "refused after reading",
        ),
        ([], "bomb.jsonl.gz: decompresses to more than 200 times its size (collect.max_compression_ratio)"),
    ],
)
def test_a_gzip_bomb_is_refused_naming_the_file_and_the_bytes_read(tmp_path, settings, message):
    blank = b" " * 60_000 + b"\n"  # valid JSONL (blank lines), cheap to read: what is checked is the gzip
    (tmp_path / "bomb.jsonl.gz").write_bytes(gzip.compress(ROW + blank * 350, 9))  # 21 MB in ~20 KB
    assert message in _fails(tmp_path / "bomb.jsonl.gz", *settings)


def test_ordinary_gzip_is_not_taken_for_a_bomb(tmp_path):
    noise = os.urandom(5 * MIB).hex()  # compresses about 2x, like text
    rows = "".join(json.dumps({"text": noise[i : i + 500], "label": "a"}) + "\n" for i in range(0, len(noise), 500))
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(rows.encode(), 1))  # 10.6 MB: past 8 MiB, judged
    assert collect_snapshot([tmp_path / "rows.jsonl.gz"], "collect.max_compression_ratio=3").rows == rows.count("\n")


# One process meets every input, under a file-size limit equal to collect.max_decompressed_bytes
# (the parquet.gz's scratch copy may not pass it), and reports its own peak RSS.
PROBE = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pipeline import cli
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    codes = []
    for i, source in enumerate(sys.argv[2:]):
        codes.append(cli.main(["collect", "--set", f"collect.sources={json.dumps([source])}",
                               "--set", f"run_id=probe{i}", "--set", "collect.max_record_bytes=65536",
                               "--set", f"collect.max_decompressed_bytes={sys.argv[1]}"]))
    # VmHWM, this process's own peak: ru_maxrss keeps the forking parent's (pytest's, torch and all) across exec
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"codes": codes, "rss_mb": peak_kb / 1024}))
    """
)


def test_bombs_sparse_files_and_huge_lines_cost_neither_memory_nor_scratch(tmp_path, finetune_home):
    sparse = tmp_path / "sparse.jsonl"
    with sparse.open("wb") as out:
        out.truncate(512 * MIB)  # one 512 MiB line of NUL bytes, costing no disk
    (tmp_path / "zeros.jsonl.gz").write_bytes(gzip.compress(bytes(64 * MIB), 9))  # one line, 64 KB packed
    (tmp_path / "bomb.parquet.gz").write_bytes(gzip.compress(bytes(64 * MIB), 9))
    (tmp_path / "line.csv").write_bytes(b"text,label\n" + b"y" * (64 * MIB))
    sources = [sparse, tmp_path / "zeros.jsonl.gz", tmp_path / "bomb.parquet.gz", tmp_path / "line.csv"]
    done = subprocess.run(
        [PYTHON, "-c", PROBE, str(2 * MIB), *map(str, sources)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["codes"] == [2, 2, 2, 2], done.stderr
    errors = [
        storage.read_json(load_config(None, [f"run_id=probe{i}"]).step_uri("collect") + "/error.json")["error"]
        for i in range(4)
    ]
    assert "sparse.jsonl: line 1 is longer than collect.max_record_bytes (65536 bytes)" in errors[0]
    assert "zeros.jsonl.gz: line 1 is longer than collect.max_record_bytes" in errors[1]
    assert "bomb.parquet.gz: decompresses to more than 2097152 bytes" in errors[2]  # not 'File too large'
    assert "line.csv: line 2 is longer than collect.max_record_bytes" in errors[3]
    assert report["rss_mb"] < 500, report
    assert not (finetune_home / "artifacts" / "snapshots").exists()
