import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import DAGS

# Airflow reads its settings when first imported: point it at a private home and SQLite DB (the
# DAG-run tests reset that DB, so never a developer's own) and at this project's dags/ first.
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="airflow-home-"))
os.environ["AIRFLOW_HOME"] = str(AIRFLOW_HOME)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}"
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
# The REST API is called in-process in the tests; every caller is an admin there, as in `airflow standalone`.
os.environ.setdefault("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")


@pytest.fixture(scope="session")
def dagbag():
    """Every DAG in dags/, parsed as Airflow's DAG processor does (a BundleDagBag: the bundle's
    folder on sys.path, .airflowignore honoured); an import error fails the test."""
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=str(DAGS), bundle_path=DAGS)
    assert bag.import_errors == {}
    return bag


@pytest.fixture(scope="session")
def airflow_db():
    """A fresh Airflow metadata DB (SQLite in the private home) for tests that run DAGs."""
    from airflow.utils.db import resetdb

    resetdb(skip_init=False)


@pytest.fixture
def finetune_unpaused(airflow_db, dagbag):
    """The DAGs synced to the metadata DB as the DAG processor would, ``finetune`` unpaused (new
    DAGs start paused, and a paused DAG is not queued by asset events). Afterwards its queued
    asset triggers are dropped and its unfinished runs marked failed (stopped where the test
    left them), so each test starts from none."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import sync_bag_to_db
    from airflow.models.asset import AssetDagRunQueue
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import delete, update

    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(dagbag, "dags-folder", None)
    with create_session() as session:
        session.execute(update(DagModel).where(DagModel.dag_id == "finetune").values(is_paused=False))
    yield
    with create_session() as session:
        session.execute(delete(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == "finetune"))
        session.execute(
            update(DagRun)
            .where(DagRun.dag_id == "finetune", DagRun.state.in_(["queued", "running"]))
            .values(state="failed")
        )
        session.execute(update(DagModel).where(DagModel.dag_id == "finetune").values(is_paused=True))
