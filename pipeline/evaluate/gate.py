"""The promotion gate: the absolute thresholds, the per-slice regression rule and the margin over
the champion, or with no champion yet over the trivial baseline; the deployment's reference sets,
bars and no regression on each; and ``evaluate.promote``, which turns promotion off."""

from __future__ import annotations

from pipeline.config import EvaluateConfig, is_challenge, parse_threshold
from pipeline.errors import ConfigError


def decide(
    metrics: dict[str, float],
    champion: dict[str, float] | None,
    cfg: EvaluateConfig,
    task: str = "sequence-classification",
    slices: dict[str, dict[str, float]] | None = None,
    champion_slices: dict[str, dict[str, float]] | None = None,
    baseline: dict[str, float] | None = None,
    baseline_name: str = "baseline",
) -> tuple[bool, str]:
    """The promotion gate: every absolute threshold (overall or per slice), then no slice worse
    than the champion's by more than ``max_slice_regression``, then the margin over the champion.
    With no champion yet, the margin is over ``baseline``, the same metrics of a model that learnt
    nothing on the same rows (the majority class; a causal LM's base model): a first champion
    must beat it by more than ``promotion_margin``, so a tie (a fine-tune that changed nothing)
    stays challenger. No baseline to compare with: not promoted (fail closed).

    The challenge slices meet only the thresholds that name them (``accuracy[challenge:zh]>=0.85``),
    never the regression rule: the set is small (about 100 rows a language, so 0.05 is five
    messages), fixed, and deliberately unlike the training data, so a model that fits a new
    snapshot better can lose a few of its rows by chance. It is there to be read beside the eval
    split, not to veto a model on its own; a bar on it is a choice the user makes explicitly."""
    slices = slices or {}
    refused = _threshold_refusal(metrics, cfg, task, slices)
    if refused:
        return False, refused
    metric, greater_is_better = cfg.gate(task)
    ours = metrics[metric]
    better = "higher" if greater_is_better else "lower"
    if champion is None:
        floor = (baseline or {}).get(metric)
        if floor is None:
            return False, f"no champion yet; {metric}={ours:.4f} and no {baseline_name} {metric} to beat"
        gain = ours - floor if greater_is_better else floor - ours
        beats = "beats" if gain > cfg.promotion_margin else "does not beat"
        return gain > cfg.promotion_margin, (
            f"no champion yet; {metric}={ours:.4f} {beats} the {baseline_name} {floor:.4f} by more than "
            f"promotion_margin {cfg.promotion_margin} ({better} is better)"
        )
    refused = _regression_refusal(metric, greater_is_better, cfg, slices, champion_slices or {})
    if refused:
        return False, refused
    theirs = champion[metric]
    gain = ours - theirs if greater_is_better else theirs - ours
    if gain > cfg.promotion_margin:
        return True, (
            f"{metric} {ours:.4f} beats champion {theirs:.4f} by more than {cfg.promotion_margin} ({better} is better)"
        )
    return False, (
        f"{metric} {ours:.4f} does not beat champion {theirs:.4f} by more than {cfg.promotion_margin} "
        f"({better} is better)"
    )


def _threshold_refusal(
    metrics: dict[str, float], cfg: EvaluateConfig, task: str, slices: dict[str, dict[str, float]]
) -> str | None:
    """Why the first threshold of ``evaluate.thresholds`` that fails, or cannot be checked, refuses;
    None when all hold. A threshold on a metric the task family does not report is bad input."""
    for rule in cfg.thresholds:
        name, op, bound = parse_threshold(rule)
        metric_name, _, slice_name = name.rstrip("]").partition("[")
        if metric_name not in metrics:
            raise ConfigError(f"evaluate.thresholds: {rule!r}: {metric_name} is not a {task} metric ({list(metrics)})")
        if slice_name and slice_name not in slices:
            where = (
                "the challenge set was not scored (evaluate.challenge_uri is empty, or the shipped set was "
                "skipped for a model that does not know its labels)"
                if is_challenge(slice_name)
                else f"the eval split has no rows of slice '{slice_name}'"
            )
            return f"{name} cannot be checked: {where} (slices: {sorted(slices)})"
        value = slices[slice_name][metric_name] if slice_name else metrics[metric_name]
        if not (value >= bound if op == ">=" else value <= bound):
            return f"{name} {value:.4f} fails the threshold {name} {op} {bound}"
    return None


def _regression_refusal(
    metric: str,
    greater_is_better: bool,
    cfg: EvaluateConfig,
    slices: dict[str, dict[str, float]],
    champion_slices: dict[str, dict[str, float]],
) -> str | None:
    """Why the first slice (of ``evaluate.min_slice_rows`` rows or more, not the challenge set's)
    worse than the champion's by more than ``max_slice_regression`` refuses; None when none is."""
    for slice_name, values in sorted(slices.items()):
        theirs_there = champion_slices.get(slice_name, {}).get(metric)
        if values["rows"] < cfg.min_slice_rows or theirs_there is None or is_challenge(slice_name):
            continue
        loss = theirs_there - values[metric] if greater_is_better else values[metric] - theirs_there
        if loss > cfg.max_slice_regression:
            return (
                f"{metric}[{slice_name}] {values[metric]:.4f} is worse than the champion's "
                f"{theirs_there:.4f} on slice '{slice_name}' ({int(values['rows'])} rows) by more than "
                f"evaluate.max_slice_regression={cfg.max_slice_regression}"
            )
    return None


def reference_refusal(
    ours: dict[str, dict[str, float]], champion: dict[str, dict[str, float]], cfg: EvaluateConfig
) -> str:
    """Why the new model may not be promoted on the deployment's reference sets, or '' when it holds
    on every one: each ``reference_thresholds`` rule (on every set, or on the one it names), then no
    metric worse than the champion's on the same rows by more than ``max_reference_regression``.
    Both metrics (accuracy, macro-F1) are higher-is-better. Unlike the challenge slices, a
    regression here vetoes: these rows are the deployment's statement of what the model must do,
    and the one measure a trigger's data cannot move."""
    for name, values in sorted(ours.items()):
        for rule in cfg.reference_thresholds:
            metric, op, bound = parse_threshold(rule, "evaluate.reference_thresholds")
            metric, _, set_name = metric.rstrip("]").partition("[")
            if set_name not in ("", name):
                continue
            if not (values[metric] >= bound if op == ">=" else values[metric] <= bound):
                return (
                    f"reference set '{name}': {metric} {values[metric]:.4f} fails evaluate.reference_thresholds "
                    f"{rule!r}"
                )
        for metric, theirs in sorted(champion.get(name, {}).items()):
            if metric != "rows" and theirs - values[metric] > cfg.max_reference_regression:
                return (
                    f"reference set '{name}': {metric} {values[metric]:.4f} is worse than the champion's "
                    f"{theirs:.4f} on the same {int(values['rows'])} rows by more than "
                    f"evaluate.max_reference_regression={cfg.max_reference_regression}"
                )
    return ""


def hold_to_reference(
    verdict: tuple[bool, str],
    ours: dict[str, dict[str, float]],
    champion: dict[str, dict[str, float]],
    cfg: EvaluateConfig,
) -> tuple[bool, str]:
    """``decide``'s verdict on the run's own eval split, then the reference sets': a refusal there
    wins, since the run's eval split comes from whatever data its trigger sent."""
    refusal = reference_refusal(ours, champion, cfg)
    if refusal:
        return False, refusal
    promote, reason = verdict
    return promote, f"{reason}; holds on reference set(s) {sorted(ours)}" if promote and ours else reason


def switched_off(verdict: tuple[bool, str], cfg: EvaluateConfig) -> tuple[bool, str]:
    """The verdict, unless ``evaluate.promote`` is false (a smoke run): then never promoted, saying
    so beside what the gate said. A trigger may turn promotion off, never on (config.deploy)."""
    if cfg.promote:
        return verdict
    promote, reason = verdict
    return False, (
        f"promotion is off (evaluate.promote=false): registered as challenger, champion untouched; the gate "
        f"{'would have promoted' if promote else 'refused too'}: {reason}"
    )
