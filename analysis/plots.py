"""Plots of a run table (PNG, matplotlib without pyplot: no global backend state).

Each function writes one PNG and returns a :class:`PlotResult`
``(path, figure, axes)`` — unpackable as a tuple — so callers and tests can
look at titles and labels. Figures are ``matplotlib.figure.Figure`` objects
rendered with the Agg canvas; nothing is shown on screen and importing this
module does not change matplotlib's backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from analysis.pareto import pareto_front
from analysis.runs import FLOAT_BITS, bit_allocation, run_names

#: Axis labels with units for the platform's metric names.
AXIS_LABELS = {
    "val_accuracy": "validation accuracy (fraction correct)",
    "test_accuracy": "test accuracy (fraction correct)",
    "train_accuracy": "training accuracy (fraction correct)",
    "val_loss": "validation loss (cross-entropy, nats)",
    "test_loss": "test loss (cross-entropy, nats)",
    "train_loss": "training loss (cross-entropy, nats)",
    "cost.avg_weight_bits": "average weight width (bits per weight)",
    "cost.avg_activation_bits": "average activation width (bits per value)",
    "cost.total_weight_bits": "total weight storage (bits)",
    "cost.bops": "inference cost (bit operations per example)",
    "cost.train_bops": "training cost (bit operations per example)",
}

SHORT_NAMES = {
    "val_accuracy": "Validation accuracy", "test_accuracy": "Test accuracy", "train_accuracy": "Training accuracy",
    "val_loss": "Validation loss", "test_loss": "Test loss", "train_loss": "Training loss",
    "cost.avg_weight_bits": "average weight bits", "cost.avg_activation_bits": "average activation bits",
    "cost.total_weight_bits": "total weight bits", "cost.bops": "inference BOPs", "cost.train_bops": "training BOPs",
}


class PlotResult(NamedTuple):
    path: Path
    figure: Figure
    axes: Any  # one Axes, or a list of Axes for multi-panel figures


def axis_label(column: str) -> str:
    """The axis label (with unit) for a column; the column name if unknown."""
    return AXIS_LABELS.get(column, column)


def short_name(column: str) -> str:
    return SHORT_NAMES.get(column, column)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path, axes) -> PlotResult:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return PlotResult(path, fig, axes)


def _labels(df: pd.DataFrame) -> dict[str, str]:
    if "label" in df.columns:
        return dict(zip(df["run_id"], df["label"].astype(str)))
    return {r: r[:8] for r in df["run_id"]}


# ---------------------------------------------------------------- accuracy vs cost


def plot_pareto(df: pd.DataFrame, path, maximize: str = "val_accuracy", minimize: str = "cost.avg_weight_bits",
                title: str | None = None, annotate: bool = True) -> PlotResult:
    """Scatter of every finished run, the Pareto front highlighted, uniform baselines marked.

    Baselines are rows with ``is_baseline`` (tagged ``nics_fix.baseline`` or
    uniform width, see :func:`analysis.load_runs`). The front is drawn as its
    attainment staircase. Only front points are annotated with their
    ``label`` (stacked where they coincide); the legend sits right of the axes.
    """
    runs = df[df["status"] == "FINISHED"] if "status" in df.columns else df
    runs = runs[runs[maximize].notna() & runs[minimize].notna()]
    front = pareto_front(runs, maximize, minimize)
    fig = _new_figure(7.5, 5.0)
    ax = fig.add_subplot()
    ax.scatter(runs[minimize], runs[maximize], s=30, color="0.6", alpha=0.8, label=f"run ({len(runs)})", zorder=2)
    if len(front):
        xs, ys = front[minimize].to_numpy(float), front[maximize].to_numpy(float)
        ax.step(xs, ys, where="post", color="tab:red", linewidth=1.5, zorder=3)
        ax.scatter(xs, ys, s=60, color="tab:red", edgecolor="black", linewidth=0.6,
                   label=f"Pareto front ({len(front)})", zorder=4)
    base = runs[runs["is_baseline"].astype(bool)] if "is_baseline" in runs.columns else runs.iloc[:0]
    if len(base):
        ax.scatter(base[minimize], base[maximize], s=150, marker="s", facecolor="none", edgecolor="tab:blue",
                   linewidth=1.5, label=f"uniform-width baseline ({len(base)})", zorder=5)
    if annotate:
        labels = _labels(runs)
        shown = front.drop_duplicates(subset="run_id")  # only the front: other labels would pile up
        placed: dict[tuple, int] = {}
        for _, row in shown.iterrows():
            key = (round(float(row[minimize]), 6), round(float(row[maximize]), 6))
            k = placed.get(key, 0)
            placed[key] = k + 1
            ax.annotate(labels[row["run_id"]], (row[minimize], row[maximize]), xytext=(6, 6 - 11 * k),
                        textcoords="offset points", fontsize=8, zorder=6)
    values = runs[minimize].to_numpy(float)
    if len(values) and values.min() > 0 and values.max() / values.min() > 100:
        ax.set_xscale("log")
    ax.margins(x=0.08, y=0.08)
    ax.set_xlabel(axis_label(minimize))
    ax.set_ylabel(axis_label(maximize))
    ax.set_title(title or f"{short_name(maximize)} vs {short_name(minimize)}: "
                          f"{len(runs)} runs, {len(front)} on the Pareto front")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)  # off the data
    return _save(fig, path, ax)


# ---------------------------------------------------------------- bit allocation heatmap


def plot_bit_allocation(df: pd.DataFrame, path, title: str | None = None,
                        layer_order: Sequence[str] | None = None) -> PlotResult:
    """Heatmap of bit widths: quantization points (rows) x runs (columns), each cell annotated.

    Pass the runs to show (e.g. the Pareto front, in its order). Points float in
    every run are left out (unless all are); float cells are grey and read
    ``float``.
    """
    drop = bool(bit_allocation(df, tidy=True, drop_all_float=True).shape[0])
    tidy = bit_allocation(df, tidy=True, layer_order=layer_order, drop_all_float=drop)
    matrix = bit_allocation(df, columns="run_id", layer_order=layer_order, drop_all_float=drop)
    floats = {(r, (layer, q, d)): f for r, layer, q, d, f in
              zip(tidy["run_id"], tidy["layer"], tidy["quantity"], tidy["direction"], tidy["is_float"])}
    float_mask = np.array([[floats.get((r, p), False) for r in matrix.columns] for p in matrix.index],
                          dtype=bool).reshape(matrix.shape)
    labels = run_names(df)
    values = matrix.to_numpy(dtype="float64", na_value=np.nan)
    shown = np.ma.masked_array(values, mask=float_mask | np.isnan(values))
    n_rows, n_cols = values.shape
    fig = _new_figure(max(6.0, 2.5 + 0.9 * n_cols), max(4.5, 1.6 + 0.34 * n_rows))
    ax = fig.add_subplot()
    finite = values[~(float_mask | np.isnan(values))]
    vmin, vmax = (finite.min(), finite.max()) if finite.size else (1, FLOAT_BITS)
    cmap = _cmap()
    image = ax.imshow(shown, aspect="auto", cmap=cmap, vmin=min(vmin, vmax - 1), vmax=vmax)
    for i in range(n_rows):
        for j in range(n_cols):
            if float_mask[i, j]:
                text, color = "float", "0.25"
            elif np.isnan(values[i, j]):
                text, color = "–", "0.25"
            else:
                text = str(int(values[i, j]))
                color = "white" if (values[i, j] - vmin) < 0.5 * max(vmax - vmin, 1) else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(n_cols), [labels.get(r, r[:8]) for r in matrix.columns], rotation=30, ha="right",
                  fontsize=8)
    ax.set_yticks(range(n_rows), [".".join(p) for p in matrix.index], fontsize=8)
    ax.set_xlabel("run (Pareto front, cheapest first)")
    ax.set_ylabel("quantization point (layer.quantity.direction)")
    ax.set_title(title or "Per-layer bit allocation of the Pareto-front runs")
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
    distinct = np.unique(finite)
    if 0 < len(distinct) <= 4:
        colorbar.set_ticks(distinct, labels=[str(int(v)) for v in distinct])
    else:
        colorbar.locator = MaxNLocator(integer=True)
        colorbar.update_ticks()
    colorbar.set_label("bit width (bits; grey = float)")
    return _save(fig, path, ax)


def _cmap():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="0.85")


# ---------------------------------------------------------------- learning curves


def plot_learning_curves(histories: pd.DataFrame, runs: pd.DataFrame, path, run_ids: Sequence[str] | None = None,
                         title: str | None = None) -> PlotResult:
    """Loss and accuracy per epoch (training solid, validation dashed), one colour per run.

    ``histories``: :func:`analysis.load_histories` output with ``train_loss``,
    ``val_loss``, ``train_accuracy``, ``val_accuracy``; ``runs`` gives the
    labels; ``run_ids`` selects runs (default all in ``runs``). MLflow step
    ``s`` is plotted as epoch ``s + 1``.
    """
    run_ids = list(run_ids) if run_ids is not None else runs["run_id"].tolist()
    labels = _labels(runs)
    fig = _new_figure(11.0, 4.5)
    ax_loss, ax_acc = fig.subplots(1, 2)
    colors = _colors(len(run_ids))
    for color, run_id in zip(colors, run_ids):
        h = histories[histories["run_id"] == run_id]
        for ax, kind in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            for split, style in (("train", "-"), ("val", "--")):
                part = h[h["metric"] == f"{split}_{kind}"].sort_values("step")
                if len(part):
                    ax.plot(part["step"] + 1, part["value"], style, color=color, marker="o", markersize=3)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    ax_loss.set_ylabel("loss (cross-entropy, nats)")
    ax_acc.set_ylabel("accuracy (fraction correct)")
    ax_loss.set_title("Loss per epoch")
    ax_acc.set_title("Accuracy per epoch")
    handles = [Line2D([], [], color=c, marker="o", markersize=3, label=labels.get(r, r[:8]))
               for c, r in zip(colors, run_ids)]
    handles += [Line2D([], [], color="black", linestyle="-", label="training"),
                Line2D([], [], color="black", linestyle="--", label="validation")]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    fig.suptitle(title or f"Learning curves of {len(run_ids)} run{'s' if len(run_ids) != 1 else ''}")
    return _save(fig, path, [ax_loss, ax_acc])


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ---------------------------------------------------------------- scale trajectories


def _quantity_of(variable: str) -> str:
    return "activation" if variable == "activation" else "weight"


def scale_points(runs_row: pd.Series | dict, scale_metrics: Sequence[str]) -> dict[str, list[str]]:
    """``{"data": [...], "grad": [...]}``: the run's ``scale.*`` metrics of quantized points.

    A scale belongs to ``bits.<layer>.<weight|activation>.<direction>`` (kernels,
    biases, gamma and beta are weights); scales of float points are recorded
    by the platform but mean nothing, so they are left out. Without ``bits.*``
    columns every scale is kept.
    """
    floats = set(str(runs_row.get("float_points") or "").split(",")) - {""}
    out: dict[str, list[str]] = {"data": [], "grad": []}
    for name in scale_metrics:
        body = name[len("scale."):]
        try:
            layer, variable, direction = body.rsplit(".", 2)
        except ValueError:
            continue
        if f"{layer}.{_quantity_of(variable)}.{direction}" in floats:
            continue
        out.setdefault(direction, []).append(name)
    return out


_VARIABLE_STYLE = {"kernel": ("-", "o"), "depthwise_kernel": ("-", "o"), "bias": ("--", "s"), "gamma": ("-", "D"),
                   "beta": ("--", "v"), "activation": (":", "^")}


def plot_scales(histories: pd.DataFrame, runs: pd.DataFrame, run_id: str, path, title: str | None = None,
                layer_order: Sequence[str] | None = None) -> PlotResult:
    """Scale ``s`` of every quantized point across epochs for one run: data scales left, gradient scales right.

    One colour per layer, one line style and marker per variable (kernel solid
    circles, bias dashed squares, activation dotted triangles, ...); scales are
    integers, so coinciding lines are common: the markers keep them apart.
    ``histories`` must hold the run's ``scale.*`` metrics
    (``load_histories(runs, ["scale.*"])``).
    """
    row = runs[runs["run_id"] == run_id]
    if not len(row):
        raise KeyError(f"run {run_id!r} is not in the table")
    row = row.iloc[0]
    h = histories[(histories["run_id"] == run_id) & histories["metric"].str.startswith("scale.")]
    points = scale_points(row, sorted(h["metric"].unique()))
    order = {name: i for i, name in enumerate(layer_order or [])}
    variable_rank = {v: i for i, v in enumerate(_VARIABLE_STYLE)}

    def split(metric):
        layer, variable, _ = metric[len("scale."):].rsplit(".", 2)
        return layer, variable

    def key(metric):
        layer, variable = split(metric)
        rank = (0, order[layer], []) if layer in order else (1, 0, _natural_key(layer))
        return rank, variable_rank.get(variable, 99), variable

    layers = sorted({split(m)[0] for names in points.values() for m in names},
                    key=lambda n: (0, order[n], []) if n in order else (1, 0, _natural_key(n)))
    color_of = dict(zip(layers, _colors(len(layers))))
    fig = _new_figure(13.0, 5.0)
    axes = fig.subplots(1, 2)
    for ax, direction, name in ((axes[0], "data", "data (weights and activations)"),
                                (axes[1], "grad", "gradients")):
        names = sorted(points.get(direction, []), key=key)
        for metric in names:
            layer, variable = split(metric)
            style, marker = _VARIABLE_STYLE.get(variable, ("-.", "x"))
            part = h[h["metric"] == metric].sort_values("step")
            ax.plot(part["step"] + 1, part["value"], linestyle=style, marker=marker, color=color_of[layer],
                    markersize=5, markerfacecolor="none" if variable == "activation" else color_of[layer],
                    label=f"{layer}.{variable}")
        if not names:
            ax.text(0.5, 0.5, "no quantized points\n(all float: no scales)", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=7, ncol=1 if len(names) <= 16 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      borderaxespad=0.0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("scale s (power-of-two exponent; range ±2^s)")
        ax.set_title(f"Scales of {name}")
        ax.grid(True, alpha=0.3)
    label = row.get("label", run_id[:8])
    fig.suptitle(title or f"Scale trajectories per quantization point: {label} ({run_id[:8]})")
    return _save(fig, path, list(axes))


def _natural_key(text: str):
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


__all__ = ["PlotResult", "AXIS_LABELS", "axis_label", "plot_pareto", "plot_bit_allocation", "plot_learning_curves",
           "plot_scales", "scale_points"]
