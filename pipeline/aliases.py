"""aliases: compare each registry alias of ``model_name`` with the pipeline's promotion audit,
and fail (exit 3, its alert naming the alias, the version and the time window) when someone moved
one in MLflow's UI or API without the pipeline. Run by the scheduled ``aliases`` DAG; ``register``
runs the same check before it promotes. ``challenger`` is left out: register moves it to each new
version without an audit record.

    finetune aliases --set model_name=support-intents
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from pipeline import registry, storage, tracking
from pipeline.config import PipelineConfig
from pipeline.errors import ValidationFailed


@dataclass(frozen=True)
class AliasesResult:
    result_uri: str
    model_name: str
    aliases: dict[str, str]
    checked_at: str


class AliasesMovedOutside(ValidationFailed):
    """An alias is not where the pipeline's audit records left it (exit 3: a finding, not retried)."""


def run(cfg: PipelineConfig) -> AliasesResult:
    tracker = tracking.client()
    moves = registry.outside_moves(tracker, cfg.model_name)
    if moves:
        # One line, each move with its versions and window: the line an alert carries.
        raise AliasesMovedOutside(
            f"{cfg.model_name}: {len(moves)} alias(es) moved outside the pipeline: {'; '.join(map(str, moves))}\n"
            "  to put one back, or to adopt the move, promote through the promote DAG (audited; force=true and "
            "a reason where the gate would refuse)"
        )
    model = tracker.get_registered_model(cfg.model_name)  # after the check: it wrote the checked_at tag
    aliases = {k: str(v) for k, v in model.aliases.items()}
    checked = model.tags.get(registry.CHECKED_TAG, "")
    print(f"aliases: {cfg.model_name} {aliases} match the promotion audit", file=sys.stderr)
    return AliasesResult(
        result_uri=storage.join(cfg.step_uri("aliases"), "result.json"),
        model_name=cfg.model_name,
        aliases=aliases,
        checked_at=checked,
    )
