"""bench/report.py: BENCHMARKS.md's tables are regenerated from bench/results/*.json, in place,
and --check tells a stale page."""

import importlib.util
import json

from tests.helpers import ROOT


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spread(value):
    return {"median": value, "min": value * 0.9, "max": value * 1.1, "n": 5}


def test_tables_come_from_the_result_files_and_a_stale_page_is_caught(tmp_path, monkeypatch):
    report = _report_module()
    results, page = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    results.mkdir()
    page.write_text("# Benchmarks\n\nintro\n")
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report, "PAGE", page)
    machine = {"cpus": 2, "memory_gib": 23.5, "gpus": [], "torch": "2.13.0"}
    variant = {"samples_per_s": _spread(20.0), "peak_rss_bytes": _spread(2**30), "wall_s": _spread(60.0)}
    result = {
        "command": "python bench/training_tax.py",
        "commit": "abc1234",
        "date": "today",
        "machine": machine,
        "setup": {
            "model": "MiniLM",
            "zero_stage": 2,
            "processes": 2,
            "micro_batch": 16,
            "seq_len": 64,
            "steps": 30,
            "warmup_steps": 10,
            "repeats": 5,
        },
        "variants": {"a": variant, "b": variant, "c": variant},
        "ratios": {"a/b": _spread(0.95), "a/c": _spread(0.93), "a_wall_minus_training_s": _spread(30.0)},
    }
    (results / "training_tax.json").write_text(json.dumps(result))
    assert report.main(["--check"]) == 1  # the page lacks the table
    assert report.main([]) == 0
    text = page.read_text()
    assert "| a/b samples/s | 0.950 (0.855-1.045) | >= 0.97 | **missed** |" in text
    assert "| a/c samples/s | 0.930 (0.837-1.023) | >= 0.90 | met |" in text
    assert "1,024 (922-1,126)" in text and "at abc1234" in text
    assert report.main(["--check"]) == 0 and report.main([]) == 0 and page.read_text() == text  # in place, once
    result["ratios"]["a/b"] = _spread(0.99)
    (results / "training_tax.json").write_text(json.dumps(result))
    assert report.main(["--check"]) == 1
    report.main([])
    assert page.read_text().count("<!-- bench:training_tax -->") == 1 and "0.990 (0.891-1.089)" in page.read_text()


def _orchestration_result():
    task = {key: _spread(1.0) for key in ("task_s", "step_s", "overhead_s")}
    return {
        "command": "python bench/orchestration.py --repeats 3",
        "commit": "abc1234",
        "date": "today",
        "machine": {"cpus": 2, "memory_gib": 23.5, "gpus": [], "torch": "2.13.0"},
        "setup": {"epochs": 1, "via": "finetune run (airflow dags test)", "repeats": 3},
        "dag_run": {"wall_s": _spread(300.0), "outside_tasks_s": _spread(40.0), "tasks": {"collect": task}},
        "finetune_help_s": _spread(0.5),
    }


def test_each_part_of_the_orchestration_result_keeps_its_own_provenance(tmp_path, monkeypatch):
    """`--only parse` and `--path scheduler` replace their part of orchestration.json and leave the
    rest as measured; the page names each part's own command and commit."""
    import sys

    monkeypatch.syspath_prepend(str(ROOT))
    from bench import harness

    report = _report_module()
    out = tmp_path / "orchestration.json"
    out.write_text(json.dumps({"name": "orchestration", **_orchestration_result(), "dag_parse_s": {}}))
    monkeypatch.setattr(harness, "machine", lambda: {"cpus": 2})
    monkeypatch.setattr(harness, "commit", lambda: "def5678")
    monkeypatch.setattr(sys, "argv", ["bench/orchestration.py", "--only", "parse"])
    files = {name: {"warm": _spread(0.08), "cold": _spread(0.2)} for name in ("collect.py", "finetune.py")}
    parse = {
        "repeats": 5,
        "files": files,
        "baseline": {
            "commit": "1111111",
            "files": {name: {"warm": _spread(0.1), "cold": _spread(0.2)} for name in files},
        },
    }
    harness.update_result("orchestration", {"dag_parse": parse}, out, drop=["dag_parse_s"])
    monkeypatch.setattr(sys, "argv", ["bench/orchestration.py", "--path", "scheduler"])
    wait = {key: _spread(1.5) for key in ("wait_s", "task_s", "step_s", "overhead_s")}
    scheduler = {
        "setup": {"via": "make up", "epochs": 1, "repeats": 1},
        "up_s": _spread(60.0),
        "wall_s": _spread(300.0),
        "outside_steps_s": _spread(20.0),
        "tasks": {"collect": wait},
    }
    harness.update_result("orchestration", {"scheduler": scheduler}, out)

    result = json.loads(out.read_text())
    assert "dag_parse_s" not in result and result["commit"] == "abc1234"  # the `finetune run` part as measured
    assert result["dag_parse"]["command"].endswith("--only parse") and result["dag_parse"]["commit"] == "def5678"
    assert result["scheduler"]["command"].endswith("--path scheduler")
    text = report.orchestration(result)
    assert "`collect.py` 80 (72-88) ms, `finetune.py` 80 (72-88) ms with bytecode cached (target < 500 ms: met)" in text
    assert "`collect.py` 100 -> 80 ms" in text and "(1111111 -> def5678)" in text
    assert "| `collect` | 1.50 (1.35-1.65) | 1.5 (1.4-1.7) | 1.5 (1.4-1.7) | 1.50 (1.35-1.65) | met |" in text
    assert "`python bench/orchestration.py --path scheduler` at def5678" in text


def test_the_suite_report_sums_each_module_and_names_the_slowest_tests(tmp_path, monkeypatch):
    """bench/suite.py over a JUnit report as pytest writes it: seconds per module, outcomes, the
    slowest tests, and the verdict on the 12-minute target from the whole command's wall time."""

    monkeypatch.syspath_prepend(str(ROOT))
    from bench import harness, suite

    junit = tmp_path / "report.xml"
    junit.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.pipeline.test_train" name="test_a" time="100.5"/>
<testcase classname="tests.pipeline.test_train" name="test_b" time="20.0"><failure message="boom"/></testcase>
<testcase classname="tests.test_ui" name="test_c" time="60.0"/>
<testcase classname="tests.test_ui" name="test_d" time="0.0"><skipped message="no chromium"/></testcase>
</testsuite></testsuites>""")
    monkeypatch.setattr(harness, "machine", lambda: {"cpus": 2, "memory_gib": 23.5, "gpus": [], "torch": "2.13.0"})
    monkeypatch.setattr(harness, "commit", lambda: "abc1234")
    out = tmp_path / "suite.json"
    suite.main(
        ["--junit", str(junit), "--tests-s", "190", "--wall-s", "400", "--how", "a clean clone", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    assert result["outcomes"] == {"passed": 2, "failed": 1, "error": 0, "skipped": 1}
    assert result["modules"][0] == {"module": "tests.pipeline.test_train", "tests": 2, "seconds": 120.5}
    assert [t["test"] for t in result["slowest"]][:2] == ["tests.pipeline.test_train::test_a", "tests.test_ui::test_c"]
    text = _report_module().suite(result)
    assert (
        "2 passed, 1 failed, 0 errors, 1 skipped" in text and "the whole command 6.7 min (target 12 min: met)" in text
    )
    assert "| `tests.pipeline.test_train` | 2 | 120 | 67% |" in text
    result["setup"]["wall_s"] = 1500
    assert "(target 12 min: **missed**)" in _report_module().suite(result)


def test_the_collect_ratio_and_its_verdicts_come_from_collect_json():
    report = _report_module()
    side = {
        "seconds": _spread(3.0),
        "mib_per_s": _spread(32.0),
        "ratio": _spread(0.3),
        "peak_rss_mib": _spread(300.0),
        "rows_eval": [200385],
    }
    result = {
        "command": "python bench/collect.py --base HEAD~1",
        "commit": "abc1234",
        "date": "today",
        "machine": {"cpus": 2, "memory_gib": 23.5, "gpus": [], "torch": "2.13.0"},
        "setup": {"s3": "moto server", "rows": 1000000, "source_mib": 96.0, "repeats": 5, "base_commit": "def5678"},
        "plain_boto3_mib_per_s": _spread(96.0),
        "base": {**side, "seconds": _spread(12.0), "ratio": _spread(0.08), "peak_rss_mib": _spread(100.0)},
        "new": side,
    }
    text = report.collect(result)
    assert "| collect after (abc1234) | 3.00 (2.70-3.30) | 32.0 (28.8-35.2) | **0.300** (0.270-0.330) |" in text
    assert "| collect before (def5678) |" in text and "After is 4.0x before" in text
    assert "peak RSS 3.00x (target within 2x: **missed**)" in text and "0.5x the download: **missed**" in text
    assert "the same split" in text
    result["new"] = {**side, "ratio": _spread(0.6), "rows_eval": [199000]}
    text = report.collect(result)
    assert "0.5x the download: met" in text and "the split moved" in text
