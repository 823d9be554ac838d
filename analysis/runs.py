"""MLflow runs into pandas tables.

Reads the names defined in ``experiments/tracking.py`` (without importing it:
that module imports Keras). One row per run from :func:`load_runs`, one row
per (run, metric, step) from :func:`load_histories`, and the per-layer bit
allocation as a points x runs matrix from :func:`bit_allocation`.

Columns of :func:`load_runs` (plain names, no ``params.``/``metrics.`` prefix):

* run info: ``run_id``, ``experiment_id``, ``run_name``, ``status``,
  ``start_time``, ``end_time`` (UTC timestamps), ``duration_s``;
* ``label``: a short display name (``trial 7``; ``#2 w4a4`` for Hydra job 2 of a
  sweep with ``choice.fixed=w4a4``; else ``choice.fixed``; else the run name);
* tags: every tag not starting with ``mlflow.`` under its own name
  (``nics_fix.role``, ``hydra.sweep_dir``, ``hydra.job_num`` (Int64),
  ``optuna.trial_number`` (Int64), ``optuna.state``, ``nics_fix.baseline``,
  ``error``, ...), plus ``parent_run_id`` (``mlflow.parentRunId``) and
  ``git_commit`` (``mlflow.source.git.commit``);
* every metric's last value (the value at the highest step) as float64:
  ``val_accuracy``, ``test_accuracy``, ``cost.*``, ``scale.*``, ...;
* ``bits.<layer>.<weight|activation>.<data|grad|storage>`` as ``Int64``. A
  point logged as ``float`` holds :data:`FLOAT_BITS` (32, the width the cost
  model charges for float, so means over these columns agree with
  ``cost.avg_*``); ``float_points`` lists those points
  (``"dense1.weight.grad,..."``, empty when none); ``<NA>`` means not logged;
* ``uniform_bits`` (Int64): the common width when every ``bits.*.data``
  point of the run has the same width (32 for an all-float run), else
  ``<NA>``; ``is_baseline`` (bool): tagged ``nics_fix.baseline`` or uniform;
* every other param typed back from its string: ``"True"/"False"`` to bool,
  ``"None"``/``"null"`` to missing, integers to ``Int64``, other numbers to
  float64 (a column mixing ints and floats becomes float64), anything else
  stays a string (lists were logged comma-joined, e.g. ``model.hidden_units
  = "128,128"``, and stay strings).

If one name is both a metric and a param or tag (the platform's names do not
overlap), the metric keeps the plain name and the others get a ``param:`` or
``tag:`` prefix.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

FLOAT_BITS = 32  #: width recorded for a point logged as ``float`` (nics_fix.cost.FLOAT_BITS)

DEFAULT_HISTORY_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")

INFO_COLUMNS = ["run_id", "experiment_id", "run_name", "status", "start_time", "end_time", "duration_s"]
KEY_METRICS = ["val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_accuracy", "train_loss",
               "cost.avg_weight_bits", "cost.avg_activation_bits", "cost.total_weight_bits", "cost.bops",
               "cost.train_bops"]
INT_TAGS = ("hydra.job_num", "optuna.trial_number")
_RENAMED_TAGS = {"mlflow.parentRunId": "parent_run_id", "mlflow.source.git.commit": "git_commit"}
_INT_RE = re.compile(r"^[+-]?\d+$")
_MISSING_TEXT = {"None", "null"}


class AnalysisError(ValueError):
    """A target that cannot be read: unknown experiment or run, unreachable store."""


# ---------------------------------------------------------------- store access


def check_tracking_uri(tracking_uri: str | None) -> str:
    """The URI to use (the given one, else MLflow's current one), checked to be readable.

    * ``http(s)://`` — ``GET <uri>/health`` must answer within 5 s (MLflow's
      own client would retry for minutes);
    * ``sqlite:///path`` — the database file must exist (MLflow would create
      an empty one);
    * ``file:`` or a plain path — the folder must exist.

    Raises :class:`AnalysisError` with one line saying what is wrong.
    """
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as answer:
                answer.read()
        except urllib.error.HTTPError:
            pass  # it answered (e.g. 401 behind a proxy): let MLflow's client report what is wrong
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise AnalysisError(f"cannot reach the MLflow tracking server at {uri}: {reason}") from None
    elif uri.startswith("sqlite:"):
        path = uri[len("sqlite:"):]
        path = path[3:] if path.startswith("///") else path.lstrip("/")
        if path not in ("", ":memory:") and not Path(path).is_file():
            raise AnalysisError(f"no MLflow database at {uri}: {path} does not exist")
    elif uri.startswith("file:") or "://" not in uri:
        path = uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:")
        if not Path(path).is_dir():
            raise AnalysisError(f"no MLflow store at {uri}: {path} is not a folder")
    return uri


def client_for(tracking_uri: str | None = None):
    """An ``MlflowClient`` for a checked tracking URI (see :func:`check_tracking_uri`)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=check_tracking_uri(tracking_uri))


def _is_not_found(err) -> bool:
    code = getattr(err, "error_code", "")
    return "RESOURCE_DOES_NOT_EXIST" in str(code) or "INVALID_PARAMETER_VALUE" in str(code)


def resolve_experiment(client, experiment) -> str:
    """Experiment id for an experiment name or id; :class:`AnalysisError` if unknown."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(str(experiment))
    if exp is None and str(experiment).isdigit():
        try:
            exp = client.get_experiment(str(experiment))
        except MlflowException as err:
            if not _is_not_found(err):
                raise
            exp = None
    if exp is None:
        raise AnalysisError(f"no experiment named {experiment!r} at {client.tracking_uri}")
    return exp.experiment_id


def get_run(client, run_id: str):
    """The MLflow run, or :class:`AnalysisError` if there is none with that id."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(str(run_id))
    except MlflowException as err:
        if _is_not_found(err):
            raise AnalysisError(f"no run with id {run_id!r} at {client.tracking_uri}") from None
        raise


def search_all_runs(client, experiment_ids: Sequence[str], filter_string: str = "") -> list:
    """Every active run matching ``filter_string`` (pages of 1000 followed to the end)."""
    runs, token = [], None
    while True:
        page = client.search_runs(list(experiment_ids), filter_string=filter_string, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---------------------------------------------------------------- typing


def parse_value(text):
    """One param string back to a Python value: bool, None, int, float or the string."""
    if text is None:
        return None
    if not isinstance(text, str):
        return text
    stripped = text.strip()
    if stripped in _MISSING_TEXT or stripped == "":
        return None
    if stripped in ("True", "true"):
        return True
    if stripped in ("False", "false"):
        return False
    if _INT_RE.match(stripped):
        return int(stripped)
    try:
        number = float(stripped)
    except ValueError:
        return text
    return number


def typed_column(values: Sequence, index=None) -> pd.Series:
    """A Series of parsed values with one dtype: Int64, float64, boolean or object/str."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if present and all(isinstance(v, bool) for v in present):
        return pd.Series(values, index=index, dtype="boolean")
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pd.Series(values, index=index, dtype="Int64")
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pd.Series([np.nan if v is None else float(v) for v in values], index=index, dtype="float64")
    if not present:
        return pd.Series([None] * len(values), index=index, dtype="object")
    if all(isinstance(v, str) for v in present):
        return pd.Series(values, index=index)
    return pd.Series(values, index=index, dtype="object")


def parse_bits(text) -> int | None:
    """A ``bits.*`` param: ``"8"`` to 8, ``"float"`` to :data:`FLOAT_BITS`, missing to None."""
    if text is None:
        return None
    text = str(text).strip()
    if text == "float":
        return FLOAT_BITS
    value = parse_value(text)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def split_bits_key(key: str) -> tuple[str, str, str]:
    """``bits.<layer>.<quantity>.<direction>`` to ``(layer, quantity, direction)``.

    Layer names may contain dots (nested models); quantity and direction never do.
    """
    body = key[len("bits."):] if key.startswith("bits.") else key
    layer, quantity, direction = body.rsplit(".", 2)
    return layer, quantity, direction


def bits_columns(df: pd.DataFrame) -> list[str]:
    """The ``bits.*`` columns of a :func:`load_runs` table."""
    return [c for c in df.columns if c.startswith("bits.")]


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# ---------------------------------------------------------------- runs


def load_runs(experiment=None, parent_run_id: str | None = None, sweep_dir: str | None = None,
              tracking_uri: str | None = None, include_failed: bool = True,
              roles: Iterable[str] | None = None, filter_string: str = "") -> pd.DataFrame:
    """One row per MLflow run (columns: see the module docstring).

    Selection (all given criteria apply together):

    * ``experiment`` — an experiment name or id; default: every active experiment
      (or the parent's experiment when ``parent_run_id`` is given);
    * ``parent_run_id`` — the child runs of a search's parent run
      (``tags.mlflow.parentRunId``), not the parent itself;
    * ``sweep_dir`` — the runs of one Hydra multirun (``tags.hydra.sweep_dir``,
      as recorded: the path the job was given, usually relative);
    * ``include_failed=False`` drops FAILED and KILLED runs (RUNNING ones stay);
    * ``roles`` keeps runs whose ``nics_fix.role`` tag is one of them;
    * ``filter_string`` — any extra MLflow search filter, ANDed.

    ``tracking_uri``: a ``sqlite:///`` store, a tracking server ``http(s)://``
    URI, ...; default MLflow's current URI. Unknown experiment or run, or an
    unreachable store, raise :class:`AnalysisError`. Rows are sorted by start
    time; ``df.attrs["tracking_uri"]`` remembers the store for
    :func:`load_histories`.
    """
    client = client_for(tracking_uri)
    filters = [filter_string] if filter_string else []
    if parent_run_id is not None:
        parent = get_run(client, parent_run_id)
        filters.append(f"tags.mlflow.parentRunId = {_quote(parent.info.run_id)}")
        if experiment is None:
            experiment = parent.info.experiment_id
    if sweep_dir is not None:
        filters.append(f"tags.`hydra.sweep_dir` = {_quote(str(sweep_dir))}")
    if experiment is not None:
        experiment_ids = [resolve_experiment(client, experiment)]
    else:
        experiment_ids = [e.experiment_id for e in _all_experiments(client)]
    runs = search_all_runs(client, experiment_ids, " and ".join(filters)) if experiment_ids else []
    df = runs_to_frame(runs)
    if not include_failed and len(df):
        df = df[~df["status"].isin(["FAILED", "KILLED"])].reset_index(drop=True)
    if roles is not None and len(df):
        roles = {roles} if isinstance(roles, str) else set(roles)
        role = df["nics_fix.role"] if "nics_fix.role" in df else pd.Series([None] * len(df))
        df = df[role.isin(roles).to_numpy()].reset_index(drop=True)
    df.attrs["tracking_uri"] = client.tracking_uri
    return df


def _all_experiments(client) -> list:
    out, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def runs_to_frame(runs: Sequence) -> pd.DataFrame:
    """MLflow ``Run`` objects to the :func:`load_runs` table."""
    n = len(runs)
    if n == 0:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in INFO_COLUMNS + ["label"]})
    info = {
        "run_id": [r.info.run_id for r in runs],
        "experiment_id": [r.info.experiment_id for r in runs],
        "run_name": [r.info.run_name for r in runs],
        "status": [r.info.status for r in runs],
        "start_time": pd.to_datetime([r.info.start_time for r in runs], unit="ms", utc=True),
        "end_time": pd.to_datetime([r.info.end_time if r.info.end_time else None for r in runs],
                                   unit="ms", utc=True),
    }
    columns: dict[str, pd.Series] = {k: pd.Series(list(v)) for k, v in info.items()}
    columns["duration_s"] = (columns["end_time"] - columns["start_time"]).dt.total_seconds()

    metric_keys = sorted({k for r in runs for k in r.data.metrics})
    param_keys = sorted({k for r in runs for k in r.data.params})
    tag_keys = sorted({k for r in runs for k in r.data.tags if not k.startswith("mlflow.")})

    metrics = {k: pd.Series([r.data.metrics.get(k, np.nan) for r in runs], dtype="float64")
               for k in metric_keys}
    tags: dict[str, pd.Series] = {}
    for key, name in _RENAMED_TAGS.items():
        values = [r.data.tags.get(key) for r in runs]
        if any(v is not None for v in values):
            tags[name] = pd.Series(values)
    for key in tag_keys:
        values = [r.data.tags.get(key) for r in runs]
        if key in INT_TAGS:
            tags[key] = typed_column([parse_value(v) for v in values])
        else:
            tags[key] = pd.Series(values)

    bits = {}
    floats: list[list[str]] = [[] for _ in runs]
    for key in sorted((k for k in param_keys if k.startswith("bits.")), key=_natural_key):
        raw = [r.data.params.get(key) for r in runs]
        bits[key] = pd.Series([parse_bits(v) for v in raw], dtype="Int64")
        for i, v in enumerate(raw):
            if v is not None and str(v).strip() == "float":
                floats[i].append(key[len("bits."):])
    params = {k: typed_column([parse_value(r.data.params.get(k)) for r in runs])
              for k in param_keys if not k.startswith("bits.")}

    frame: dict[str, pd.Series] = dict(columns)
    frame["label"] = pd.Series([""] * n)
    for name, series in tags.items():
        frame[name if name not in metrics else f"tag:{name}"] = series
    ordered_metrics = [k for k in KEY_METRICS if k in metrics] + [k for k in metric_keys if k not in KEY_METRICS]
    for name in ordered_metrics:
        frame[name] = metrics[name]
    for name, series in bits.items():
        frame[name if name not in metrics else f"param:{name}"] = series
    if bits:
        frame["float_points"] = pd.Series([",".join(f) for f in floats])
        frame["uniform_bits"] = _uniform_bits(pd.DataFrame(bits))
    for name, series in params.items():
        frame[name if name not in frame else f"param:{name}"] = series
    df = pd.DataFrame(frame)
    baseline_tag = df["nics_fix.baseline"].notna() if "nics_fix.baseline" in df else pd.Series(False, index=df.index)
    uniform = df["uniform_bits"].notna() if "uniform_bits" in df else pd.Series(False, index=df.index)
    df["is_baseline"] = (baseline_tag | uniform).astype(bool)
    df["label"] = [_label(row) for row in df.to_dict("records")]
    df = df.sort_values("start_time", kind="stable").reset_index(drop=True)
    return df


def _uniform_bits(bits: pd.DataFrame) -> pd.Series:
    data_cols = [c for c in bits.columns if c.endswith(".data")]
    out = []
    for _, row in bits[data_cols].iterrows():
        values = {int(v) for v in row if not pd.isna(v)}
        out.append(values.pop() if len(values) == 1 else None)
    return pd.Series(out, dtype="Int64")


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


def _label(row: dict) -> str:
    trial = row.get("optuna.trial_number")
    if _present(trial):
        text = f"trial {int(trial)}"
        if _present(row.get("nics_fix.baseline")):
            text += f" ({row['nics_fix.baseline']})"
        return text
    choice = row.get("choice.fixed")
    job = row.get("hydra.job_num")
    if _present(choice) and _present(job):
        return f"#{int(job)} {choice}"
    if _present(choice):
        return str(choice)
    return str(row.get("run_name") or row.get("run_id", "")[:8])


# ---------------------------------------------------------------- bit allocation

#: Short names of the four quantities, in the order they are shown.
SHORT_QUANTITIES = {"weight.data": "w", "weight.grad": "gw", "activation.data": "a", "activation.grad": "ga"}


def widths_text(bits, quantities=tuple(SHORT_QUANTITIES)) -> str:
    """``dense1 w8 a6, relu1 af``: widths per layer in the order of ``bits`` (``{"<layer>.<quantity>.<dir>": bits}``).

    ``w``/``a``: weight/activation data, ``gw``/``ga``: their gradients; ``f``: float (None or 32).
    """
    per_layer: dict[str, list[tuple[int, str]]] = {}
    for key, value in bits.items():
        layer, quantity, direction = str(key).rsplit(".", 2)
        name = f"{quantity}.{direction}"
        if name in quantities and name in SHORT_QUANTITIES:
            width = "f" if value is None or int(value) == FLOAT_BITS else str(int(value))
            per_layer.setdefault(layer, []).append((list(SHORT_QUANTITIES).index(name), SHORT_QUANTITIES[name] + width))
    return ", ".join(f"{layer} {' '.join(label for _, label in sorted(parts))}" for layer, parts in per_layer.items())



def bit_allocation(df: pd.DataFrame, tidy: bool = False, columns: str = "label",
                   layer_order: Sequence[str] | None = None, drop_all_float: bool = False) -> pd.DataFrame:
    """The per-point bit widths of the runs in ``df``.

    Default: a matrix with one row per quantization point — a
    ``(layer, quantity, direction)`` MultiIndex — and one column per run
    (named by ``df[columns]``: ``"label"`` or ``"run_id"``), values ``Int64``
    with float points as :data:`FLOAT_BITS`. Layers are ordered by
    ``layer_order`` if given (e.g. :func:`layer_order_of_run`), else
    naturally by name (``dense2`` before ``dense10``); within a layer weight
    before activation, data before grad. ``drop_all_float`` drops points that
    are float in every run.

    ``tidy=True``: long format, one row per (run, point): ``run_id``,
    ``label``, ``layer``, ``quantity``, ``direction``, ``bits``, ``is_float``.
    """
    cols = bits_columns(df)
    rows = []
    for _, run in df.iterrows():
        floats = set(str(run.get("float_points") or "").split(",")) - {""}
        for col in cols:
            layer, quantity, direction = split_bits_key(col)
            value = run[col]
            rows.append({"run_id": run["run_id"], "label": run.get("label", run["run_id"]), "layer": layer,
                         "quantity": quantity, "direction": direction,
                         "bits": value, "is_float": col[len("bits."):] in floats})
    tidy_df = pd.DataFrame(rows, columns=["run_id", "label", "layer", "quantity", "direction", "bits", "is_float"])
    tidy_df["bits"] = tidy_df["bits"].astype("Int64")
    tidy_df["is_float"] = tidy_df["is_float"].astype(bool)
    if drop_all_float and len(tidy_df):
        quantized = tidy_df.groupby(["layer", "quantity", "direction"])["is_float"].transform("all")
        tidy_df = tidy_df[~quantized.astype(bool)]
    tidy_df = tidy_df.dropna(subset=["bits"])
    order = {name: i for i, name in enumerate(layer_order or [])}
    quantity_rank = {"weight": 0, "activation": 1}
    direction_rank = {"data": 0, "grad": 1, "storage": 2}

    def sort_key(layer, quantity, direction):
        return ((0, order[layer]) if layer in order else (1, _natural_key(layer)),
                quantity_rank.get(quantity, 9), direction_rank.get(direction, 9))

    if tidy:
        points = sorted(set(zip(tidy_df["layer"], tidy_df["quantity"], tidy_df["direction"])),
                        key=lambda k: sort_key(*k))
        point_rank = {k: i for i, k in enumerate(points)}
        run_rank = {r: i for i, r in enumerate(df["run_id"])}
        tidy_df = tidy_df.assign(
            _r=tidy_df["run_id"].map(run_rank),
            _p=[point_rank[k] for k in zip(tidy_df["layer"], tidy_df["quantity"], tidy_df["direction"])])
        return tidy_df.sort_values(["_r", "_p"]).drop(columns=["_r", "_p"]).reset_index(drop=True)
    name_of = run_names(df, columns)
    matrix = tidy_df.pivot_table(index=["layer", "quantity", "direction"], columns="run_id", values="bits",
                                 aggfunc="first")
    points = sorted(matrix.index, key=lambda k: sort_key(*k))
    run_order = [r for r in df["run_id"] if r in matrix.columns]
    matrix = matrix.loc[points, run_order].astype("Int64")
    matrix.columns = [name_of[r] for r in run_order]
    matrix.columns.name = "run"
    return matrix


def run_names(df: pd.DataFrame, column: str = "label") -> dict[str, str]:
    """``{run_id: name}`` from ``df[column]``, made unique with a run id prefix where names repeat."""
    names = df[column].astype(str).tolist() if column in df else df["run_id"].tolist()
    if len(set(names)) < len(names):
        names = [f"{n} [{rid[:6]}]" for n, rid in zip(names, df["run_id"])]
    return dict(zip(df["run_id"], names))


def layer_order_of_run(run_id: str, tracking_uri: str | None = None) -> list[str]:
    """Layer names in model order, from the run's ``config/fixed_config.yaml`` artifact.

    The resolved config lists ``by_name`` layers in model order; ``bits.*``
    params come back from MLflow sorted by name. Empty list if unreadable.
    """
    import tempfile

    import yaml

    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        from mlflow.artifacts import download_artifacts

        with tempfile.TemporaryDirectory() as tmp:
            path = download_artifacts(run_id=run_id, artifact_path="config/fixed_config.yaml", dst_path=tmp,
                                      tracking_uri=check_tracking_uri(tracking_uri))
            data = yaml.safe_load(Path(path).read_text()) or {}
        return [str(k) for k in (data.get("by_name") or {})]
    except Exception:  # noqa: BLE001 - missing artifact or store: fall back to name order
        return []
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------- histories


def load_histories(runs, metrics: Iterable[str] = DEFAULT_HISTORY_METRICS,
                   tracking_uri: str | None = None) -> pd.DataFrame:
    """Per-step metric histories in long format: ``run_id``, ``metric``, ``step``, ``value``.

    ``runs``: a :func:`load_runs` table (its ``attrs["tracking_uri"]`` is used
    unless ``tracking_uri`` is given) or run ids. ``metrics``: names or glob
    patterns (``"scale.*"``); a pattern is matched against the table's metric
    columns (so it needs a table, not bare run ids). Rows are sorted by run
    (in the table's order), metric, step; one value per step (the last logged
    if a step was logged twice). One ``get_metric_history`` call per (run,
    metric).
    """
    if isinstance(runs, pd.DataFrame):
        run_ids = runs["run_id"].tolist()
        tracking_uri = tracking_uri or runs.attrs.get("tracking_uri")
        known = [c for c in runs.columns if runs[c].dtype == "float64"]
    else:
        run_ids = [runs] if isinstance(runs, str) else list(runs)
        known = []
    if isinstance(metrics, str):
        metrics = [metrics]
    names: list[str] = []
    for m in metrics:
        if any(ch in m for ch in "*?["):
            names.extend(k for k in known if fnmatch.fnmatchcase(k, m) and k not in names)
        elif m not in names:
            names.append(m)
    client = client_for(tracking_uri)
    rows = []
    for rank, run_id in enumerate(run_ids):
        for name in names:
            history = client.get_metric_history(run_id, name)
            for point in sorted(history, key=lambda p: (p.step, p.timestamp)):
                rows.append((rank, run_id, name, int(point.step), float(point.value)))
    out = pd.DataFrame(rows, columns=["_rank", "run_id", "metric", "step", "value"])
    out = out.drop_duplicates(subset=["run_id", "metric", "step"], keep="last")
    metric_rank = {n: i for i, n in enumerate(names)}
    out = out.assign(_m=out["metric"].map(metric_rank)).sort_values(["_rank", "_m", "step"], kind="stable")
    out = out.drop(columns=["_rank", "_m"]).reset_index(drop=True)
    out["step"] = out["step"].astype("int64")
    out["value"] = out["value"].astype("float64")
    return out


__all__ = [
    "AnalysisError", "FLOAT_BITS", "DEFAULT_HISTORY_METRICS", "load_runs", "load_histories", "bit_allocation",
    "bits_columns", "split_bits_key", "parse_value", "parse_bits", "check_tracking_uri", "client_for",
    "layer_order_of_run", "runs_to_frame",
]
