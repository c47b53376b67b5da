"""The schedule of the `finetune` and `collect` DAGs: cron ticks that run on time or not at all.

Airflow 3.3's own cron timetable (`CronTriggerTimetable`) with `catchup=False` schedules the most
recent tick that is already past whenever it computes a DAG's next run with no newer one: when a
DAG is first unpaused, and when it is unpaused after a pause that spanned a tick. Unpausing
`finetune` on a Sunday to trigger one run from the form therefore started the weekly retrain at
once, ahead of the run the person asked for. `OnTimeCronTimetable` schedules the same ticks but
skips one that is more than `grace` (default 5 minutes) in the past when the next run is
computed, so an unpause only ever waits for the next tick. The grace keeps a tick whose run the
scheduler creates a little late (a busy loop, the DAG processor re-parsing at that moment). A
tick held back longer, by a run still going under `max_active_runs=1` or a scheduler that was
down, is skipped the same way: the DAG processor recomputes the next run every parse.

Airflow finds the class through the plugin below, registered as the `airflow.plugins` entry point
in pyproject.toml: the DAG processor needs it to serialize the DAGs, and the scheduler and API
server to read them back, in every process that runs this project's Airflow (`make up`,
`finetune run`, the tests, the images), whatever its plugins folder. See it listed with:

    AIRFLOW_HOME=$(mktemp -d) airflow plugins
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pendulum
from airflow.plugins_manager import AirflowPlugin
from airflow.timetables.base import DagRunInfo
from airflow.timetables.trigger import CronTriggerTimetable

if TYPE_CHECKING:
    from airflow.timetables.base import DataInterval, TimeRestriction
    from pendulum.tz.timezone import FixedTimezone, Timezone

DEFAULT_GRACE = timedelta(minutes=5)  # as Airflow's own floor for running a tick late (run_immediately=None)


class OnTimeCronTimetable(CronTriggerTimetable):
    """Runs at each tick of `cron`, as `CronTriggerTimetable` does, except that with `catchup=False`
    a tick already more than `grace` in the past when the next run is computed is skipped.

    With `catchup=True` it behaves exactly as `CronTriggerTimetable` (every tick since
    `start_date`, as a backfill would).
    """

    def __init__(
        self, cron: str, *, timezone: str | Timezone | FixedTimezone, grace: timedelta = DEFAULT_GRACE
    ) -> None:
        super().__init__(cron, timezone=timezone)
        if grace < timedelta(0):
            raise ValueError(f"grace: expected a duration of zero or more, got {grace}")
        self._grace = grace
        if self.description:
            self.description += f"; a tick more than {_minutes(grace)} late is skipped"

    @property
    def expression(self) -> str:
        """The cron expression, presets expanded (the SDK timetables' attribute of that name)."""
        return self._expression

    @property
    def grace(self) -> timedelta:
        return self._grace

    def next_dagrun_info(
        self, *, last_automated_data_interval: DataInterval | None, restriction: TimeRestriction
    ) -> DagRunInfo | None:
        if restriction.catchup:
            return super().next_dagrun_info(
                last_automated_data_interval=last_automated_data_interval, restriction=restriction
            )
        # The first tick at or after now - grace; CronTriggerTimetable takes the last tick at or
        # before now, however long ago it was.
        start = self._align_to_next(pendulum.now("UTC") - self._grace)
        if last_automated_data_interval is not None:
            start = max(start, self._get_next(last_automated_data_interval.end))
        if restriction.earliest is not None:
            start = max(start, self._align_to_next(restriction.earliest))
        if restriction.latest is not None and restriction.latest < start:
            return None
        return DagRunInfo.interval(start, start)  # a trigger timetable's data interval is empty

    def serialize(self) -> dict[str, Any]:
        from airflow.serialization.encoders import encode_timezone

        return {
            "expression": self._expression,
            "timezone": encode_timezone(self._timezone),
            "grace": self._grace.total_seconds(),
        }

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> OnTimeCronTimetable:
        return cls(
            data["expression"], timezone=pendulum.timezone(data["timezone"]), grace=timedelta(seconds=data["grace"])
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OnTimeCronTimetable):
            return NotImplemented
        return (self._expression, self._timezone, self._grace) == (other._expression, other._timezone, other._grace)

    def __hash__(self) -> int:
        return hash((self._expression, self._timezone, self._grace))


def _minutes(duration: timedelta) -> str:
    minutes = duration.total_seconds() / 60
    return f"{minutes:g} minute" + ("" if minutes == 1 else "s")


class FinetuneTimetablePlugin(AirflowPlugin):
    name = "finetune_timetable"
    timetables = [OnTimeCronTimetable]
