"""promote: move a registry alias (default ``champion``) to a model version, with an audit
record for every attempt; behind the ``promote`` DAG (manual promote and roll-back) and, with
``promote.require_approval``, the ``finetune`` DAG's answer to its approval (``promote.approval``:
``approved`` promotes on evaluate's head-to-head, as register would have; ``rejected`` records the
refusal and moves nothing). The verdict and the audit are ``pipeline/registry.py``'s, the lock
``pipeline/lock.py``'s, shared with ``register``.

    finetune promote --set promote.version=previous_champion --set promote.force=true \\
        --set promote.reason="v7 misroutes refunds"
"""

from __future__ import annotations

from pipeline import registry, tracking
from pipeline.config import APPROVED, REJECTED, PipelineConfig
from pipeline.errors import PipelineError

# The step's result is the audited record of its attempt.
PromoteResult = registry.Promotion


class PromotionRefused(PipelineError):
    """The version may not take the alias (gate not passed, not better, champion moved)."""


def run(cfg: PipelineConfig) -> PromoteResult:
    own = cfg.promote
    tracker = tracking.client()
    if own.approval == REJECTED:  # a person's answer (or the approval's timeout), not a failure
        return registry.refuse(
            tracker,
            cfg.model_name,
            own.version,
            own.target_alias,
            requested_by=own.requested_by,
            reason=own.reason,
            ttl_s=own.lock_ttl_s,
            wait_s=own.lock_wait_s,
        )
    # Approved: the champion evaluate compared against must still hold, as in register's own promotion.
    expected = registry.compared_against(tracker, cfg.model_name, own.version) if own.approval == APPROVED else None
    result = registry.attempt(
        tracker,
        cfg.model_name,
        own.version,
        own.target_alias,
        requested_by=own.requested_by,
        reason=own.reason,
        force=own.force,
        expected_current=expected,
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
