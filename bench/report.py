"""Regenerate the tables of BENCHMARKS.md from bench/results/<name>.json: each result owns the text
between ``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->`` (appended when missing), so the
page and the figures cannot drift apart. `make bench` runs it last.

    .venv/bin/python bench/report.py [--check]     # --check: exit 1 if BENCHMARKS.md is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "BENCHMARKS.md"


def _m(figure: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    """'median (min-max)' of a spread."""
    return (
        f"{figure['median'] * scale:,.{digits}f} ({figure['min'] * scale:,.{digits}f}-"
        f"{figure['max'] * scale:,.{digits}f})"
    )


def _verdict(value: float, target: float, above: bool = True) -> str:
    met = value >= target if above else value <= target
    return "met" if met else "**missed**"


def _provenance(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (
        f"`{result['command']}` at {result['commit']}, {result['date']}; {m['cpus']} CPUs, "
        f"{m['memory_gib']} GiB, {', '.join(m['gpus']) or 'no GPU'}, torch {m['torch']}."
    )


def training_tax(r: dict[str, Any]) -> str:
    s, v, ratios = r["setup"], r["variants"], r["ratios"]
    names = {
        "a": "(a) the pipeline's `train` step (local launcher)",
        "b": "(b) HF `Trainer` + the same DeepSpeed JSON",
        "c": "(c) raw `deepspeed.initialize` loop",
    }
    rows = "\n".join(
        f"| {names[k]} | {_m(f['samples_per_s'])} | {_m(f['peak_rss_bytes'], 2**-20, 0)} | {_m(f['wall_s'])} |"
        for k, f in v.items()
    )
    ab, ac = ratios["a/b"]["median"], ratios["a/c"]["median"]
    return f"""{s["model"]}, ZeRO-{s["zero_stage"]}, {s["processes"]} processes (gloo, CPU), micro-batch \
{s["micro_batch"]}, {s["seq_len"]} tokens, {s["steps"]} steps with the first {s["warmup_steps"]} left out of \
samples/s; median (min-max) of {s["repeats"]} interleaved repetitions. {_provenance(r)}

| variant | samples/s | peak RSS rank 0 (MiB) | process wall (s) |
|---|---:|---:|---:|
{rows}

| ratio (paired per repetition) | median (min-max) | target | |
|---|---:|---:|---|
| a/b samples/s | {_m(ratios["a/b"], digits=3)} | >= 0.97 | {_verdict(ab, 0.97)} |
| a/c samples/s | {_m(ratios["a/c"], digits=3)} | >= 0.90 | {_verdict(ac, 0.90)} |
| (a) whole step minus its training loop | {_m(ratios["a_wall_minus_training_s"])} s | | |
"""


def _stamp(section: dict[str, Any]) -> str:
    """The provenance of a part of a result measured on its own (its command, commit and date)."""
    return f"`{section['command']}` at {section['commit']}, {section['date']}"


def _dag_parse(p: dict[str, Any]) -> str:
    files = p["files"]
    worst = max(f["warm"]["median"] for f in files.values())
    warm = ", ".join(f"`{name}` {_m(f['warm'], 1000, 0)} ms" for name, f in files.items())
    cold = ", ".join(f"`{name}` {_m(f['cold'], 1000, 0)} ms" for name, f in files.items())
    text = (
        f"DAG parse, each file in a process of its own with Airflow imported and frozen first, as the DAG "
        f"processor forks its parsers: {warm} with bytecode cached (target < 500 ms: "
        f"{_verdict(worst, 0.5, above=False)}); the first parse of fresh sources, compiling them: {cold}."
    )
    if "baseline" in p:
        before = p["baseline"]["files"]
        pairs = ", ".join(
            f"`{name}` {before[name]['warm']['median'] * 1000:,.0f} -> {f['warm']['median'] * 1000:,.0f} ms"
            for name, f in files.items()
            if name in before
        )
        text += f" Before and after, interleaved in the same run (bytecode cached): {pairs} ({p['baseline']['commit']} -> {p.get('sources', p['commit'])})."
    sources = f" (the sources of {p['sources']})" if "sources" in p else ""
    return text + f" Median (min-max) of {p['repeats']} repetitions{sources}; {_stamp(p)}.\n"


def _scheduler(s: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| `{name}` | {_m(t['wait_s'], digits=2)} | {_m(t['task_s'])} | {_m(t['step_s'])} | "
        f"{_m(t['overhead_s'], digits=2)} | {_verdict(t['overhead_s']['median'], 2.0, above=False)} |"
        for name, t in s["tasks"].items()
    )
    setup = s["setup"]
    return f"""Through the scheduler: {setup["via"]}, {setup["epochs"]} epoch, {setup["repeats"]} run(s); median \
(min-max). {_stamp(s)}.

| task | wait before it (s) | in Airflow (s) | the step's own process (s) | overhead: wait + Airflow - step (s) | target <= 2 s |
|---|---:|---:|---:|---:|---|
{rows}

The whole run (queued to done): {_m(s["wall_s"])} s, of which {_m(s["outside_steps_s"])} s outside the steps' own \
processes. Starting the services (`make up`, until every component is healthy) took {_m(s["up_s"])} s, once, \
before the run.
"""


def orchestration(r: dict[str, Any]) -> str:
    d = r["dag_run"]
    rows = "\n".join(
        f"| `{name}` | {_m(t['task_s'])} | {_m(t['step_s'])} | {_m(t['overhead_s'], digits=2)} | "
        f"{_verdict(t['overhead_s']['median'], 2.0, above=False)} |"
        for name, t in d["tasks"].items()
    )
    text = f"""The `finetune` DAG, {r["setup"]["epochs"]} epoch on the shipped data, through \
{r["setup"]["via"]}, {r["setup"]["repeats"]} runs; median (min-max). {_provenance(r)}

| task | in Airflow (s) | the step's own process (s) | overhead (s) | target <= 2 s |
|---|---:|---:|---:|---|
{rows}

The whole run: {_m(d["wall_s"])} s, of which {_m(d["outside_tasks_s"])} s outside the tasks (`airflow dags \
test` start-up, its DB, scheduling between tasks). `finetune --help`: {_m(r["finetune_help_s"], 1000, 0)} ms \
(target < 1 s: {_verdict(r["finetune_help_s"]["median"], 1.0, above=False)}).
"""
    if "dag_parse" in r:
        text += "\n" + _dag_parse(r["dag_parse"])
    if "scheduler" in r:
        text += "\n" + _scheduler(r["scheduler"])
    return text


def data_throughput(r: dict[str, Any]) -> str:
    s, c, t = r["setup"], r["collect"], r["tokenize"]
    return f"""{s["source_mib"]} MiB of JSONL in {s["objects"]} objects on {s["s3"]}; {s["token_rows"]:,} texts \
tokenized; median (min-max) of {s["repeats"]} interleaved repetitions. {_provenance(r)}

| | pipeline | plain | ratio | target | |
|---|---:|---:|---:|---:|---|
| collect from S3 (MiB/s) vs boto3 download | {_m(c["pipeline_mib_per_s"])} | {_m(c["plain_boto3_mib_per_s"])} | \
{_m(c["ratio"], digits=3)} | >= 0.8 | {_verdict(c["ratio"]["median"], 0.8)} |
| train's tokenization (rows/s) vs one batched call | {_m(t["pipeline_rows_per_s"], digits=0)} | \
{_m(t["one_batched_call_rows_per_s"], digits=0)} | {_m(t["ratio"], digits=3)} | >= 0.9 | \
{_verdict(t["ratio"]["median"], 0.9)} |
"""


def suite(r: dict[str, Any]) -> str:
    s, o = r["setup"], r["outcomes"]
    rows = "\n".join(
        f"| `{m['module']}` | {m['tests']} | {m['seconds']:,.0f} | {100 * m['seconds'] / r['seconds_in_tests']:.0f}% |"
        for m in r["modules"][:12]
    )
    rest = r["modules"][12:]
    slowest = "\n".join(f"| `{t['test']}` | {t['seconds']:,.0f} |" for t in r["slowest"])
    return f"""One whole `make test`: {s["how"]}. {o["passed"]} passed, {o["failed"]} failed, {o["error"]} errors, \
{o["skipped"]} skipped; pytest {s["tests_s"] / 60:.1f} min, the whole command {s["wall_s"] / 60:.1f} min \
(target {s["target_wall_s"] / 60:.0f} min: {_verdict(s["wall_s"], s["target_wall_s"], above=False)}). \
Report of {_provenance(r)}

| module | tests | s | share |
|---|---:|---:|---:|
{rows}
| {len(rest)} other modules | {sum(m["tests"] for m in rest)} | {sum(m["seconds"] for m in rest):,.0f} | \
{100 * sum(m["seconds"] for m in rest) / r["seconds_in_tests"]:.0f}% |

| slowest tests (setup + call + teardown) | s |
|---|---:|
{slowest}
"""


def serving(r: dict[str, Any]) -> str:
    s, res, ratios = r["setup"], r["results"], r["ratios"]
    names = {
        "served_single": "scoring server, 1 utterance a request",
        "in_process_single": "pyfunc in-process, 1 utterance (the floor)",
        "served_batch_32": "scoring server, 32 utterances a request",
        "in_process_batch_32": "pyfunc in-process, 32 utterances (the floor)",
    }
    rows = "\n".join(
        f"| {names[k]} | {f['p50_ms']:,.1f} | {f['p99_ms']:,.1f} | {f['requests_per_s']:,.1f} | {f['rows_per_s']:,.1f} |"
        for k, f in res.items()
    )
    return f"""{s["model"]}; {s["server"]}, started in {s["start_s"]} s; {s["requests"]} single requests and \
{s["batches"]} of 32, one at a time, after 5 warm-up calls. Served over in-process p50: \
{ratios["single_p50_served_over_in_process"]}x single, {ratios["batch_p50_served_over_in_process"]}x batched\
{"; " + s["load"] if s.get("load") else ""}. {_provenance(r)}

| path | p50 (ms) | p99 (ms) | requests/s | utterances/s |
|---|---:|---:|---:|---:|
{rows}
"""


def demo(r: dict[str, Any]) -> str:
    floors = r["floors"]
    slices = list(floors)
    rows = []
    for number, run in enumerate(r["runs"], 1):
        steps = run["steps_s"]
        saves = run["checkpoints"]
        rows.append(
            f"| {number} | {run['wall_s'] / 60:.1f} | {run['install_s']:.0f}"
            f"{' (ops built)' if run['built_deepspeed_ops'] else ''} | "
            + " | ".join(
                f"{steps.get(step, 0):.0f}" for step in ("collect", "validate", "train", "evaluate", "register")
            )
            + f" | {len(saves)}: {sum(c['mib'] for c in saves):,.0f} MiB, "
            f"{sum(c['s'] or 0 for c in saves):.0f} s | "
            + " | ".join(f"{run['accuracy'].get(name, float('nan')):.3f}" for name in slices)
            + " |"
        )
    return f"""`make demo` in a fresh clone (install included) against {r["target_s"] / 60:.0f} minutes: median {r["wall_s"]["median"] / 60:.1f} min ({_verdict(r["wall_s"]["median"], r["target_s"], above=False)}). Accuracy floors {", ".join(f"{name} >= {floor}" for name, floor in floors.items())}: {"met" if all(run["floors_met"] for run in r["runs"]) else "**missed**"} in every run. Checkpoints: how many train saved, their size, and the seconds from their step's log line to the marker (the last step's line comes \
after its save: not counted). {_provenance(r)}

| run | min | install s | collect s | validate s | train s | evaluate s | register s | checkpoints | {" | ".join(slices)} |
|---|---:|---:|---:|---:|---:|---:|---:|---|{"---:|" * len(slices)}
{chr(10).join(rows)}
"""


def collect(r: dict[str, Any]) -> str:
    s, plain = r["setup"], r["plain_boto3_mib_per_s"]
    mib = s["source_mib"]
    seconds = {k: mib / plain[k] for k in ("median", "max", "min")}  # the fastest download has the most MiB/s
    base = s.get("base_commit") or s.get("base")
    rows = [
        f"| plain boto3 download | {seconds['median']:.2f} ({seconds['max']:.2f}-{seconds['min']:.2f}) | {_m(plain)} | 1 | |"
    ]
    for name, label in (("base", f"collect before ({base})"), ("new", f"collect after ({r['commit']})")):
        if name in r:
            f = r[name]
            ratio = _m(f["ratio"], digits=3)
            if name == "new":  # the figure the target is on, in bold: "**median** (min-max)"
                median, spread = ratio.split(" ", 1)
                ratio = f"**{median}** {spread}"
            rows.append(
                f"| {label} | {_m(f['seconds'], digits=2)} | {_m(f['mib_per_s'])} | {ratio} | "
                f"{_m(f['peak_rss_mib'], digits=0)} MiB |"
            )
    new = r["new"]
    verdicts = f"target >= 0.5x the download: {_verdict(new['ratio']['median'], 0.5)}"
    if "base" in r:
        old = r["base"]
        rss = new["peak_rss_mib"]["median"] / old["peak_rss_mib"]["median"]
        same_split = old["rows_eval"] == new["rows_eval"]
        verdicts = (
            f"After is {old['seconds']['median'] / new['seconds']['median']:.1f}x before (by median seconds), "
            f"peak RSS {rss:.2f}x (target within 2x: {_verdict(rss, 2.0, above=False)}); {verdicts}. "
            f"Rows in eval: {', '.join(f'{n:,}' for n in new['rows_eval'])} after, {', '.join(f'{n:,}' for n in old['rows_eval'])} "
            f"before ({'the same split' if same_split else 'the split moved'})"
        )
    return f"""One JSONL object of {s["rows"]:,} rows ({mib} MiB) on a {s["s3"]}; each of {s["repeats"]} repetitions \
downloads it with boto3's `download_file`, then runs `collect.run` on it in a child process{" with the pipeline package of " + str(base) + " and of this checkout, interleaved" if "base" in r else ""}. \
Median (min-max) of {s["repeats"]}; the ratio is the download's seconds over collect's in the same repetition. \
{verdicts}. {_provenance(r)}

| | seconds | MiB/s | ratio to the download | peak RSS |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}
"""


RENDERERS = {
    "training_tax": ("Training tax: the pipeline vs HF Trainer vs raw DeepSpeed", training_tax),
    "orchestration": ("Orchestration overhead: what Airflow adds per task", orchestration),
    "data_throughput": ("Data: collect from S3 and tokenization vs the plain calls", data_throughput),
    "suite": ("Test suite: where make test's time goes", suite),
    "serving": ("Serving: the champion behind MLflow's scoring server vs in-process", serving),
    "demo": ("The demo: make demo from a fresh clone", demo),
    "collect": ("collect from S3 against a plain download", collect),
}


def render(page: str) -> str:
    for name, (title, renderer) in RENDERERS.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        body = renderer(json.loads(path.read_text()))
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        block = f"{start}\n{body}{end}"
        if start in page and end in page:
            page = page[: page.index(start)] + block + page[page.index(end) + len(end) :]
        else:
            page = page.rstrip("\n") + f"\n\n## {title} (`bench/results/{name}.json`)\n\n{block}\n"
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if BENCHMARKS.md differs from the results")
    args = parser.parse_args(argv)
    page = PAGE.read_text()
    new = render(page)
    if args.check:
        if new != page:
            print("BENCHMARKS.md is stale: run .venv/bin/python bench/report.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
