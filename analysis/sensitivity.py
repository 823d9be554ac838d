"""Per-layer sensitivity: how much accuracy a layer loses when only its bits drop.

The rule for "one layer changed" relative to a baseline run ``B``: a run ``R``
counts as a variant of layer ``L`` when

1. both runs are FINISHED (unless ``finished_only=False``) and ``R`` has the metric;
2. every param column matching one of the ``match`` glob patterns (default the
   data, model, trainer and strategy params) is equal in ``R`` and ``B``
   (missing equals missing) — so a different seed or epoch count is not
   mistaken for a bit change;
3. comparing every ``bits.*`` column (float points count as 32, a point
   logged in only one of the runs is a difference), at least one point
   differs, and all differing points belong to layer ``L`` (for example its
   ``weight.data`` alone, or ``weight.data`` and ``activation.data`` together).

``mode.*`` params are not compared. Variants with the same layer, the same
changed points and the same new widths are averaged (repeated seeds).

Default baseline: the run with the most one-layer variants (ties: the earliest
in the table).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis.runs import bits_columns, split_bits_key

DEFAULT_MATCH = ("data.*", "model.*", "trainer.*", "strategy*")


def _natural_key(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _same(x, y) -> bool:
    x_missing = x is None or x is pd.NA or (isinstance(x, float) and np.isnan(x))
    y_missing = y is None or y is pd.NA or (isinstance(y, float) and np.isnan(y))
    if x_missing or y_missing:
        return x_missing and y_missing
    return bool(x == y)


def changed_points(run, base, bits_cols: Sequence[str]) -> list[str]:
    """The ``bits.*`` columns whose widths differ between two runs."""
    return [c for c in bits_cols if not _same(run[c], base[c])]


def one_layer_change(run, base, bits_cols: Sequence[str],
                     match_cols: Sequence[str]) -> tuple[str, list[str]] | None:
    """``(layer, changed bits columns)`` if ``run`` is a one-layer variant of ``base``, else None."""
    if not all(_same(run[c], base[c]) for c in match_cols):
        return None
    changed = changed_points(run, base, bits_cols)
    if not changed:
        return None
    layers = {split_bits_key(c)[0] for c in changed}
    if len(layers) != 1:
        return None
    return layers.pop(), changed


def _match_columns(df: pd.DataFrame, match: Sequence[str]) -> list[str]:
    return [c for c in df.columns if any(fnmatch.fnmatchcase(c, p) for p in match)]


def _baseline_row(df: pd.DataFrame, baseline, bits_cols, match_cols) -> pd.Series | None:
    if baseline is not None:
        for column in ("run_id", "label"):
            if column in df.columns:
                hit = df[df[column] == baseline]
                if len(hit):
                    return hit.iloc[0]
        raise KeyError(f"baseline {baseline!r} is not a run_id or label of the table")
    records = df.to_dict("records")
    best, best_count = None, 0
    for i, base in enumerate(records):
        count = sum(one_layer_change(run, base, bits_cols, match_cols) is not None for run in records)
        if count > best_count:
            best, best_count = df.iloc[i], count
    return best


def layer_sensitivity(df: pd.DataFrame, baseline: str | None = None, metric: str = "val_accuracy",
                      match: Sequence[str] = DEFAULT_MATCH, finished_only: bool = True,
                      layer_order: Sequence[str] | None = None) -> pd.DataFrame:
    """Metric change per layer and bit width against a baseline run (rule: module docstring).

    ``baseline``: a run id or label of ``df``; default: the run with the most
    one-layer variants. Returns one row per (layer, changed points, widths):
    ``layer``, ``changed`` (``"weight.data+activation.data"``), ``bits`` (the
    variant's width of the changed points; the lowest if they differ),
    ``baseline_bits``, ``n_runs``, ``<metric>`` (mean over the variants),
    ``baseline_<metric>``, ``delta`` (mean minus baseline), ``delta_std``
    (NaN for one run), ``run_ids`` (comma-separated), ``baseline_run_id``.
    Sorted by layer (``layer_order`` or natural name order), changed points,
    then bits descending. Empty table (same columns) when nothing matches.
    """
    columns = ["layer", "changed", "bits", "baseline_bits", "n_runs", metric, f"baseline_{metric}", "delta",
               "delta_std", "run_ids", "baseline_run_id"]
    rows = df
    if finished_only and "status" in df.columns:
        rows = rows[rows["status"] == "FINISHED"]
    if metric not in rows.columns:
        raise KeyError(f"column {metric!r} is not in the table")
    rows = rows[rows[metric].notna()]
    bits_cols = bits_columns(rows)
    match_cols = _match_columns(rows, match)
    empty = pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    if not len(rows) or not bits_cols:
        return empty
    base = _baseline_row(rows, baseline, bits_cols, match_cols)
    if base is None:
        return empty
    groups: dict[tuple, list] = {}
    for run in rows.to_dict("records"):
        if run["run_id"] == base["run_id"]:
            continue
        hit = one_layer_change(run, base, bits_cols, match_cols)
        if hit is None:
            continue
        layer, changed = hit
        widths = tuple(None if pd.isna(run[c]) else int(run[c]) for c in changed)
        groups.setdefault((layer, tuple(changed), widths), []).append(run)
    out = []
    for (layer, changed, widths), variants in groups.items():
        values = np.array([float(v[metric]) for v in variants])
        base_widths = [int(base[c]) for c in changed if not pd.isna(base[c])]
        present = [w for w in widths if w is not None]
        out.append({
            "layer": layer,
            "changed": "+".join(".".join(split_bits_key(c)[1:]) for c in changed),
            "bits": min(present) if present else pd.NA,
            "baseline_bits": min(base_widths) if base_widths else pd.NA,
            "n_runs": len(variants),
            metric: float(values.mean()),
            f"baseline_{metric}": float(base[metric]),
            "delta": float(values.mean() - float(base[metric])),
            "delta_std": float(values.std(ddof=1)) if len(values) > 1 else np.nan,
            "run_ids": ",".join(v["run_id"] for v in variants),
            "baseline_run_id": base["run_id"],
        })
    if not out:
        return empty
    table = pd.DataFrame(out, columns=columns)
    order = {name: i for i, name in enumerate(layer_order or [])}

    def sort_key(i):
        layer, bits = table["layer"].iloc[i], table["bits"].iloc[i]
        rank = (0, order[layer]) if layer in order else (1, _natural_key(layer))
        return rank, table["changed"].iloc[i], -int(bits) if not pd.isna(bits) else 0

    table = table.iloc[sorted(range(len(table)), key=sort_key)].reset_index(drop=True)
    table["bits"] = table["bits"].astype("Int64")
    table["baseline_bits"] = table["baseline_bits"].astype("Int64")
    table["n_runs"] = table["n_runs"].astype("int64")
    table.attrs["baseline_run_id"] = base["run_id"]
    return table


__all__ = ["layer_sensitivity", "one_layer_change", "changed_points", "DEFAULT_MATCH"]
