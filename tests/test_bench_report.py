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
    result = {"command": "python bench/training_tax.py", "commit": "abc1234", "date": "today", "machine": machine,
              "setup": {"model": "MiniLM", "zero_stage": 2, "processes": 2, "micro_batch": 16, "seq_len": 64,
                        "steps": 30, "warmup_steps": 10, "repeats": 5},
              "variants": {"a": variant, "b": variant, "c": variant},
              "ratios": {"a/b": _spread(0.95), "a/c": _spread(0.93), "a_wall_minus_training_s": _spread(30.0)}}
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
