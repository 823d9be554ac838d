"""A study's files: ``pareto.csv``, ``pareto/trial_<n>.yaml`` (usable as ``conf/fixed/`` files), ``trials.csv``.

Example::

    export(study, opts, summarize(study, opts), Path("outputs/search/my-study"))
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import optuna
import yaml

from experiments.search_options import COSTS
from nics_fix.saving import atomic_write


def _number(value):
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return int(value)
    return value


def _trial_row(trial, metric: str, cost_key: str) -> dict:
    a = {k: _number(v) for k, v in trial.user_attrs.items()}
    row = {"trial": trial.number, "state": trial.state.name, "run_id": a.get("mlflow_run_id", ""),
           metric: a.get("accuracy", ""), "test_accuracy": a.get("test_accuracy", ""),
           "cost": a.get(COSTS[cost_key], ""),
           "avg_weight_bits": a.get("cost.avg_weight_bits", ""),
           "total_weight_bits": a.get("cost.total_weight_bits", ""),
           "bops": a.get("cost.bops", ""), "train_bops": a.get("cost.train_bops", ""),
           "baseline": a.get("baseline", ""), "duplicate_of": a.get("duplicate_of", "")}
    for key, value in (a.get("bits") or {}).items():
        row[f"bits.{key}"] = "float" if value is None else value
    return row


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]

    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def _yaml_text(trial, study_name: str, metric: str, cost_key: str) -> str:
    a = trial.user_attrs
    header = (f"# Bit allocation from search study {study_name!r}, trial {trial.number}: "
              f"{metric} {a.get('accuracy', float('nan')):.4f}, test_accuracy {a.get('test_accuracy', float('nan')):.4f},\n"
              f"# {cost_key} {a.get(COSTS[cost_key])}, average weight bits {a.get('cost.avg_weight_bits', 0):.3f} "
              f"(MLflow run {a.get('mlflow_run_id')}).\n"
              f"# Core nics_fix format: copy to conf/fixed/<name>.yaml and train with fixed=<name>.\n")
    return header + yaml.safe_dump(a["fixed_config"], sort_keys=False, default_flow_style=None)



def export(study: optuna.Study, opts: Mapping, summary: Mapping, output_dir: Path) -> dict[str, Path]:
    """Write pareto.csv, pareto/trial_<n>.yaml and trials.csv to ``output_dir``."""
    metric, cost_key = summary["metric"], opts["cost"]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    output_dir.mkdir(parents=True, exist_ok=True)
    pareto_dir = output_dir / "pareto"
    if pareto_dir.exists():
        for old in pareto_dir.glob("trial_*.yaml"):
            old.unlink(missing_ok=True)  # a worker sharing the folder may have removed it first
    pareto_dir.mkdir(exist_ok=True)
    rows = [_trial_row(by_number[n], metric, cost_key) for n in summary["pareto"]]
    for row in rows:
        row.pop("state")
    _write_csv(output_dir / "pareto.csv", rows)
    for n in summary["pareto"]:
        text = _yaml_text(by_number[n], study.study_name, metric, cost_key)
        atomic_write(pareto_dir / f"trial_{n}.yaml", lambda tmp, text=text: tmp.write_text(text))
    _write_csv(output_dir / "trials.csv", [_trial_row(t, metric, cost_key) for t in by_number.values()])
    return {"pareto_csv": output_dir / "pareto.csv", "pareto_dir": pareto_dir,
            "trials_csv": output_dir / "trials.csv"}
