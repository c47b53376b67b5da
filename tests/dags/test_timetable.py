"""The DAGs' timetable (plugins/finetune_timetable.py): unpausing a DAG never starts a run for a
tick that was already past, while a tick the scheduler reaches a little late still runs.

Everything here reads the real clock: each test builds a weekly cron whose tick fell today (or
yesterday, just after midnight) a given number of minutes ago, so the scheduler's clock is on a
tick day, after the tick. The last tests go through Airflow itself: the DAG file parsed and
synced to the metadata DB as the DAG processor does, unpaused, then one pass of the scheduler's
own run creation (`DagModel.dags_needing_dagruns`, `SchedulerJobRunner._create_dag_runs`).
"""

from datetime import timedelta

import pendulum
import pytest

from tests.helpers import DAGS

START = pendulum.datetime(2026, 1, 1, tz="UTC")  # the DAGs' start_date
WEEK = timedelta(days=7)


def weekly_tick(minutes_ago: int) -> tuple[str, pendulum.DateTime]:
    """A weekly cron whose latest tick was `minutes_ago` whole minutes before the current minute
    began (so between that and one minute more), and that tick."""
    tick = pendulum.now("UTC").start_of("minute").subtract(minutes=minutes_ago)
    return f"{tick.minute} {tick.hour} * * {tick.isoweekday() % 7}", tick


def next_run(timetable, last_tick=None, catchup=False, earliest=START, latest=None):
    from airflow.timetables.base import DataInterval, TimeRestriction

    last = DataInterval(last_tick, last_tick) if last_tick else None
    return timetable.next_dagrun_info(
        last_automated_data_interval=last, restriction=TimeRestriction(earliest, latest, catchup)
    )


def on_time(cron: str, **kwargs):
    from finetune_timetable import OnTimeCronTimetable

    return OnTimeCronTimetable(cron, timezone="UTC", **kwargs)


@pytest.mark.parametrize("last_tick_weeks_ago", [None, 1, 3], ids=["first-unpause", "paused-a-week", "paused-3-weeks"])
def test_a_tick_past_when_the_dag_is_unpaused_is_skipped(last_tick_weeks_ago):
    cron, tick = weekly_tick(minutes_ago=30)
    last_tick = tick - last_tick_weeks_ago * WEEK if last_tick_weeks_ago else None

    info = next_run(on_time(cron), last_tick=last_tick)

    assert info.run_after == tick + WEEK
    assert info.logical_date == tick + WEEK


def test_airflows_own_cron_timetable_would_run_that_tick():
    """Why the DAGs have a timetable of their own: Airflow 3.3's, with catchup=False, schedules
    the latest past tick. Should this fail after an Airflow upgrade, OnTimeCronTimetable may go."""
    from airflow.timetables.trigger import CronTriggerTimetable

    cron, tick = weekly_tick(minutes_ago=30)
    for run_immediately in (False, timedelta(0)):
        stock = CronTriggerTimetable(cron, timezone="UTC", run_immediately=run_immediately)
        assert next_run(stock).run_after == tick
        assert next_run(stock, last_tick=tick - WEEK).run_after == tick


@pytest.mark.parametrize("minutes_ago", [0, 1, 3])
def test_a_tick_the_scheduler_reaches_within_the_grace_still_runs(minutes_ago):
    cron, tick = weekly_tick(minutes_ago)  # under 4 of the default 5 minutes late

    assert next_run(on_time(cron)).run_after == tick
    assert next_run(on_time(cron), last_tick=tick - WEEK).run_after == tick


def test_the_grace_is_a_setting():
    cron, tick = weekly_tick(minutes_ago=30)

    assert next_run(on_time(cron, grace=timedelta(hours=1))).run_after == tick
    assert next_run(on_time(cron, grace=timedelta(0))).run_after == tick + WEEK
    with pytest.raises(ValueError, match=r"grace: expected a duration of zero or more, got -1 day, 23:59:00"):
        on_time(cron, grace=timedelta(minutes=-1))


def test_the_next_tick_after_the_last_run_start_and_end_dates_and_catchup_as_airflows():
    from airflow.timetables.trigger import CronTriggerTimetable

    cron, tick = weekly_tick(minutes_ago=30)
    # a run already made at today's tick: the next is next week's
    assert next_run(on_time(cron), last_tick=tick).run_after == tick + WEEK
    # a start_date in the future: its first tick, not today's
    assert next_run(on_time(cron), earliest=tick + 2 * WEEK).run_after == tick + 2 * WEEK
    # past the end_date: no more runs
    assert next_run(on_time(cron), latest=tick + WEEK - timedelta(minutes=1)) is None
    # catchup=True: every tick since the last run, exactly as Airflow's own timetable
    stock = CronTriggerTimetable(cron, timezone="UTC")
    assert next_run(on_time(cron), last_tick=tick - 3 * WEEK, catchup=True) == next_run(
        stock, last_tick=tick - 3 * WEEK, catchup=True
    )
    assert next_run(on_time(cron), last_tick=tick - 3 * WEEK, catchup=True).run_after == tick - 2 * WEEK


def test_registered_as_a_plugin_and_serialized_with_its_grace():
    from airflow.plugins_manager import get_timetables_plugins
    from airflow.serialization.decoders import decode_timetable
    from airflow.serialization.encoders import encode_timetable

    assert "finetune_timetable.OnTimeCronTimetable" in get_timetables_plugins()
    timetable = on_time("@weekly", grace=timedelta(minutes=7))
    restored = decode_timetable(encode_timetable(timetable))
    assert restored == timetable and restored.grace == timedelta(minutes=7)
    assert restored.summary == "0 0 * * 0"
    assert restored.description == "At 00:00, only on Sunday; a tick more than 7 minutes late is skipped"


# Through Airflow: the DAG processor's sync, then the scheduler's run creation.

DAG_SCHEDULES = {
    "finetune": ("finetune.py", "FINETUNE_SCHEDULE"),
    "collect": ("collect.py", "FINETUNE_COLLECT_SCHEDULE"),
}


@pytest.fixture
def unpaused_on_a_tick_day(airflow_db, dagbag, monkeypatch):
    """Parse a DAG file with its cron set to `cron`, sync it to the metadata DB as the DAG
    processor does (which computes the DAG's next run), and unpause it. Afterwards the DAGs as
    shipped are synced back, paused, and the scheduled runs this made are deleted."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.models.asset import AssetDagRunQueue
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunType
    from sqlalchemy import delete, update

    synced = []

    def unpause(dag_id: str, cron: str) -> DagModel:
        dag_file, setting = DAG_SCHEDULES[dag_id]
        monkeypatch.setenv(setting, cron)
        bag = BundleDagBag(dag_folder=str(DAGS / dag_file), bundle_path=DAGS)
        assert bag.import_errors == {}
        DagBundlesManager().sync_bundles_to_db()
        sync_bag_to_db(bag, "dags-folder", None)
        synced.append(dag_id)
        with create_session() as session:
            # no asset event may queue it: only its schedule is under test
            session.execute(delete(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == dag_id))
            session.execute(update(DagModel).where(DagModel.dag_id == dag_id).values(is_paused=False))
            return session.get(DagModel, dag_id)

    yield unpause
    sync_bag_to_db(dagbag, "dags-folder", None)
    with create_session() as session:
        session.execute(delete(DagRun).where(DagRun.dag_id.in_(synced), DagRun.run_type == DagRunType.SCHEDULED))
        session.execute(update(DagModel).where(DagModel.dag_id.in_(synced)).values(is_paused=True))


def scheduler_pass(dag_id: str) -> list:
    """One pass of the scheduler's run creation for time-scheduled DAGs: the DAGs due now by the
    DB's clock (``DagModel.dags_needing_dagruns``), then their runs. The scheduled runs of
    `dag_id` afterwards, as (run_after, logical_date)."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunType
    from sqlalchemy import select

    with create_session() as session:
        query, _ = DagModel.dags_needing_dagruns(session)
        due = [model for model in query.all() if model.dag_id == dag_id]
        SchedulerJobRunner(job=Job())._create_dag_runs(dag_models=due, session=session)
    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_type == DagRunType.SCHEDULED))
        return [(run.run_after, run.logical_date) for run in runs]


@pytest.mark.parametrize("dag_id", DAG_SCHEDULES)
def test_unpausing_a_dag_after_its_tick_starts_no_run(unpaused_on_a_tick_day, dag_id):
    cron, tick = weekly_tick(minutes_ago=30)

    dag_model = unpaused_on_a_tick_day(dag_id, cron)

    assert scheduler_pass(dag_id) == []
    assert dag_model.next_dagrun_create_after == tick + WEEK


@pytest.mark.parametrize("dag_id", DAG_SCHEDULES)
def test_a_tick_a_minute_old_is_still_run_by_the_scheduler(unpaused_on_a_tick_day, dag_id):
    cron, tick = weekly_tick(minutes_ago=1)

    dag_model = unpaused_on_a_tick_day(dag_id, cron)

    assert scheduler_pass(dag_id) == [(tick, tick)]
    assert dag_model.next_dagrun_create_after == tick
