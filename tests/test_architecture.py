"""The package's import layers, checked by import-linter against the contract in pyproject.toml,
and proven to bite: the same contract run over a copy of the package with one import that
breaks a layer must fail. Plus the light paths: DAG parsing and `finetune --help` import
nothing heavy, and an import inside a function is one of a heavy library, never ours."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
# Imported inside functions because each costs a noticeable share of a second or more and the
# modules that use them are imported when Airflow parses a DAG file or `finetune --help` runs.
HEAVY = {
    "torch",
    "transformers",
    "deepspeed",
    "mlflow",
    "great_expectations",
    "pandas",
    "numpy",
    "pyarrow",
    "datasets",
    "peft",
    "trl",
    "sklearn",
    "scipy",
    "matplotlib",
    "safetensors",
    "tokenizers",
    "boto3",
    "botocore",
    "urllib3",
    "huggingface_hub",
}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )


def test_the_import_contract_holds():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, line, broken",
    [
        ("validate", "from pipeline import train", "Imports go one way"),  # a step importing a step
        ("chat", "from pipeline import collect", "Imports go one way"),  # a shared part importing a step
        ("config", "from pipeline import steps", "Imports go one way"),  # the foundation importing launching
        ("storage", "import airflow.sdk", "never imports Airflow"),
    ],
)
def test_the_contract_catches_an_import_against_the_layers(tmp_path, module, line, broken):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "data"))
    target = tmp_path / "pipeline" / f"{module}.py"
    if not target.exists():  # a package: the import goes into its __init__
        target = tmp_path / "pipeline" / module / "__init__.py"
    # Inside a function, where a cycle used to hide: the contract counts those imports too.
    target.write_text(target.read_text() + f"\n\ndef _probe():\n    {line}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and broken in result.stdout.split("BROKEN")[0].splitlines()[-1]


def _function_imports() -> list[tuple[str, str]]:
    found = []
    for path in sorted(p for p in (ROOT / "pipeline").rglob("*.py") if "data" not in p.relative_to(ROOT).parts):
        tree = ast.parse(path.read_text())
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    found += [(str(path.relative_to(ROOT)), alias.name) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((str(path.relative_to(ROOT)), node.module or "."))
    return found


def test_imports_inside_functions_are_heavy_libraries_only():
    misplaced = [(name, module) for name, module in _function_imports() if module.split(".")[0] not in HEAVY]
    assert misplaced == [], "import these at the top of the module: " + json.dumps(misplaced)


@pytest.mark.parametrize(
    "code",
    [
        "import pipeline.cli",  # `finetune --help`, and every step process before it knows its step
        "import pipeline.steps, pipeline.local, pipeline.config",  # what the DAG files import at parse time
    ],
)
def test_the_light_paths_import_nothing_heavy(code):
    probe = f"import sys; {code}; print(sorted(m for m in {sorted(HEAVY)!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_finetune_help_lists_every_step_of_the_table():
    from pipeline import steps

    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True)
    for name, step in steps.STEPS.items():
        assert f"  {name:<9} {step.summary}" in out.stdout
