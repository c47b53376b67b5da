"""register's and promote's settings, and the registry's aliases (champion, challenger,
previous_champion) they move.

    finetune promote --help

Foundation layer (the ``config`` package): imports nothing of ours but ``fields`` and ``errors``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.fields import check_fields, option

CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous_champion"
ALIAS_PATTERN = r"[A-Za-z_][A-Za-z0-9_\-]{0,254}"
APPROVED, REJECTED = "approved", "rejected"
APPROVAL_ANSWERS = ("", APPROVED, REJECTED)  # promote.approval: "" for a promotion nobody was asked about


@dataclass(frozen=True)
class RegisterConfig:
    """register's settings (``register.*``): the result files of the run it registers. None of them
    is a ``TrainingArguments`` field."""

    train_result_uri: str = option("", "The train step's result.json.")
    evaluate_result_uri: str = option("", "The evaluate step's result.json.")
    validate_result_uri: str = option("", "The validate step's result.json (lineage).")
    collect_result_uri: str = option("", "The collect step's result.json (lineage: snapshot sha256).")

    def __post_init__(self) -> None:
        check_fields(self, "register.")


@dataclass(frozen=True)
class PromoteConfig:
    """promote's settings (``promote.*``): which version gets which alias, why, and the registry lock's
    timing. None of them is a ``TrainingArguments`` field."""

    version: str = option("", "Version number, or an alias to resolve (challenger, previous_champion, ...).")
    target_alias: str = option(CHAMPION, "Alias to move to the version.", pattern=ALIAS_PATTERN)
    reason: str = option("", "Why; recorded in the audit trail; required with force.")
    force: bool = option(False, "Promote even if the version failed its gate or is worse than the champion.")
    requested_by: str = option("", "Who asked (the Airflow user who triggered the run).")
    # The lock every alias move (promote, and register's own promotion) takes: pipeline/lock.py.
    lock_ttl_s: float = option(
        60.0,
        "Seconds after which the registry lock of a holder that stopped renewing it "
        "(it renews every quarter of this) may be taken over.",
        minimum=1.0,
        maximum=3600.0,
    )
    lock_wait_s: float = option(
        300.0,
        "Seconds an alias move waits for the registry lock before it fails with a retryable error.",
        minimum=0.0,
        maximum=86400.0,
    )
    # The approval gate: the deployment's (NEVER_FROM_A_TRIGGER in deploy.py), read when the DAG
    # file is parsed, so it decides the finetune DAG's shape (register > approve > promote).
    require_approval: bool = option(
        False,
        "A person approves each new champion: register sets challenger only, the finetune DAG asks in "
        "Airflow's Required actions and promote moves champion on Approve.",
    )
    approvers: list[str] = option(
        [],
        "Airflow users who may answer the approval (their auth manager ids: the user name under the "
        "simple auth manager); empty: anyone the auth manager lets act on the DAG.",
    )
    approval_timeout: int = option(
        72 * 3600,
        "Seconds the approval waits for an answer; then it is Reject, never Approve.",
        minimum=1,
        maximum=30 * 86400,
    )
    approval: str = option(
        "",
        "Set by the finetune DAG's promote task from the approval's answer: 'approved' promotes on "
        "evaluate's head-to-head, 'rejected' records the refusal and moves nothing.",
        choices=APPROVAL_ANSWERS,
    )

    def __post_init__(self) -> None:
        check_fields(self, "promote.")
        if self.target_alias == "latest" or self.target_alias[1:].isdigit() and self.target_alias[0] in "vV":
            raise ConfigError(f"promote.target_alias: '{self.target_alias}' is reserved by MLflow")
        if self.force and not self.reason.strip():
            raise ConfigError("promote.force requires promote.reason: say why the gate is overridden")
