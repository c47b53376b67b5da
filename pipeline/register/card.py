"""register's model card: the version's description in Markdown -- intended use, data, metrics
beside the champion's (per language and on the challenge set), a causal LM's first sample
answers, training, limitations, and the run's pictures linked to where the MLflow UI serves them.
Text only: ``register`` draws and logs the pictures and writes the card onto the version.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import tracking
from pipeline.config import PipelineConfig, is_challenge

SAMPLE_ROWS, SAMPLE_CHARS = 5, 120  # a causal LM's sample answers in the model card: rows, characters a cell


def _cell(text: Any, limit: int = SAMPLE_CHARS) -> str:
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def samples_table(samples: list[dict[str, Any]], rows: int = SAMPLE_ROWS) -> str:
    """The first generated answers of a causal LM beside their references, as a Markdown table."""
    if not samples:
        return ""
    lines = [
        f"\n### Sample answers (the first {min(rows, len(samples))} of {len(samples)}; all in `evaluate/samples.json`)",
        "| prompt | reference | fine-tuned answer | ROUGE-L |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {_cell(s.get('prompt', ''))} | {_cell(s.get('reference', ''))} | {_cell(s.get('output', ''))} | "
        f"{float(s.get('rouge_l', 0.0)):.2f} |"
        for s in samples[:rows]
    ]
    return "\n".join(lines) + "\n"


def pictures_section(pictures: dict[str, str], run_id: str) -> str:
    """Each picture with what it shows, its artifact path linked to where the MLflow UI serves it,
    and the picture itself."""
    if not pictures:
        return ""
    parts = [
        "## Pictures",
        f"Artifacts of MLflow run `{run_id}`: open one from the run's Artifacts tab, or download it with "
        f'`mlflow.artifacts.download_artifacts("runs:/{run_id}/<path>")`.',
        "",
    ]
    for path, caption in pictures.items():
        url = tracking.artifact_url(run_id, path)
        parts += [f"**{caption}** ([`{path}`]({url}))", "", f"![{path}]({url})", ""]
    return "\n".join(parts)


def _metric_rows(metrics: dict[str, Any], champion: dict[str, Any]) -> str:
    """The model card's metrics table rows: each metric beside the champion's, ``-`` where it has none."""
    return "\n".join(
        f"| {name} | {value:.4f} | {champion[name]:.4f} |" if name in champion else f"| {name} | {value:.4f} | - |"
        for name, value in metrics.items()
    )


def _base_line(base: dict[str, Any]) -> str:
    """A causal LM's base model on the same held-out tokens, as a line below the metrics table."""
    return (
        ("\nBase model on the same held-out tokens: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()) + "\n")
        if base
        else ""
    )


def _slice_tables(evaluated: dict[str, Any]) -> str:
    """The gate metric per language of the eval rows and, in a table of its own, on the challenge
    set, each beside the champion's; empty when evaluate measured no slices."""
    slices = evaluated.get("slices") or {}
    champion_slices = evaluated.get("champion_slices") or {}
    gate = evaluated.get("gate_metric", "")

    def slice_rows(challenge: bool) -> str:
        return "\n".join(
            f"| {name} | {int(values['rows'])} | {values[gate]:.4f} | "
            + (f"{champion_slices[name][gate]:.4f} |" if gate in champion_slices.get(name, {}) else "- |")
            for name, values in sorted(slices.items())
            if gate in values and is_challenge(name) == challenge
        )

    eval_rows, challenge_rows = slice_rows(False), slice_rows(True)
    slice_table = (
        (
            f"\n### By language of the eval rows ({gate})\n| language | rows | this model | champion |\n"
            f"|---|---|---|---|\n{eval_rows}\n"
        )
        if eval_rows
        else ""
    )
    if challenge_rows:  # a different question from the eval split's: say so beside the numbers
        slice_table += (
            f"\n### Challenge set ({gate}): hand-written messages never trained on, reported beside the "
            f"eval split and gated only by a threshold that names them\n"
            f"| slice | rows | this model | champion |\n|---|---|---|---|\n{challenge_rows}\n"
        )
    return slice_table


def _use_and_limits(cfg: PipelineConfig, collected: dict[str, Any]) -> tuple[str, str]:
    """The model card's intended use and the start of its limitations, by task."""
    limits = (
        "Trained on a small, synthetic or team-curated set of intents: messages outside them are "
        "forced into the nearest known intent."
    )
    if cfg.task == "preference":
        limits = (
            "Learns the tone and patterns of its conversations, not facts, and prefers what its pairs "
            "preferred: the shipped pairs are synthetic (the reference answer over another intent's or a "
            "truncated one), so its preferences are those, not a person's."
        )
        use = f"""A chat model preference-tuned (DPO, beta {cfg.train.dpo_beta}) on chosen/rejected answer pairs
against `{cfg.train.reference_model or cfg.base_model}`; `mlflow.pyfunc` takes OpenAI-style `messages`.
Drafts replies for a person to check."""
    elif cfg.task == "causal-lm":
        limits = (
            "Learns the tone and patterns of its conversations, not facts: answers about a customer's order, "
            "account or refund are plausible text, not looked up."
        )
        use = """Answers customer-support conversations in the style of its instruction data, as a chat
model (`mlflow.pyfunc` takes OpenAI-style `messages`). Drafts replies for a person to check."""
    else:
        use = f"""Classifies short customer-support messages (English and Chinese) into the intents seen in
training: {", ".join(collected.get("labels", []))}. Route or
pre-fill support tickets; keep a person in the loop for refunds and account actions."""
    return use, limits


def model_card(
    cfg: PipelineConfig,
    inputs: dict[str, dict[str, Any]],
    pictures: dict[str, str] | None = None,
    pictures_run_id: str = "",
    samples: list[dict[str, Any]] | None = None,
) -> str:
    """The version's description: use, data, metrics beside the champion's, training, limitations;
    ``pictures`` (MLflow artifact path on ``pictures_run_id`` -> caption) and a causal LM's first
    sample answers when given."""
    trained, evaluated, collected = inputs["train"], inputs["evaluate"], inputs["collect"]
    champion = evaluated.get("champion_metrics") or {}
    rows = _metric_rows(evaluated["metrics"], champion)
    settings = {k: v for k, v in vars(cfg.train).items() if k != "snapshot_uri"}
    base_line = _base_line(evaluated.get("base_metrics") or {})
    slice_table = _slice_tables(evaluated)
    use, limits = _use_and_limits(cfg, collected)
    return f"""# {cfg.model_name}: {cfg.task}

## Intended use
{use}

## Data
- Snapshot: `{trained["snapshot_uri"]}` (sha256 `{collected.get("sha256", "unknown")}`)
- Rows: {collected.get("rows", "?")} ({collected.get("rows_train", "?")} train / {collected.get("rows_eval", "?")} eval, split by text hash)

## Metrics (eval split){f" vs champion version {evaluated['champion_version']}" if champion else ""}
| metric | this model | champion |
|---|---|---|
{rows}
{base_line}{slice_table}{samples_table(samples or [])}
Gate: {evaluated["reason"]}

## Training
- Base model: `{cfg.base_model}`; seed {cfg.seed}; pipeline run `{cfg.run_id}`
- Settings: `{json.dumps(settings, sort_keys=True)}`
- Global steps: {trained.get("global_step")}; processes: {trained.get("world_size")}

## Limitations
{limits} Scores are measured on a held-out split of the same snapshot, not on live traffic;
re-check after the data changes.
""" + (f"\n{pictures_section(pictures, pictures_run_id)}" if pictures else "")
