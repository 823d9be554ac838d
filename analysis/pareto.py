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
    ``(0.0, 32.0)`` for accuracy vs average bits. With the front sorted by
    cost ``c_1 < ... < c_n`` (accuracies ``a_1 < ... < a_n``) and
    ``c_{n+1} = minimize_ref``::

        HV = sum_i (c_{i+1} - c_i) * (a_i - maximize_ref)

    Points not strictly better than the reference in both columns add
    nothing. 0.0 for an empty front.
    """
    if isinstance(reference, Mapping):
        ref_a, ref_c = float(reference[maximize]), float(reference[minimize])
    else:
        ref_a, ref_c = (float(v) for v in reference)
    front = pareto_front(df, maximize, minimize, finished_only=finished_only, keep_ties=False)
    a = front[maximize].astype("float64").to_numpy()
    c = front[minimize].astype("float64").to_numpy()
    keep = (a > ref_a) & (c < ref_c)
    a, c = a[keep], c[keep]
    if not len(a):
        return 0.0
    edges = np.append(c[1:], ref_c)
    return float(np.sum((edges - c) * (a - ref_a)))


__all__ = ["pareto_mask", "pareto_front", "hypervolume"]
