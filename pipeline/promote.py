"""promote: move a registry alias (default ``champion``) to a model version, with an audit
record for every attempt; behind the ``promote`` DAG (manual promote and roll-back). The lock,
the verdict and the audit are ``pipeline/registry.py``'s, shared with ``register``.

    finetune promote --set promote.version=previous_champion --set promote.force=true \\
        --set promote.reason="v7 misroutes refunds"
"""

from __future__ import annotations

from pipeline import registry, tracking
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError

# The step's result is the audited record of its attempt.
PromoteResult = registry.Promotion


class PromotionRefused(PipelineError):
    """The version may not take the alias (gate not passed, not better, champion moved)."""


def run(cfg: PipelineConfig) -> PromoteResult:
    own = cfg.promote
    result = registry.attempt(
        tracking.client(),
        cfg.model_name,
        own.version,
        own.target_alias,
        requested_by=own.requested_by,
        reason=own.reason,
        force=own.force,
        ttl_s=own.lock_ttl_s,
        wait_s=own.lock_wait_s,
    )
    if result.outcome == "refused":
        raise PromotionRefused(
            f"{cfg.model_name} version {result.version} not promoted to {own.target_alias}: "
            f"{result.reason} (audit run {result.audit_run_id}); to override the gate, trigger "
            f"promote again with force=true and a reason, which is recorded"
        )
    return result
