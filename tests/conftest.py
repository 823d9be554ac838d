"""Shared fixtures. TensorFlow is slow to import: it is imported once per worker here."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or ``$NICS_FIX_DATA``), if present."""
    path = Path(os.environ.get("NICS_FIX_DATA", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory):
    """An empty, migrated MLflow SQLite store: creating one takes seconds, copying it does not."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# MLflow's environment as the session found it. mlflow.set_tracking_uri/set_experiment also
# export MLFLOW_TRACKING_URI/MLFLOW_EXPERIMENT_ID "so that subprocesses inherit them": a test
# that points MLflow at its scratch store would otherwise send the next test's subprocesses
# (README commands, jobs) to that store, on whichever worker happens to run them.
_MLFLOW_ENV = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}


@pytest.fixture(autouse=True)
def _no_mlflow_leak():
    yield
    names = {key for key in os.environ if key.startswith("MLFLOW_")} | set(_MLFLOW_ENV)
    changed = [key for key in names if os.environ.get(key) != _MLFLOW_ENV.get(key)]
    # Only the environment: MLflow's in-process URI (which wins over it) stays with the
    # module fixtures that set it for their tests and clear it when they finish.
    for key in changed:
        if key in _MLFLOW_ENV:
            os.environ[key] = _MLFLOW_ENV[key]
        else:
            os.environ.pop(key, None)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from the same seeds and a clean Keras name space."""
    import keras

    keras.utils.set_random_seed(0)
    keras.backend.clear_session(free_memory=False)  # gc.collect() per test costs ~0.5 s
    yield
    # A train job switches TF op determinism on for its process, and Keras then
    # silently refuses XLA: don't let that leak into the next test.
    from tensorflow.python.framework import config as tf_config

    if tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()


FIX8 = {
    "weight": {
        "data_config": {"bit_width": 8, "training": "auto", "not_training": "fixed"},
        "gradient_config": {"bit_width": 8, "training": "auto"},
    },
    "activation": {
        "data_config": {"bit_width": 8, "training": "auto", "not_training": "fixed"},
        "gradient_config": {"bit_width": 8, "training": "auto"},
    },
}


@pytest.fixture
def fix8():
    """An 8-bit config for all four quantities (a layer config dict)."""
    import copy

    return copy.deepcopy(FIX8)



@contextlib.contextmanager
def postgres_role(n_databases: int = 1):
    """``(urls, password)``: fresh PostgreSQL databases owned by a fresh role with a password of its own.

    On the server of ``NICS_FIX_TEST_POSTGRES`` (CI sets it, see .ci/postgres.sh; the
    test skips where it is unset); dropped afterwards. The password occurs nowhere
    else, so a test can look for it in what a job recorded.
    """
    import uuid

    url = os.environ.get("NICS_FIX_TEST_POSTGRES")
    if not url:
        pytest.skip("NICS_FIX_TEST_POSTGRES (a PostgreSQL URL, see .ci/postgres.sh) is not set")
    import sqlalchemy

    server = sqlalchemy.engine.make_url(url)
    role = f"nics_fix_t{uuid.uuid4().hex[:10]}"
    password = f"pw{uuid.uuid4().hex}"
    names = [f"{role}_{i}" for i in range(n_databases)]
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        conn.execute(sqlalchemy.text(f"GRANT {role} TO CURRENT_USER"))  # PostgreSQL 15: to make it the owner
        for name in names:
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {name} OWNER {role}"))
    try:
        yield [server.set(username=role, password=password, database=name).render_as_string(hide_password=False)
               for name in names], password
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            conn.execute(sqlalchemy.text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


@pytest.fixture
def postgres_database():
    """``(url, password)``: one database of :func:`postgres_role`."""
    with postgres_role(1) as (urls, password):
        yield urls[0], password


def pytest_collection_modifyitems(config, items):
    """Long tests (marked ``slow``) first: under ``-n 2 --dist worksteal`` an idle worker
    steals queued tests one by one, so starting the long ones early leaves short ones for
    the end, and the run does not finish on one worker while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
