"""What a run records in MLflow, and under which names.

Names are part of the platform's interface (``analysis/`` and the search read
them), so they are defined here once:

* params ``<group>.<key>`` — the composed config flattened (data, model,
  trainer, strategy); ``choice.<group>`` — the Hydra choice (``choice.fixed=w8a8``);
* params ``bits.<layer>.<weight|activation>.<data|grad>`` — bit width of every
  quantization point per layer, ``float`` where unquantized (also
  ``bits.<layer>.weight.storage`` for THDH storage), and
  ``mode.<layer>.<quantity>.<data|grad>`` — its modes (``auto/fixed``);
* param ``model.layers`` — the fixed layers in model order (a JSON list; list
  params are JSON throughout);
* metrics per epoch (``step`` = epoch): ``train_loss``, ``train_accuracy``,
  ``val_loss``, ``val_accuracy``, any other epoch log (e.g. THDH counters
  ``update_zero_frac/<layer>/<var>``), ``scale.<layer>.<variable>.<data|grad>``
  for every quantized direction of every point, and per layer with an
  accumulator entry ``accumulator.<layer>.overflows`` / ``.sums`` (counts so far);
* final metrics ``test_loss``, ``test_accuracy``, and the cost model:
  ``cost.total_weight_bits``, ``cost.avg_weight_bits``,
  ``cost.avg_activation_bits``, ``cost.bops``, ``cost.train_bops``;
* artifacts ``config/train_config.yaml`` (the composed Hydra config),
  ``config/fixed_config.yaml`` (resolved per-layer, core format),
  ``config/strategy_config.yaml``, ``fixed_model/`` (nics_fix saver);
* tags ``nics_fix.role`` (train/eval/search/trial), ``hydra.*`` (sweep dir,
  job number), ``mlflow.source.git.commit``, and ``error`` on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import zlib
from collections.abc import Mapping
from pathlib import Path

import keras
import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

import nics_fix as nf
from nics_fix.cost import bops, cost_summary, data_bits

REPO = Path(__file__).resolve().parents[1]

MAX_PARAM_LENGTH = 6000  # MLflow 3's limit on a param value


def flatten(value, prefix: str = "") -> dict[str, str]:
    """Nested mappings/lists to ``{"a.b.c": "value"}`` with string values."""
    out: dict[str, str] = {}
    if isinstance(value, Mapping):
        if not value and prefix:
            out[prefix] = "{}"
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, (list, tuple)):
        # JSON, so a list reads back as a list and never as a comma string.
        out[prefix] = json.dumps(list(value), default=str)[:MAX_PARAM_LENGTH]
    else:
        out[prefix] = str(value)[:MAX_PARAM_LENGTH]
    return out


def _mode_text(config) -> str:
    if hasattr(config, "not_training"):
        return f"{config.training}/{config.not_training}"
    return str(config.training)


def point_params(model) -> dict[str, str]:
    """``bits.*`` and ``mode.*`` params: one per layer, quantity and direction."""
    params: dict[str, str] = {}
    for layer in nf.introspect.fixed_layers(model):
        cfg = layer.fixed_config
        quantities = ["activation"]
        if any(p.kind == "weight" for p in layer.fixed_points.values()):
            quantities.insert(0, "weight")
        for quantity in quantities:
            point = getattr(cfg, quantity)
            for direction, sub in (("data", point.data), ("grad", point.gradient)):
                bits = data_bits(sub)
                params[f"bits.{layer.name}.{quantity}.{direction}"] = "float" if sub.is_float else str(bits)
                params[f"mode.{layer.name}.{quantity}.{direction}"] = _mode_text(sub)
                if not sub.is_float and sub.granularity != "tensor":
                    block = f"/{sub.block_size}" if sub.granularity == "block" else ""
                    params[f"granularity.{layer.name}.{quantity}.{direction}"] = f"{sub.granularity}{block}"
            if quantity == "weight" and not point.storage.is_float:
                params[f"bits.{layer.name}.weight.storage"] = str(point.storage.bit_width)
                params[f"mode.{layer.name}.weight.storage"] = f"{point.storage.scale}/{point.storage.rounding}"
    return params


def cost_metrics(model) -> dict[str, float]:
    summary = cost_summary(model)
    return {
        "cost.total_weight_bits": float(summary["total_weight_bits"]),
        "cost.avg_weight_bits": float(summary["avg_weight_bits"]),
        "cost.avg_activation_bits": float(summary["avg_activation_bits"]),
        "cost.bops": float(bops(model)),
        "cost.train_bops": float(bops(model, training=True)),
    }


def scale_metrics(model) -> dict[str, float]:
    """Scales of the quantized directions only (a float point has no meaningful scale).

    Per-channel and per-block scales log their largest as ``scale.*`` (the
    per-tensor scale they refine) and their smallest as ``scale_min.*``; a
    ``dynamic`` direction also logs its counters: ``dynamic.<layer>.<variable>.<direction>.``
    ``overflows`` (saturated elements in its last call, all groups), ``streak``
    (the longest run of calls that fitted in half the range) and ``calls``.
    """
    out = {}
    for point in nf.introspect.point_objects(model):
        layer, key = point.layer.name, point.key
        for direction, config, variable, dynamic in (
                ("data", point.config.data, point.data_scale, point.data_dynamic),
                ("grad", point.config.gradient, point.grad_scale, point.grad_dynamic)):
            if config.is_float:
                continue
            scales = keras.ops.convert_to_numpy(variable)
            out[f"scale.{layer}.{key}.{direction}"] = float(scales.max())
            if scales.ndim:
                out[f"scale_min.{layer}.{key}.{direction}"] = float(scales.min())
            if dynamic is not None:
                name = f"dynamic.{layer}.{key}.{direction}"
                out[f"{name}.overflows"] = float(keras.ops.convert_to_numpy(dynamic.overflows).sum())
                out[f"{name}.streak"] = float(keras.ops.convert_to_numpy(dynamic.streak).max())
                out[f"{name}.calls"] = float(keras.ops.convert_to_numpy(dynamic.calls))
    return out


def accumulator_metrics(model) -> dict[str, float]:
    """Per layer with an accumulator entry: sums that overflowed its width, and all sums, so far."""
    out = {}
    for layer, counts in nf.accumulator_counters(model).items():
        out[f"accumulator.{layer}.overflows"] = float(counts["overflows"])
        out[f"accumulator.{layer}.sums"] = float(counts["sums"])
    return out


def layer_order_param(model) -> dict[str, str]:
    """``model.layers``: the fixed layers in model order (MLflow sorts params by name)."""
    names = [layer.name for layer in nf.introspect.fixed_layers(model)]
    return {"model.layers": json.dumps(names)[:MAX_PARAM_LENGTH]}


_RENAMES = {"loss": "train_loss", "accuracy": "train_accuracy"}


def epoch_metrics(logs: Mapping) -> dict[str, float]:
    out = {}
    for key, value in (logs or {}).items():
        try:
            out[_RENAMES.get(key, key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def log_batch(run_id: str, metrics=None, params=None, tags=None, step: int = 0) -> None:
    """Log many values in few requests (MLflow takes 1000 metrics / 100 params a batch)."""
    client = MlflowClient()
    import time

    now = int(time.time() * 1000)
    metric_list = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
    param_list = [Param(k, str(v)) for k, v in (params or {}).items()]
    tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, max(len(metric_list), 1), 1000):
        chunk = metric_list[i:i + 1000]
        if chunk:
            client.log_batch(run_id, metrics=chunk)
    for i in range(0, len(param_list), 100):
        client.log_batch(run_id, params=param_list[i:i + 100])
    if tag_list:
        client.log_batch(run_id, tags=tag_list)


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs every epoch's Keras logs, every point's scales and the accumulator counters to an MLflow run."""

    def __init__(self, run_id: str):
        super().__init__()
        self.run_id = run_id

    def on_epoch_end(self, epoch, logs=None):
        metrics = epoch_metrics(logs)
        metrics.update(scale_metrics(self.model))
        metrics.update(accumulator_metrics(self.model))
        log_batch(self.run_id, metrics=metrics, step=epoch)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def hydra_tags() -> dict[str, str]:
    """Sweep directory, job number and choices of the running Hydra job, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {}
    tags = {
        "hydra.mode": str(hc.mode.name if hc.mode is not None else "RUN"),
        "hydra.output_dir": str(Path(hc.runtime.output_dir).resolve()),
        "hydra.job_name": str(hc.job.name),
    }
    if hc.mode is not None and hc.mode.name == "MULTIRUN":
        tags["hydra.sweep_dir"] = str(Path(hc.sweep.dir).resolve())
        tags["hydra.job_num"] = str(hc.job.num)
    return tags


def hydra_choices() -> dict[str, str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    except (ImportError, ValueError):
        return {}
    return {k: str(v) for k, v in choices.items() if not k.startswith("hydra") and v is not None}


class TrackingError(ValueError):
    """``mlflow.tracking_uri`` names no usable tracking store (the message says which and why)."""


#: Seconds to wait for a tracking server or database to answer the first contact.
CONNECT_TIMEOUT = 10


def _tracking_error(uri: str, reason: str) -> TrackingError:
    return TrackingError(
        f"mlflow.tracking_uri={without_passwords(uri)}: {reason}\n"
        "Fix: point mlflow.tracking_uri at a reachable store, e.g. sqlite:///mlflow.db (a local file), "
        "postgresql+psycopg2://user:pass@host/db, or http://host:5000 (a running `mlflow server`); "
        "mlflow=server reads MLFLOW_TRACKING_URI.")


#: ``scheme://user:password@``: the password part of any URL (database or HTTP).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")


def without_passwords(value):
    """``value`` (a string, or mappings and lists of them) with every URL password replaced by ``***``.

    What a run records and what a job writes to its output folder goes through
    this: ``postgresql+psycopg2://optuna:***@db/optuna``.
    """
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<head>***@", value)
    if isinstance(value, Mapping):
        return {key: without_passwords(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_passwords(item) for item in value]
    return value


#: Python module of a database driver -> the pip package that brings it.
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL", "pyodbc": "pyodbc", "asyncpg": "asyncpg", "pg8000": "pg8000"}


def database_error_text(err: BaseException) -> str:
    """One line for a failed database connection; a missing driver says which package to install."""
    missing = err
    while missing is not None and not isinstance(missing, ModuleNotFoundError):  # Optuna wraps it
        missing = missing.__cause__ or missing.__context__
    if missing is not None and missing.name:
        module = missing.name.split(".")[0]
        package = DRIVER_PACKAGES.get(module, module)
        extra = " or pip install -e '.[cluster]' (PostgreSQL)" if module == "psycopg2" else ""
        return f"its driver, Python module {module!r}, is not installed: pip install '{package}'{extra}"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _probe(uri: str) -> None:
    """Fail in seconds, with a clear message, when the store cannot be reached at all."""
    scheme = url_scheme(uri)
    if scheme in ("http", "https"):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT)
            # /health answers anyone; an authenticated server (mlflow server --app-name basic-auth)
            # refuses the first real request with a page of HTML and a traceback: say it here.
            answer = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search",
                                  params={"max_results": 1}, timeout=CONNECT_TIMEOUT, **_credentials())
        except requests.ReadTimeout:
            return  # a server is there, busy: MLflow's own requests wait longer and retry
        except requests.RequestException as err:
            raise _tracking_error(uri, f"no tracking server answers there ({type(err).__name__}: {err})") from None
        if answer.status_code in (401, 403):
            raise TrackingError(_refusal(uri, answer.status_code))
    elif uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        _probe_sqlite_file(uri, Path(uri[len("sqlite:///"):]))
    elif scheme in ("postgresql", "mysql", "mssql"):
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(uri, **connect_timeout_args(scheme))
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
        except Exception as err:  # noqa: BLE001 - driver missing, bad URL, refused, auth: all one answer
            raise _tracking_error(uri, f"cannot connect to the database ({database_error_text(err)})") from None


def _credentials() -> dict:
    """``requests`` arguments with the credentials MLflow's own client sends (its environment variables)."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"auth": (user, password)}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"headers": {"Authorization": f"Bearer {token}"}} if token else {}


def _refusal(uri: str, status: int) -> str:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 403:
        return (f"mlflow.tracking_uri={uri}: the tracking server refuses user {user!r} access (HTTP 403); "
                "ask its admin for permission on the experiment")
    if user and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        return (f"mlflow.tracking_uri={uri}: the tracking server refused user {user!r} with the password in "
                "MLFLOW_TRACKING_PASSWORD (HTTP 401); check both variables")
    return (f"mlflow.tracking_uri={uri}: the tracking server asks for a user name and password (HTTP 401); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")


def _probe_sqlite_file(uri: str, path: Path) -> None:
    """A SQLite store must be a database file (or not exist yet) in a folder this process can write."""
    if path.is_dir():
        raise _tracking_error(uri, f"{path} is a folder, not a database file (e.g. sqlite:///{path}/mlflow.db)")
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as handle:
            if handle.read(16) != b"SQLite format 3\x00":
                raise _tracking_error(uri, f"{path} exists and is not a SQLite database")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a"):
            pass
    except OSError as err:
        raise _tracking_error(uri, f"cannot write in {path.parent} ({type(err).__name__}: {err.strerror})") from None


def url_scheme(url: str) -> str:
    """``postgresql`` for ``postgresql+psycopg2://...``: the database or protocol, without the driver."""
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def connect_timeout_args(scheme: str) -> dict:
    """SQLAlchemy ``create_engine`` arguments that bound a connection attempt to ``CONNECT_TIMEOUT`` s."""
    if scheme in ("postgresql", "mysql"):
        return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
    return {}


def setup(tracking_uri: str, experiment_name: str) -> None:
    """Point MLflow at the configured store and experiment.

    For a SQLite store, a new experiment keeps its artifacts in ``mlartifacts/``
    beside the database file, so a store moves (and is read) as one folder
    instead of scattering artifacts into whatever directory a job ran in.

    An unusable ``tracking_uri`` (unknown scheme, nobody listening, a database
    that refuses the connection) raises :class:`TrackingError` within seconds.
    """
    if not isinstance(experiment_name, str) or not experiment_name.strip():
        raise TrackingError(f"mlflow.experiment_name must be a non-empty name, got {experiment_name!r} "
                            "(fix it in conf/mlflow/ or on the command line: mlflow.experiment_name=...)")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    try:
        if (uri, experiment_name) in _READY:  # a search's trials: probed and created once per process
            mlflow.set_experiment(experiment_name)
            return
        _probe(uri)
        # Parallel jobs (joblib launcher, search workers) on a new database would otherwise
        # race to create MLflow's tables ("duplicate column name") and the experiment.
        with store_lock(uri):
            if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment_name) is None:
                database = Path(uri[len("sqlite:///"):]).resolve()
                location = (database.parent / "mlartifacts" / experiment_name).as_uri()
                with contextlib.suppress(mlflow.exceptions.MlflowException):  # created meanwhile by a peer
                    mlflow.create_experiment(experiment_name, artifact_location=location)
            experiment = mlflow.set_experiment(experiment_name)
            if EXPERIMENT_KIND[0] not in experiment.tags:  # the UI opens it on its runs, not the GenAI overview
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        _READY.add((uri, experiment_name))
    except mlflow.exceptions.MlflowException as err:
        raise _tracking_error(uri, err.message.strip()) from None


_READY: set[tuple[str, str]] = set()

#: The experiment tag by which MLflow 3's UI chooses an experiment's first page (model training: the runs table).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # (tracking URI, experiment) set up by this process


@contextlib.contextmanager
def store_lock(url: str):
    """Serialize first use of a database shared by parallel processes (creating tables, experiments, studies).

    SQLite: an ``flock`` on ``<database>.lock`` beside the file; PostgreSQL: a
    session-level advisory lock; anything else: no lock.
    """
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        database = Path(url[len("sqlite:///"):]).resolve()
        database.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(database.with_name(database.name + ".lock")):
            yield
        return
    if url.startswith("postgresql"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                          **connect_timeout_args("postgresql"))
        key = zlib.crc32(b"nics_fix.store_lock") - 2 ** 31
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
        return
    yield


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def default_run_name(choices: Mapping) -> str | None:
    """``<model>/<fixed>`` plus ``#<job>`` in a sweep: readable, and distinct across a sweep."""
    if not choices:
        return None
    name = "/".join(str(choices[g]) for g in ("model", "fixed") if g in choices)
    job = hydra_tags().get("hydra.job_num")
    return f"{name} #{job}" if job is not None else name or None


def run_description(results: Mapping, choices: Mapping, cost: Mapping) -> str:
    """A run's one-line description (MLflow's ``mlflow.note.content``): what it is and how it did."""
    what = ", ".join(f"{group}={choices[group]}" for group in ("fixed", "model", "data") if group in choices)
    text = f"test accuracy {results['test_accuracy']:.4f}"
    if "cost.avg_weight_bits" in cost:
        text += f", average weight bits {cost['cost.avg_weight_bits']:.2f}"
    return f"{what}: {text}" if what else text


def base_tags(role: str) -> dict[str, str]:
    tags = {"nics_fix.role": role, **hydra_tags()}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def artifact_dir_of(run_id: str, artifact_path: str, dst: str | os.PathLike) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                               dst_path=str(dst))
