"""bench/gpu.sh, the GPU benchmark, tested where CI runs: on CPU, its Python part trains a tiny
model of the same shape through the pipeline's train step and reports every figure; the shell
script refuses a machine without a GPU with a message that says what to run instead."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_the_gpu_benchmark_runs_the_train_step_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_train.py"),
            "--size",
            "tiny",
            "--precision",
            "fp32",
            "--variants",
            "zero3-lora",
            "--seq-len",
            "128",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and report["parameters"] > 0 and report["commit"] and report["command"]
    [figures] = report["variants"]
    assert figures["variant"] == "zero3-lora" and figures["global_step"] > 0
    assert figures["tokens_per_s"] > 0 and figures["train_tokens"] > 0 and figures["peak_memory_gib_rank0"] > 0
    assert 0 <= figures["mfu_vs_datasheet"] < 1 and "mfu_vs_measured_matmul" not in figures  # no GPU to measure


def test_gpu_sh_refuses_a_machine_without_a_gpu():
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no CUDA GPU is visible" in done.stderr and "--size tiny --precision fp32" in done.stderr
