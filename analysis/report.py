"""A report folder for an experiment or a search: tables, plots and CSVs.

    python -m analysis.report <experiment name | parent run id> [--tracking-uri URI] [--out DIR]
                              [--log-to-mlflow] [--maximize COL] [--minimize COL] [--top N]
                              [--reference MAX_REF MIN_REF]

Writes ``DIR`` (default ``reports/<target>``):

* ``report.md`` — selection and counts, failed runs, top runs, the Pareto
  front with its hypervolume and bit allocations, per-layer sensitivity (when
  the runs contain one-layer variants of a baseline), plots embedded by
  relative links;
* ``pareto.png``, ``allocation.png``, ``learning_curves.png``,
  ``scales_<run>.png``;
* ``runs.csv`` (every column of :func:`analysis.load_runs`), ``pareto.csv``,
  ``histories.csv`` (long format, with labels), ``sensitivity.csv`` if any.

Target: an experiment name (or id) reports its train/trial runs (runs tagged
``nics_fix.role`` search, eval or report are left out); a run id reports the
child runs of that (search parent) run. ``--log-to-mlflow`` logs the folder as
artifact ``report/`` of the parent run, or for an experiment of a new run
tagged ``nics_fix.role=report``. Errors (unknown experiment or run,
unreachable store) print one ``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.pareto import hypervolume, pareto_front
from analysis.plots import plot_bit_allocation, plot_learning_curves, plot_pareto, plot_scales
from analysis.runs import (
    DEFAULT_HISTORY_METRICS,
    FLOAT_BITS,
    AnalysisError,
    bit_allocation,
    bits_columns,
    client_for,
    get_run,
    layer_order_of_run,
    load_histories,
    load_runs,
    resolve_experiment,
    run_names,
)
from analysis.runs import widths_text
from analysis.sensitivity import layer_sensitivity

EXCLUDED_ROLES = ("search", "eval", "report")
TABLE_METRICS = ["val_accuracy", "test_accuracy", "cost.avg_weight_bits", "cost.avg_activation_bits",
                 "cost.total_weight_bits", "cost.bops", "cost.train_bops"]
#: ``search.cost`` param of a search's parent run -> the cost column it minimizes (experiments/searching.py)
SEARCH_COSTS = {"weight_bits": "cost.total_weight_bits", "bops": "cost.bops", "train_bops": "cost.train_bops"}
MAX_CURVES = 10
MAX_SCALE_PLOTS = 2


@dataclass
class Target:
    kind: str  # "experiment" or "parent"
    experiment_id: str
    name: str  # experiment name, or parent run id
    parent_run_id: str | None = None


@dataclass
class Report:
    path: Path
    runs: pd.DataFrame
    front: pd.DataFrame
    hypervolume: float
    files: list[str]
    logged_to_run: str | None = None


# ---------------------------------------------------------------- target


def resolve_target(client, target: str) -> Target:
    """An experiment (by name, then id) or a parent run id; :class:`AnalysisError` if neither."""
    exp = client.get_experiment_by_name(target)
    if exp is not None:
        return Target("experiment", exp.experiment_id, exp.name)
    if re.fullmatch(r"[0-9a-fA-F]{32}", target):
        run = get_run(client, target)
        return Target("parent", run.info.experiment_id, target, parent_run_id=run.info.run_id)
    if target.isdigit():
        try:
            exp_id = resolve_experiment(client, target)
            return Target("experiment", exp_id, client.get_experiment(exp_id).name)
        except AnalysisError:
            pass
    raise AnalysisError(f"no experiment named {target!r} and no run with id {target!r} at {client.tracking_uri}")


def select_runs(client, target: str) -> tuple[Target, pd.DataFrame, str]:
    """The target, the runs a report on it covers, and a sentence saying which."""
    uri = client.tracking_uri
    tgt = resolve_target(client, target)
    if tgt.kind == "parent":
        study = client.get_run(tgt.parent_run_id).data.tags.get("optuna.study_name")
        runs = load_runs(parent_run_id=tgt.parent_run_id, tracking_uri=uri)
        selection = f"child runs of parent run `{tgt.parent_run_id}` (experiment {tgt.experiment_id})"
        if study:  # a search resumed or run by several workers: every invocation's trials
            everything = load_runs(tgt.experiment_id, tracking_uri=uri)
            if {"optuna.study_name", "nics_fix.role"} <= set(everything.columns):
                runs = everything[(everything["optuna.study_name"] == study)
                                  & (everything["nics_fix.role"] == "trial")].reset_index(drop=True)
                selection = (f"every trial run of study `{study}` (all its search runs, experiment "
                             f"{tgt.experiment_id}), found from parent run `{tgt.parent_run_id}`")
        if not len(runs):
            raise AnalysisError(f"run {target} has no child runs (give a search's parent run, or an experiment name)")
    else:
        runs = load_runs(tgt.experiment_id, tracking_uri=uri)
        if "nics_fix.role" in runs.columns and len(runs):
            runs = runs[~runs["nics_fix.role"].isin(EXCLUDED_ROLES)].reset_index(drop=True)
        if not len(runs):
            raise AnalysisError(f"experiment {tgt.name!r} has no train or trial runs at {uri}")
        selection = f"experiment `{tgt.name}` (id {tgt.experiment_id}), roles other than {', '.join(EXCLUDED_ROLES)}"
    _one_model_and_dataset(runs)
    runs.attrs["tracking_uri"] = uri
    return tgt, runs, selection


def _one_model_and_dataset(runs: pd.DataFrame) -> None:
    """Runs of different models or datasets are not one front: refuse, saying what is mixed."""
    columns = [c for c in ("model.name", "data.name") if c in runs.columns]
    if not columns:
        return
    kinds = sorted({"/".join(str(v) for v in row) for row in runs[columns].dropna().itertuples(index=False)})
    if len(kinds) > 1:
        raise AnalysisError(f"the runs are of {len(kinds)} models/datasets ({', '.join(kinds)}): one Pareto front "
                            "would mix them. Report one at a time: train each model/dataset into its own "
                            "experiment (mlflow.experiment_name=...), or give a search's parent run")


def default_minimize(client, tgt: Target) -> str:
    """The search's cost column for a parent run with a ``search.cost`` param, else ``cost.avg_weight_bits``."""
    if tgt.kind == "parent":
        search_cost = get_run(client, tgt.parent_run_id).data.params.get("search.cost")
        return SEARCH_COSTS.get(str(search_cost), "cost.avg_weight_bits")
    return "cost.avg_weight_bits"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "report"


# ---------------------------------------------------------------- markdown


def _fmt(value, column: str = "") -> str:
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if "accuracy" in column or column.endswith("loss") or column in ("delta", "delta_std") \
                or column.startswith("baseline_"):
            return f"{value:.4f}"
        if column.endswith("bops") or column.endswith("total_weight_bits"):
            return f"{value:,.0f}"
        if column.endswith("_bits") or column == "hypervolume":
            return f"{value:.2f}"
        return f"{value:.4g}"
    return str(value)


def markdown_table(df: pd.DataFrame, index: bool = False) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency); ``|`` in cells escaped."""
    frame = df.reset_index() if index else df
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
             "| " + " | ".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---"
                               for c in frame.columns) + " |"]
    for _, row in frame.iterrows():
        cells = [_fmt(row[c], str(c)).replace("|", "\\|").replace("\n", " ") for c in frame.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bits_text(row: pd.Series) -> str:
    """A run's recorded widths per layer (its ``bits.*`` params), as :func:`analysis.runs.widths_text` writes them."""
    bits = {}
    for column in row.index:
        if str(column).startswith("bits.") and not pd.isna(row[column]):
            value = str(row[column])
            bits[str(column)[len("bits."):]] = None if value == "float" else int(float(value))
    return widths_text(bits)


def why_not_finished(failed: pd.DataFrame) -> pd.Series:
    """Why each run did not finish: its error, why it was pruned, infeasible or closed (first tag present)."""
    why = pd.Series("", index=failed.index, dtype="object")
    for tag, prefix in (("error", ""), ("nics_fix.pruned", "pruned: "), ("nics_fix.infeasible", "infeasible: "),
                        ("nics_fix.closed_as_stale", "closed: ")):
        if tag in failed.columns:
            given = failed[tag].notna() & (why == "")
            why[given] = prefix + failed.loc[given, tag].astype(str)
    return why.astype(str)


def _run_table(df: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    cols = ["label", "run_id", "status"] + [m for m in metrics if m in df.columns]
    if "uniform_bits" in df.columns:
        cols.append("uniform_bits")
    table = df[cols].copy()
    table["label"] = table["run_id"].map(run_names(df))  # duplicate labels get their run id prefix
    table["run_id"] = table["run_id"].str[:8]
    return table.rename(columns={"run_id": "run"})


def _allocation_table(front: pd.DataFrame, layer_order) -> pd.DataFrame:
    if not bits_columns(front) or not len(front):
        return pd.DataFrame()
    drop = bool(len(bit_allocation(front, tidy=True, drop_all_float=True)))
    tidy = bit_allocation(front, tidy=True, layer_order=layer_order, drop_all_float=drop)
    matrix = bit_allocation(front, columns="run_id", layer_order=layer_order, drop_all_float=drop)
    names = run_names(front)
    matrix.columns = [names[r] for r in matrix.columns]
    text = matrix.astype("object").map(lambda v: "" if v is None or v is pd.NA else str(v))
    text.index = [".".join(p) for p in text.index]
    text.index.name = "point"
    for run_id, layer, q, d, is_float in zip(tidy["run_id"], tidy["layer"], tidy["quantity"], tidy["direction"],
                                             tidy["is_float"]):
        if is_float:
            text.loc[f"{layer}.{q}.{d}", names[run_id]] = "float"
    return text


# ---------------------------------------------------------------- report


def build_report(target: str, tracking_uri: str | None = None, out: str | Path | None = None,
                 log_to_mlflow: bool = False, maximize: str = "val_accuracy",
                 minimize: str | None = None, top: int = 10,
                 reference: Sequence[float] | None = None) -> Report:
    """Write the report folder for ``target`` (see the module docstring) and return what it holds.

    ``minimize`` defaults to the search's cost (parent param ``search.cost``:
    weight_bits, bops or train_bops) for a parent run, else
    ``cost.avg_weight_bits``.
    """
    client = client_for(tracking_uri)
    uri = client.tracking_uri
    tgt, runs, selection = select_runs(client, target)
    minimize = minimize or default_minimize(client, tgt)
    for column in (maximize, minimize):
        if column not in runs.columns:
            numeric = [c for c in runs.columns if runs[c].dtype == "float64" and not c.startswith("scale.")]
            raise AnalysisError(f"no run has {column!r}; numeric columns: {', '.join(numeric[:15])}")

    folder = Path(out) if out else Path("reports") / _safe_name(tgt.name)
    folder.mkdir(parents=True, exist_ok=True)
    finished = runs[runs["status"] == "FINISHED"]
    front = pareto_front(runs, maximize, minimize)
    if reference is None:
        ref_min = float(FLOAT_BITS) if minimize.endswith("_bits") and "total" not in minimize \
            else float(finished[minimize].max()) * 1.1 if len(finished) else 1.0
        reference = (0.0, ref_min)
    hv = hypervolume(runs, maximize, minimize, reference=reference)
    layer_order = _layer_order(finished, uri)

    # histories: the standard curves for every run, scales for the runs plotted
    histories = load_histories(runs, DEFAULT_HISTORY_METRICS, tracking_uri=uri)
    scale_runs = _scale_runs(front, maximize, minimize)
    if scale_runs:
        scales = load_histories(runs[runs["run_id"].isin(scale_runs)], ["scale.*"], tracking_uri=uri)
        histories = pd.concat([histories, scales], ignore_index=True)
    labels = dict(zip(runs["run_id"], runs["label"]))
    histories.insert(1, "label", histories["run_id"].map(labels))

    files = []
    plots = {}
    plots["pareto"] = plot_pareto(runs, folder / "pareto.png", maximize, minimize).path.name
    if len(front) and bits_columns(front):
        plots["allocation"] = plot_bit_allocation(front, folder / "allocation.png", layer_order=layer_order).path.name
    curve_ids = _curve_runs(runs, front, maximize)
    if len(histories):
        plots["curves"] = plot_learning_curves(histories, runs, folder / "learning_curves.png", run_ids=curve_ids,
                                               title=f"Learning curves: Pareto-front and baseline runs "
                                                     f"({len(curve_ids)})").path.name
    scale_pngs = []
    for run_id in scale_runs:
        name = f"scales_{_safe_name(labels[run_id])}_{run_id[:8]}.png"
        scale_pngs.append((run_id, plot_scales(histories, runs, run_id, folder / name,
                                               layer_order=layer_order).path.name))
    files += list(plots.values()) + [p for _, p in scale_pngs]

    sensitivity = layer_sensitivity(runs, metric=maximize, layer_order=layer_order)
    runs.to_csv(folder / "runs.csv", index=False)
    pareto_cols = ["run_id", "label", "status", maximize, minimize] + \
        [c for c in TABLE_METRICS if c not in (maximize, minimize) and c in front.columns] + bits_columns(front)
    front[pareto_cols].to_csv(folder / "pareto.csv", index=False)
    histories.to_csv(folder / "histories.csv", index=False)
    files += ["runs.csv", "pareto.csv", "histories.csv"]
    if len(sensitivity):
        sensitivity.to_csv(folder / "sensitivity.csv", index=False)
        files.append("sensitivity.csv")

    text = _markdown(tgt, uri, selection, runs, front, hv, reference, maximize, minimize, top, layer_order,
                     sensitivity, plots, scale_pngs, labels, files)
    (folder / "report.md").write_text(text)
    files.insert(0, "report.md")

    report = Report(folder, runs, front, hv, files)
    if log_to_mlflow:
        report.logged_to_run = _log_report(client, tgt, folder)
    return report


def _layer_order(finished: pd.DataFrame, uri: str) -> list[str]:
    """Model layer order from the resolved fixed config of a quantized run (an all-float run lists none)."""
    if not len(finished):
        return []
    n_float = finished["float_points"].fillna("").map(lambda s: s.count(",") + 1 if s else 0) \
        if "float_points" in finished.columns else pd.Series(0, index=finished.index)
    for run_id in finished.assign(_n=n_float).sort_values("_n", kind="stable")["run_id"].head(3):
        order = layer_order_of_run(run_id, uri)
        if order:
            return order
    return []


def _scale_runs(front: pd.DataFrame, maximize: str, minimize: str) -> list[str]:
    """Up to two front runs with quantized points: the most accurate and the cheapest."""
    if not len(front):
        return []
    quantized = front
    if "float_points" in front.columns and bits_columns(front):
        n_points = len(bits_columns(front))
        quantized = front[front["float_points"].fillna("").map(lambda s: len([p for p in s.split(",") if p]))
                          < n_points]
    if not len(quantized):
        quantized = front
    best = quantized.sort_values(maximize, ascending=False, kind="stable")["run_id"].iloc[0]
    cheapest = quantized.sort_values(minimize, kind="stable")["run_id"].iloc[0]
    return list(dict.fromkeys([best, cheapest]))[:MAX_SCALE_PLOTS]


def _curve_runs(runs: pd.DataFrame, front: pd.DataFrame, maximize: str) -> list[str]:
    chosen = list(front["run_id"])
    if "is_baseline" in runs.columns:
        chosen += list(runs[runs["is_baseline"] & (runs["status"] == "FINISHED")]["run_id"])
    chosen = list(dict.fromkeys(chosen))
    if len(chosen) > MAX_CURVES:
        ranked = runs.set_index("run_id").loc[chosen].sort_values(maximize, ascending=False)
        chosen = list(ranked.index[:MAX_CURVES])
    order = {r: i for i, r in enumerate(runs["run_id"])}
    return sorted(chosen, key=order.get)


def _markdown(tgt, uri, selection, runs, front, hv, reference, maximize, minimize, top, layer_order, sensitivity,
              plots, scale_pngs, labels, files) -> str:
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    counts = runs["status"].value_counts()
    status_text = ", ".join(f"{n} {s}" for s, n in counts.items())
    what = f"search `{tgt.parent_run_id}`" if tgt.kind == "parent" else f"experiment `{tgt.name}`"
    lines = [
        f"# Report: {what}",
        "",
        f"- Tracking store: `{uri}`",
        f"- Selection: {selection}",
        f"- Runs: {len(runs)} ({status_text})",
        f"- Objective: maximize `{maximize}`, minimize `{minimize}`",
        f"- Generated: {now} by `python -m analysis.report`",
        "",
    ]
    failed = runs[runs["status"] != "FINISHED"]
    if len(failed):
        lines += ["## Runs that did not finish", "",
                  "FAILED: an error (its `error` tag); KILLED: stopped, e.g. a pruned or over-budget search trial; "
                  "RUNNING: still running or its process died. None of them count in the tables below.", ""]
        table = failed[["label", "run_id", "status"]].copy()
        table["run_id"] = table["run_id"].str[:8]
        table["why"] = why_not_finished(failed).str.slice(0, 160)
        lines += [markdown_table(table.rename(columns={"run_id": "run"})), ""]

    ranked = runs[runs["status"] == "FINISHED"].sort_values(maximize, ascending=False, kind="stable")
    metrics = [maximize] + [m for m in TABLE_METRICS if m != maximize]
    lines += [f"## Top runs by `{maximize}`", "",
              f"The {min(top, len(ranked))} best of {len(ranked)} finished runs. `uniform_bits`: the common width "
              f"of all data points (32 = float) where the run is uniform.", "",
              markdown_table(_run_table(ranked.head(top), metrics)), ""]

    lines += ["## Pareto front", "",
              f"{len(front)} non-dominated runs (higher `{maximize}`, lower `{minimize}`), cheapest first. "
              f"Hypervolume with reference ({_fmt(float(reference[0]), maximize)}, "
              f"{_fmt(float(reference[1]), minimize)}): **{hv:.4f}** (the area the front dominates up to the "
              f"reference, in `{maximize}` x `{minimize}` units, not normalised: the convention of the search's "
              f"summary too, `analysis.pareto.hypervolume_points`).", "",
              markdown_table(_run_table(front, [maximize, minimize] +
                                        [m for m in TABLE_METRICS if m not in (maximize, minimize)])), ""]
    allocation = _allocation_table(front, layer_order)
    if len(allocation):
        lines += ["### Bit allocation of the Pareto runs", "",
                  "Bits per quantization point (`layer.quantity.direction`; `float` = not quantized). "
                  "Points that are float in every front run are left out.", "",
                  markdown_table(allocation, index=True), ""]
    lines += [f"![{maximize} vs {minimize}]({plots['pareto']})", ""]
    if "allocation" in plots:
        lines += [f"![bit allocation of the Pareto runs]({plots['allocation']})", ""]

    if len(sensitivity):
        base = sensitivity["baseline_run_id"].iloc[0]
        table = sensitivity.drop(columns=["run_ids", "baseline_run_id"])
        lines += ["## Per-layer sensitivity", "",
                  f"Change of `{maximize}` when only one layer's bits differ from the baseline run "
                  f"{labels.get(base, base)} (`{base[:8]}`; its own bits, which its label may not tell: "
                  f"{bits_text(runs[runs['run_id'] == base].iloc[0]) or 'none recorded'}); other bits and the "
                  "data/model/trainer params equal.",
                  "", markdown_table(table), ""]

    if "curves" in plots:
        lines += ["## Learning curves", "", f"![learning curves]({plots['curves']})", ""]
    if scale_pngs:
        lines += ["## Scale trajectories", "",
                  "Power-of-two scale of every quantized point at the end of each epoch "
                  "(float points are left out).", ""]
        for run_id, png in scale_pngs:
            lines += [f"![scales of {labels.get(run_id, run_id)}]({png})", ""]
    lines += ["## Files", ""] + [f"- [{f}]({f})" for f in files] + [""]
    return "\n".join(lines)


def _log_report(client, tgt: Target, folder: Path) -> str:
    if tgt.kind == "parent":
        client.log_artifacts(tgt.parent_run_id, str(folder), "report")
        return tgt.parent_run_id
    run = client.create_run(tgt.experiment_id, run_name=f"report {tgt.name}",
                            tags={"nics_fix.role": "report", "nics_fix.report_of": tgt.name})
    try:
        client.log_artifacts(run.info.run_id, str(folder), "report")
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report",
                                     description="Write a report folder (report.md, plots, CSVs) for an MLflow "
                                                 "experiment or a search's parent run.")
    parser.add_argument("target", help="experiment name (or id), or the run id of a search's parent run")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (sqlite:///path/mlflow.db, http://host:5000); "
                             "default: MLFLOW_TRACKING_URI or MLflow's default")
    parser.add_argument("--out", default=None, help="report folder (default reports/<target>)")
    parser.add_argument("--log-to-mlflow", action="store_true",
                        help="log the folder as artifact report/ of the parent run (or of a new report run)")
    parser.add_argument("--maximize", default="val_accuracy", help="column to maximize (default val_accuracy)")
    parser.add_argument("--minimize", default=None,
                        help="column to minimize (default: a search's cost for a parent run, "
                             "else cost.avg_weight_bits)")
    parser.add_argument("--top", type=int, default=10, help="rows in the top-runs table (default 10)")
    parser.add_argument("--reference", type=float, nargs=2, metavar=("MAX_REF", "MIN_REF"), default=None,
                        help="hypervolume reference point (default 0 and 32 bits for bit widths, "
                             "else 1.1 x the largest cost)")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        report = build_report(args.target, tracking_uri=args.tracking_uri, out=args.out,
                              log_to_mlflow=args.log_to_mlflow, maximize=args.maximize, minimize=args.minimize,
                              top=args.top, reference=args.reference)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:
        print(f"error: MLflow: {str(err.message).splitlines()[0] if err.message else err}", file=sys.stderr)
        return 2
    print(f"report: {report.path / 'report.md'} ({len(report.runs)} runs, {len(report.front)} on the Pareto front)")
    if report.logged_to_run:
        print(f"logged to MLflow run {report.logged_to_run} as artifact report/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
