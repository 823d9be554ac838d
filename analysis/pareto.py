"""Pareto fronts and 2-D hypervolume for one maximized and one minimized column.

A row *dominates* another when it is at least as good in both columns and
strictly better in one (higher ``maximize``, lower ``minimize``). The front is
the rows no row dominates.

Ties: rows with exactly equal values in both columns do not dominate each
other, so all of them are on the front when that point is (``keep_ties=True``,
the default); ``keep_ties=False`` keeps the first of them in the table's
order (load_runs sorts by start time: the earliest run). Rows with a missing
value in either column are never on the front.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd


def pareto_mask(maximize_values, minimize_values) -> np.ndarray:
    """Boolean mask of the non-dominated entries (NaN entries are ``False``)."""
    a = np.asarray(maximize_values, dtype="float64")
    c = np.asarray(minimize_values, dtype="float64")
    mask = np.zeros(len(a), dtype=bool)
    valid = np.flatnonzero(~(np.isnan(a) | np.isnan(c)))
    if not len(valid):
        return mask
    best_prev = -np.inf  # best maximize value among strictly cheaper rows
    for cost in np.unique(c[valid]):  # ascending
        group = valid[c[valid] == cost]
        top = a[group].max()
        if top > best_prev:
            mask[group[a[group] == top]] = True
        best_prev = max(best_prev, top)
    return mask


def pareto_indices(maximize_values, minimize_values) -> list[int]:
    """Indices of the non-dominated entries (ties all kept), by ``minimize`` up, then ``maximize`` down.

    >>> pareto_indices([0.9, 0.95, 0.85, 0.95], [4.0, 8.0, 6.0, 8.0])
    [0, 1, 3]
    """
    a = np.asarray(maximize_values, dtype="float64")
    c = np.asarray(minimize_values, dtype="float64")
    front = np.flatnonzero(pareto_mask(a, c))
    return [int(i) for i in sorted(front, key=lambda i: (c[i], -a[i], i))]


def hypervolume_points(maximize_values, minimize_values, reference: Sequence[float] = (0.0, 32.0)) -> float:
    """Area dominated by the points and bounded by ``reference`` = ``(maximize_ref, minimize_ref)``.

    The one hypervolume convention of the project (search summaries and
    reports): the raw area in (accuracy, cost) units, not normalised. With the
    front sorted by cost ``c_1 < ... < c_n`` (accuracies ``a_1 < ... < a_n``)
    and ``c_{n+1} = minimize_ref``::

        HV = sum_i (c_{i+1} - c_i) * (a_i - maximize_ref)

    Points not strictly better than the reference in both values add nothing;
    0.0 without such points.

    >>> hypervolume_points([0.9, 0.95], [4.0, 8.0], reference=(0.0, 32.0))  # 0.9*28 + 0.05*24
    26.4
    """
    ref_a, ref_c = (float(v) for v in reference)
    a = np.asarray(maximize_values, dtype="float64")
    c = np.asarray(minimize_values, dtype="float64")
    keep = (a > ref_a) & (c < ref_c)
    a, c = a[keep], c[keep]
    front = pareto_indices(a, c)
    front = [i for n, i in enumerate(front) if n == 0 or c[i] != c[front[n - 1]]]  # ties count once
    if not front:
        return 0.0
    a, c = a[front], c[front]
    edges = np.append(c[1:], ref_c)
    return round(float(np.sum((edges - c) * (a - ref_a))), 12)


def _usable(df: pd.DataFrame, finished_only: bool) -> pd.DataFrame:
    if finished_only and "status" in df.columns:
        return df[df["status"] == "FINISHED"]
    return df


def pareto_front(df: pd.DataFrame, maximize: str = "val_accuracy", minimize: str = "cost.avg_weight_bits",
                 finished_only: bool = True, keep_ties: bool = True) -> pd.DataFrame:
    """The non-dominated rows of ``df``, sorted by ``minimize`` ascending (then ``maximize`` descending).

    ``finished_only`` (default) considers only rows whose ``status`` is
    FINISHED (a failed run's last logged accuracy is not a result). Ties:
    see the module docstring. The original index is kept.
    """
    for column in (maximize, minimize):
        if column not in df.columns:
            raise KeyError(f"column {column!r} is not in the table (has: {', '.join(map(str, df.columns[:20]))}...)")
    rows = _usable(df, finished_only)
    a = pd.to_numeric(rows[maximize], errors="coerce").astype("float64").to_numpy()
    c = pd.to_numeric(rows[minimize], errors="coerce").astype("float64").to_numpy()
    front = rows[pareto_mask(a, c)]
    if not keep_ties:
        front = front.drop_duplicates(subset=[maximize, minimize], keep="first")
    order = np.lexsort((-front[maximize].astype("float64").to_numpy(), front[minimize].astype("float64").to_numpy()))
    return front.iloc[order]


def hypervolume(df: pd.DataFrame, maximize: str = "val_accuracy", minimize: str = "cost.avg_weight_bits",
                reference: Sequence[float] | Mapping[str, float] = (0.0, 32.0), finished_only: bool = True) -> float:
    """Area dominated by the front of ``df`` and bounded by ``reference``.

    ``reference`` is ``(maximize_ref, minimize_ref)`` (or a mapping from the
    two column names): a point worse than every run in both columns, e.g.
    ``(0.0, 32.0)`` for accuracy vs average bits. The convention: see
    :func:`hypervolume_points`.
    """
    if isinstance(reference, Mapping):
        reference = (reference[maximize], reference[minimize])
    rows = _usable(df, finished_only)
    a = pd.to_numeric(rows[maximize], errors="coerce").astype("float64").to_numpy()
    c = pd.to_numeric(rows[minimize], errors="coerce").astype("float64").to_numpy()
    valid = ~(np.isnan(a) | np.isnan(c))
    return hypervolume_points(a[valid], c[valid], reference)


__all__ = ["pareto_mask", "pareto_indices", "pareto_front", "hypervolume", "hypervolume_points"]
