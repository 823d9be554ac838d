"""A study summed up: trial counts, the Pareto front, hypervolume, best picks, and its text form.

The front and hypervolume come from :mod:`analysis.pareto` (the one implementation). Example::

    print(format_summary(study, opts, summarize(study, opts)))
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Mapping, Sequence

import optuna
from optuna.trial import TrialState

from analysis.pareto import hypervolume_points, pareto_indices
from analysis.runs import widths_text
from experiments.search_options import COSTS


def _fmt_cost(value) -> str:
    return f"{value:,.0f}" if abs(value) < 1e9 else f"{value:.4g}"




def bits_summary(bits: Mapping[str, int | None], quantities: Sequence[str]) -> str:
    """``dense1 w8 a6, relu1 a4``: each layer's widths, in the order of ``bits`` (the model's layer order)."""
    return widths_text(bits, quantities)



def summarize(study: optuna.Study, opts: Mapping, metric: str = "val_accuracy",
              reference: Mapping | None = None) -> dict:
    """Trial counts, the Pareto front (accuracy, cost) of complete trials, hypervolume, best picks."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    # A reused allocation (duplicate_of) repeats its twin's point: it is counted, not listed again.
    complete = [t for t in trials if t.state == TrialState.COMPLETE and "accuracy" in t.user_attrs
                and "duplicate_of" not in t.user_attrs]
    cost_key = COSTS[opts["cost"]]
    accuracy = [t.user_attrs["accuracy"] for t in complete]
    front = [complete[i] for i in pareto_indices(accuracy, [t.user_attrs[cost_key] for t in complete])]
    avg_bits = [t.user_attrs["cost.avg_weight_bits"] for t in complete]
    summary = {
        "study_name": study.study_name, "n_trials": len(trials), "states": dict(states),
        "metric": metric, "cost": opts["cost"], "pareto": [t.number for t in front],
        "pareto_unique": len({(t.user_attrs["accuracy"], t.user_attrs[cost_key]) for t in front}),
        "hypervolume": hypervolume_points(accuracy, avg_bits, opts["hypervolume_reference"]),
        "hypervolume_reference": list(opts["hypervolume_reference"]),
        "reference": dict(reference) if reference else None,
    }
    if reference:
        target = float(reference["accuracy"]) - float(opts["accuracy_delta"])
        within = [t for t in complete if t.user_attrs["accuracy"] >= target - 1e-12]
        if within:
            best = min(within, key=lambda t: (t.user_attrs["cost.avg_weight_bits"], -t.user_attrs["accuracy"]))
            summary["fewest_bits_within_delta"] = {
                "trial": best.number, "avg_weight_bits": best.user_attrs["cost.avg_weight_bits"],
                "accuracy": best.user_attrs["accuracy"], "test_accuracy": best.user_attrs.get("test_accuracy"),
                "target": target}
    if opts["objective"] != "pareto":
        with contextlib.suppress(ValueError):
            best = study.best_trial
            summary["best_trial"] = best.number
            summary["best_value"] = best.value
    return summary



def format_summary(study: optuna.Study, opts: Mapping, summary: Mapping) -> str:
    metric, cost_key = summary["metric"], COSTS[opts["cost"]]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    states = ", ".join(f"{n} {s}" for s, n in sorted(summary["states"].items()))
    lines = [f"Study {summary['study_name']}: {summary['n_trials']} trials ({states or 'none'})"]
    ref = summary.get("reference")
    if ref:
        lines.append(f"Float reference: {metric} {ref['accuracy']:.4f}"
                     + (f" (run {ref['run_id']})" if ref.get("run_id") else f" ({ref.get('source')})"))
    hv_ref = summary["hypervolume_reference"]
    lines.append(f"Pareto front ({metric} up, {opts['cost']} down): {len(summary['pareto'])} trials, "
                 f"hypervolume {summary['hypervolume']:.4f} (accuracy x avg weight bits, reference "
                 f"acc={hv_ref[0]:g}, bits={hv_ref[1]:g})")
    header = f"  {'trial':>5}  {metric:>12}  {'test_acc':>8}  {'avg_w_bits':>10}  {opts['cost']:>12}  bits"
    lines.append(header)
    for n in summary["pareto"]:
        a = by_number[n].user_attrs
        mark = f" [baseline {a['baseline']}]" if a.get("baseline") else ""
        lines.append(f"  {n:>5}  {a['accuracy']:>12.4f}  {a.get('test_accuracy', float('nan')):>8.4f}  "
                     f"{a['cost.avg_weight_bits']:>10.3f}  {_fmt_cost(a[cost_key]):>12}  "
                     f"{bits_summary(a.get('bits', {}), opts['quantities'])}{mark}")
    best = summary.get("fewest_bits_within_delta")
    if best:
        lines.append(f"Fewest average weight bits with {metric} >= float - {opts['accuracy_delta']:g} "
                     f"({best['target']:.4f}): {best['avg_weight_bits']:.3f} (trial {best['trial']}, "
                     f"{metric} {best['accuracy']:.4f}, test {best['test_accuracy']:.4f})")
    elif ref:
        lines.append(f"No complete trial reached {metric} >= float - {opts['accuracy_delta']:g}")
    if "best_trial" in summary:
        lines.append(f"Best trial ({opts['objective']}): {summary['best_trial']} (value {summary['best_value']:.6g})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry
