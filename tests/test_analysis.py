"""analysis/: a small MLflow store written here, read back into tables, fronts, plots and a report.

No TensorFlow: the conftest's autouse Keras fixture is replaced by a no-op for
this module, and the store is written with MlflowClient directly.
"""

from __future__ import annotations

import ast
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")

import analysis as an  # noqa: E402
from analysis import report as report_mod  # noqa: E402
from analysis.runs import AnalysisError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000_000  # ms; runs start one second apart in the order written


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Overrides the conftest fixture of the same name: these tests never import Keras."""
    yield


# ---------------------------------------------------------------- the store

LAYERS = ("fc1", "relu1", "fc2")


def bits_params(data: dict | None = None, grad: str = "float", default: int = 8) -> dict:
    """``bits.*`` params: every data point ``default`` unless overridden, every grad ``grad``."""
    data = data or {}
    params = {}
    for layer in LAYERS:
        quantities = ["activation"] if layer.startswith("relu") else ["weight", "activation"]
        for q in quantities:
            params[f"bits.{layer}.{q}.data"] = str(data.get(f"{layer}.{q}", default))
            params[f"bits.{layer}.{q}.grad"] = grad
    return params


COMMON = {"data.name": "digits", "data.limit": "None", "model.name": "mlp", "model.batch_norm": "False",
          "model.hidden_units": "128,128", "trainer.epochs": "3", "trainer.optimizer.learning_rate": "0.003",
          "trainer.seed": "0", "strategy": "{}"}

# name: (trial, val_accuracy, cost.avg_weight_bits, bits overrides, extra params/tags, status)
TRIALS = [
    ("t0", 0, 0.90, 8.0, {}, {"nics_fix.baseline": "uniform"}, "FINISHED"),
    ("t1", 1, 0.80, 4.0, {"default": 4}, {"nics_fix.baseline": "uniform"}, "FINISHED"),
    ("t2", 2, 0.88, 6.0, {"data": {"fc1.weight": 4}}, {}, "FINISHED"),
    ("t3", 3, 0.85, 6.0, {"data": {"fc2.weight": 4, "fc2.activation": 4}}, {}, "FINISHED"),
    ("t4", 4, 0.90, 8.0, {"data": {"relu1.activation": 6}}, {}, "FINISHED"),
    ("t5", 5, 0.99, 2.0, {"default": 2}, {"error": "RuntimeError: loss is NaN"}, "FAILED"),
    ("t6", 6, 0.70, 3.0, {"data": {"fc1.weight": 2, "fc2.weight": 6}}, {}, "FINISHED"),
    ("t7", 7, 0.50, 7.5, {"data": {"fc1.weight": 6}}, {"trainer.seed": "1"}, "FINISHED"),
]


def _curve(final: float, steps: int = 3) -> list[float]:
    return [round(final - 0.1 * (steps - 1 - s), 6) for s in range(steps)]


def _log(client, run_id, params=(), metrics=(), tags=()):
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(run_id, metrics=[Metric(k, float(v), T0 + 10 * s, s) for k, v, s in metrics],
                     params=[Param(k, str(v)) for k, v in dict(params).items()],
                     tags=[RunTag(k, str(v)) for k, v in dict(tags).items()])


def write_store(root: Path) -> dict:
    """The store every test reads: a search parent, 8 trials (one FAILED), one plain train run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("unit_exp", artifact_location=(root / "artifacts").as_uri())
    ids = {}
    parent = client.create_run(exp_id, start_time=T0, run_name="search",
                               tags={"nics_fix.role": "search"}).info.run_id
    ids["parent"] = parent
    for k, (name, trial, val, cost, bits, extra, status) in enumerate(TRIALS, start=1):
        tags = {"nics_fix.role": "trial", "mlflow.parentRunId": parent, "optuna.trial_number": str(trial),
                "optuna.state": "COMPLETE" if status == "FINISHED" else "FAIL"}
        tags.update({key: v for key, v in extra.items() if not key.startswith("trainer.")})
        run_id = client.create_run(exp_id, start_time=T0 + 1000 * k, run_name=f"trial-{trial}", tags=tags).info.run_id
        params = {**COMMON, **{key: v for key, v in extra.items() if key.startswith("trainer.")},
                  "choice.fixed": "searched", **bits_params(**bits)}
        steps = 1 if status == "FAILED" else 3
        metrics = [("cost.avg_weight_bits", cost, 0), ("cost.bops", cost * 1000.0, 0)]
        for step, value in enumerate(_curve(val, steps)):
            metrics += [("val_accuracy", value, step), ("train_accuracy", value - 0.01, step),
                        ("train_loss", 1.0 - value, step), ("val_loss", 1.1 - value, step),
                        ("scale.fc1.kernel.data", -1 - step, step), ("scale.fc1.activation.data", 2, step),
                        ("scale.fc1.kernel.grad", -6, step)]
        if status == "FINISHED":
            metrics += [("test_accuracy", val - 0.005, 0), ("test_loss", 1.0 - val, 0)]
        _log(client, run_id, params, metrics)
        client.set_terminated(run_id, status, end_time=T0 + 1000 * k + 500)
        ids[name] = run_id
    client.set_terminated(parent, "FINISHED", end_time=T0 + 20_000)
    train = client.create_run(exp_id, start_time=T0 + 30_000, run_name="sweep-job",
                              tags={"nics_fix.role": "train", "hydra.sweep_dir": "multirun/2026-01-01/00-00-00",
                                    "hydra.job_num": "0"}).info.run_id
    _log(client, train, {**COMMON, "choice.fixed": "float", **bits_params(default="float")},
         [("val_accuracy", v, s) for s, v in enumerate(_curve(0.92))]
         + [("cost.avg_weight_bits", 32.0, 0), ("test_accuracy", 0.91, 0)])
    client.set_terminated(train, "FINISHED", end_time=T0 + 31_000)
    ids["train"] = train
    return {"uri": uri, "ids": ids, "experiment_id": exp_id, "root": root}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("analysis_store"))


@pytest.fixture(scope="module")
def runs(store):
    return an.load_runs("unit_exp", tracking_uri=store["uri"])


@pytest.fixture(scope="module")
def trials(store):
    return an.load_runs(parent_run_id=store["ids"]["parent"], tracking_uri=store["uri"])


# ---------------------------------------------------------------- loading


def test_load_runs_experiment_types_and_values(runs, store):
    ids = store["ids"]
    assert len(runs) == 10  # parent + 8 trials + 1 train run
    assert runs["run_id"].tolist()[0] == ids["parent"]  # sorted by start time
    assert runs["run_id"].tolist()[-1] == ids["train"]
    row = runs.set_index("run_id").loc[ids["t2"]]
    # run info and tags
    assert row["status"] == "FINISHED" and row["run_name"] == "trial-2"
    assert row["nics_fix.role"] == "trial" and row["parent_run_id"] == ids["parent"]
    assert row["label"] == "trial 2"
    assert runs.set_index("run_id").loc[ids["t0"], "label"] == "trial 0 (uniform)"
    assert runs.set_index("run_id").loc[ids["train"], "label"] == "#0 float"
    assert str(runs["optuna.trial_number"].dtype) == "Int64" and row["optuna.trial_number"] == 2
    assert str(runs["hydra.job_num"].dtype) == "Int64"
    assert isinstance(runs["start_time"].dtype, pd.DatetimeTZDtype)
    assert row["duration_s"] == pytest.approx(0.5)
    # final metrics: the value of the last step
    assert runs["val_accuracy"].dtype == np.float64
    assert row["val_accuracy"] == pytest.approx(0.88) and row["test_accuracy"] == pytest.approx(0.875)
    assert row["cost.avg_weight_bits"] == 6.0 and row["scale.fc1.kernel.data"] == -3.0
    # params typed back
    assert str(runs["trainer.epochs"].dtype) == "Int64" and row["trainer.epochs"] == 3
    assert runs["trainer.optimizer.learning_rate"].dtype == np.float64
    assert row["trainer.optimizer.learning_rate"] == pytest.approx(0.003)
    assert str(runs["model.batch_norm"].dtype) == "boolean" and not row["model.batch_norm"]
    assert row["model.hidden_units"] == "128,128" and row["strategy"] == "{}"
    assert runs["data.limit"].isna()[1:].all()  # "None" is missing (the parent logged no params)
    # bit allocation columns: Int64, float as 32, listed in float_points
    bits = an.bits_columns(runs)
    assert "bits.fc1.weight.data" in bits and len(bits) == 10
    assert all(str(runs[c].dtype) == "Int64" for c in bits)
    assert row["bits.fc1.weight.data"] == 4 and row["bits.fc2.weight.data"] == 8
    assert row["bits.fc1.weight.grad"] == an.FLOAT_BITS
    assert "fc1.weight.grad" in row["float_points"].split(",")
    assert "fc1.weight.data" not in row["float_points"].split(",")
    assert pd.isna(runs.set_index("run_id").loc[ids["parent"], "bits.fc1.weight.data"])
    # uniform width and baselines
    by_id = runs.set_index("run_id")
    assert by_id.loc[ids["t1"], "uniform_bits"] == 4 and pd.isna(by_id.loc[ids["t2"], "uniform_bits"])
    assert by_id.loc[ids["train"], "uniform_bits"] == 32
    assert bool(by_id.loc[ids["t0"], "is_baseline"]) and not bool(by_id.loc[ids["t2"], "is_baseline"])
    # the failed run
    failed = by_id.loc[ids["t5"]]
    assert failed["status"] == "FAILED" and failed["error"] == "RuntimeError: loss is NaN"
    assert math.isnan(failed["test_accuracy"])
    assert runs.attrs["tracking_uri"] == store["uri"]


def test_load_runs_selection(store, trials):
    uri, ids = store["uri"], store["ids"]
    assert len(trials) == 8 and set(trials["nics_fix.role"]) == {"trial"}
    assert ids["parent"] not in set(trials["run_id"])
    assert trials["optuna.trial_number"].tolist() == list(range(8))
    finished = an.load_runs(parent_run_id=ids["parent"], tracking_uri=uri, include_failed=False)
    assert len(finished) == 7 and "FAILED" not in set(finished["status"])
    sweep = an.load_runs(sweep_dir="multirun/2026-01-01/00-00-00", tracking_uri=uri)
    assert sweep["run_id"].tolist() == [ids["train"]]
    by_id = an.load_runs(store["experiment_id"], tracking_uri=uri, roles=["search", "train"])
    assert set(by_id["run_id"]) == {ids["parent"], ids["train"]}
    assert len(an.load_runs(tracking_uri=uri)) == 10  # every experiment


def test_load_runs_errors(store, tmp_path):
    with pytest.raises(AnalysisError, match="no experiment named 'nope'"):
        an.load_runs("nope", tracking_uri=store["uri"])
    with pytest.raises(AnalysisError, match="no run with id"):
        an.load_runs(parent_run_id="0" * 32, tracking_uri=store["uri"])
    missing = tmp_path / "absent.db"
    with pytest.raises(AnalysisError, match="no MLflow database"):
        an.load_runs("unit_exp", tracking_uri=f"sqlite:///{missing}")
    assert not missing.exists()  # not created as a side effect
    with pytest.raises(AnalysisError, match="cannot reach the MLflow tracking server"):
        an.load_runs("unit_exp", tracking_uri=f"http://127.0.0.1:{_free_port()}")


def test_bit_allocation(trials, store):
    matrix = an.bit_allocation(trials)
    assert matrix.shape == (10, 8)
    assert list(matrix.columns[:2]) == ["trial 0 (uniform)", "trial 1 (uniform)"]
    assert list(matrix.index[:4]) == [("fc1", "weight", "data"), ("fc1", "weight", "grad"),
                                      ("fc1", "activation", "data"), ("fc1", "activation", "grad")]
    assert matrix.index[-1] == ("relu1", "activation", "grad")  # natural name order by default
    assert matrix.loc[("fc1", "weight", "data"), "trial 2"] == 4
    assert matrix.loc[("fc1", "weight", "grad"), "trial 2"] == 32
    ordered = an.bit_allocation(trials, layer_order=["fc1", "relu1", "fc2"], drop_all_float=True)
    assert [p[0] for p in ordered.index] == ["fc1", "fc1", "relu1", "fc2", "fc2"]  # grads all float: dropped
    tidy = an.bit_allocation(trials, tidy=True)
    assert list(tidy.columns) == ["run_id", "label", "layer", "quantity", "direction", "bits", "is_float"]
    assert len(tidy) == 80 and str(tidy["bits"].dtype) == "Int64"
    row = tidy[(tidy["run_id"] == store["ids"]["t6"]) & (tidy["layer"] == "fc2") & (tidy["quantity"] == "weight")]
    assert row.set_index("direction")["bits"].to_dict() == {"data": 6, "grad": 32}
    assert row.set_index("direction")["is_float"].to_dict() == {"data": False, "grad": True}


def test_load_histories(trials, store):
    h = an.load_histories(trials, metrics=("train_loss", "val_accuracy", "scale.*"))
    assert list(h.columns) == ["run_id", "metric", "step", "value"]
    assert h["step"].dtype == np.int64 and h["value"].dtype == np.float64
    t2 = h[h["run_id"] == store["ids"]["t2"]]
    assert t2[t2["metric"] == "val_accuracy"]["value"].tolist() == pytest.approx([0.68, 0.78, 0.88])
    assert t2[t2["metric"] == "val_accuracy"]["step"].tolist() == [0, 1, 2]
    assert set(t2["metric"]) == {"train_loss", "val_accuracy", "scale.fc1.kernel.data",
                                 "scale.fc1.activation.data", "scale.fc1.kernel.grad"}
    assert t2[t2["metric"] == "scale.fc1.kernel.data"]["value"].tolist() == [-1, -2, -3]
    failed = h[h["run_id"] == store["ids"]["t5"]]
    assert failed[failed["metric"] == "val_accuracy"]["step"].tolist() == [0]
    assert h["run_id"].drop_duplicates().tolist() == trials["run_id"].tolist()  # table order
    by_ids = an.load_histories([store["ids"]["t0"]], ["val_loss"], tracking_uri=store["uri"])
    assert by_ids["value"].tolist() == pytest.approx([0.4, 0.3, 0.2])


# ---------------------------------------------------------------- Pareto front, hypervolume


def test_pareto_front_hand_computed(trials, store):
    ids = store["ids"]
    front = an.pareto_front(trials, maximize="val_accuracy", minimize="cost.avg_weight_bits")
    # t5 (FAILED, 0.99 at 2 bits) is not a result; t3 loses to t2 at equal cost; t7 to t2 and t0;
    # t0 and t4 tie exactly (0.90 at 8 bits): both stay, in table order
    assert front["run_id"].tolist() == [ids["t6"], ids["t1"], ids["t2"], ids["t0"], ids["t4"]]
    assert front["cost.avg_weight_bits"].tolist() == [3.0, 4.0, 6.0, 8.0, 8.0]
    one = an.pareto_front(trials, keep_ties=False)
    assert one["run_id"].tolist() == [ids["t6"], ids["t1"], ids["t2"], ids["t0"]]
    with_failed = an.pareto_front(trials, finished_only=False)
    assert with_failed["run_id"].tolist() == [ids["t5"]]  # 0.99 at 2 bits dominates everything
    with pytest.raises(KeyError, match="nope"):
        an.pareto_front(trials, maximize="nope")


def test_pareto_front_small_table():
    df = pd.DataFrame({"run_id": list("abcdefg"),
                       "acc": [0.5, 0.6, 0.6, 0.4, np.nan, 0.7, 0.7],
                       "cost": [1.0, 2.0, 2.0, 0.5, 0.1, 3.0, 2.5]})
    front = an.pareto_front(df, "acc", "cost")  # no status column: every row counts
    assert front["run_id"].tolist() == ["d", "a", "b", "c", "g"]  # f loses to g; e has no accuracy
    assert an.pareto_mask([1, 1], [1, 1]).tolist() == [True, True]
    assert an.pareto_mask([], []).tolist() == []


def test_hypervolume_hand_computed(trials):
    # front (cost, acc): (3, .70) (4, .80) (6, .88) (8, .90); reference (0, 10):
    # (4-3)*.70 + (6-4)*.80 + (8-6)*.88 + (10-8)*.90 = 5.86
    assert an.hypervolume(trials, "val_accuracy", "cost.avg_weight_bits", reference=(0.0, 10.0)) == \
        pytest.approx(5.86)
    # reference (0.75, 10): (3, .70) adds nothing: (6-4)*.05 + (8-6)*.13 + (10-8)*.15 = 0.66
    assert an.hypervolume(trials, reference={"val_accuracy": 0.75, "cost.avg_weight_bits": 10.0}) == \
        pytest.approx(0.66)
    # reference cheaper than every run: nothing dominated
    assert an.hypervolume(trials, reference=(0.0, 2.0)) == 0.0
    single = pd.DataFrame({"a": [0.5], "c": [2.0]})
    assert an.hypervolume(single, "a", "c", reference=(0.0, 4.0)) == pytest.approx(1.0)


# ---------------------------------------------------------------- sensitivity


def test_layer_sensitivity_from_store(trials, store):
    ids = store["ids"]
    table = an.layer_sensitivity(trials)  # baseline: the run with most one-layer variants = t0
    assert set(table["baseline_run_id"]) == {ids["t0"]}
    assert table["layer"].tolist() == ["fc1", "fc2", "relu1"]
    assert table["changed"].tolist() == ["weight.data", "activation.data+weight.data", "activation.data"]
    assert table["bits"].tolist() == [4, 4, 6] and table["baseline_bits"].tolist() == [8, 8, 8]
    assert table["delta"].tolist() == pytest.approx([-0.02, -0.05, 0.0])
    assert table["run_ids"].tolist() == [ids["t2"], ids["t3"], ids["t4"]]
    # t7 also changes only fc1 but has another trainer.seed: not a variant
    assert ids["t7"] not in ",".join(table["run_ids"])
    ordered = an.layer_sensitivity(trials, baseline="trial 0 (uniform)", layer_order=["fc1", "relu1", "fc2"])
    assert ordered["layer"].tolist() == ["fc1", "relu1", "fc2"]
    loose = an.layer_sensitivity(trials, baseline=ids["t0"], match=())
    assert loose[loose["layer"] == "fc1"]["bits"].tolist() == [6, 4]  # t7 counts once the seed is ignored


def test_layer_sensitivity_hand_made_sweep():
    def run(rid, acc, fc1=8, fc2=8, seed=0, status="FINISHED"):
        return {"run_id": rid, "label": rid, "status": status, "val_accuracy": acc, "trainer.seed": seed,
                "bits.fc1.weight.data": fc1, "bits.fc2.weight.data": fc2}

    df = pd.DataFrame([run("base", 0.90), run("fc1_4a", 0.80, fc1=4), run("fc1_4b", 0.84, fc1=4, seed=0),
                       run("fc1_2", 0.50, fc1=2), run("fc2_4", 0.89, fc2=4), run("both", 0.70, fc1=4, fc2=4),
                       run("failed", 0.10, fc2=2, status="FAILED")])
    for col in ("bits.fc1.weight.data", "bits.fc2.weight.data"):
        df[col] = df[col].astype("Int64")
    table = an.layer_sensitivity(df, baseline="base")
    assert table[["layer", "bits", "n_runs"]].values.tolist() == [["fc1", 4, 2], ["fc1", 2, 1], ["fc2", 4, 1]]
    assert table["val_accuracy"].tolist() == pytest.approx([0.82, 0.50, 0.89])
    assert table["delta"].tolist() == pytest.approx([-0.08, -0.40, -0.01])
    assert table["delta_std"].iloc[0] == pytest.approx(np.std([0.80, 0.84], ddof=1))
    assert math.isnan(table["delta_std"].iloc[1])
    assert an.layer_sensitivity(df.iloc[[0]], baseline="base").empty
    with pytest.raises(KeyError, match="baseline"):
        an.layer_sensitivity(df, baseline="nope")


# ---------------------------------------------------------------- plots


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots(trials, store, tmp_path):
    path, fig, ax = an.plot_pareto(trials, tmp_path / "p" / "pareto.png")
    assert _is_png(path)
    assert ax.get_xlabel() == "average weight width (bits per weight)"
    assert ax.get_ylabel() == "validation accuracy (fraction correct)"
    assert ax.get_title() == "Validation accuracy vs average weight bits: 7 runs, 5 on the Pareto front"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["run (7)", "Pareto front (5)", "uniform-width baseline (2)"]
    notes = sorted(t.get_text() for t in ax.texts)  # the front only: other labels would pile up
    from analysis.runs import run_names

    assert notes == sorted(run_names(an.pareto_front(trials)).values())
    anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.x0 >= 1.0  # the legend sits right of the axes, off the data

    front = an.pareto_front(trials)
    path, fig, ax = an.plot_bit_allocation(front, tmp_path / "alloc.png", layer_order=["fc1", "relu1", "fc2"])
    assert _is_png(path)
    assert ax.get_title() == "Per-layer bit allocation of the Pareto-front runs"
    assert ax.get_xlabel() == "run (Pareto front, cheapest first)"
    assert ax.get_ylabel() == "quantization point (layer.quantity.direction)"
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "fc1.weight.data", "fc1.activation.data", "relu1.activation.data", "fc2.weight.data", "fc2.activation.data"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["trial 6", "trial 1 (uniform)", "trial 2",
                                                            "trial 0 (uniform)", "trial 4"]
    cells = [t.get_text() for t in ax.texts]
    assert len(cells) == 25 and cells[:5] == ["2", "4", "4", "8", "8"]  # fc1.weight.data across the front
    assert fig.axes[-1].get_ylabel() == "bit width (bits; grey = float)"

    hist = an.load_histories(trials, ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "scale.*"))
    path, fig, axes = an.plot_learning_curves(hist, trials, tmp_path / "curves.png",
                                              run_ids=[store["ids"]["t0"], store["ids"]["t2"]])
    assert _is_png(path)
    assert [a.get_xlabel() for a in axes] == ["epoch", "epoch"]
    assert [a.get_ylabel() for a in axes] == ["loss (cross-entropy, nats)", "accuracy (fraction correct)"]
    assert [a.get_title() for a in axes] == ["Loss per epoch", "Accuracy per epoch"]
    assert fig.get_suptitle() == "Learning curves of 2 runs"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["trial 0 (uniform)", "trial 2", "training",
                                                                  "validation"]
    assert axes[1].lines[1].get_xdata().tolist() == [1, 2, 3]  # epochs count from 1

    path, fig, axes = an.plot_scales(hist, trials, store["ids"]["t2"], tmp_path / "scales.png")
    assert _is_png(path)
    assert [a.get_ylabel() for a in axes] == ["scale s (power-of-two exponent; range ±2^s)"] * 2
    assert [a.get_title() for a in axes] == ["Scales of data (weights and activations)", "Scales of gradients"]
    assert fig.get_suptitle().startswith("Scale trajectories per quantization point: trial 2")
    assert [t.get_text() for t in axes[0].get_legend().get_texts()] == ["fc1.kernel", "fc1.activation"]
    assert axes[1].get_legend() is None  # fc1.kernel.grad is float in the run: left out
    assert "all float" in axes[1].texts[0].get_text()


# ---------------------------------------------------------------- report


def _copy_store(store, tmp_path) -> dict:
    """A copy of the shared store for tests that write to it (same runs, same artifact root)."""
    shutil.copy(store["root"] / "mlflow.db", tmp_path / "mlflow.db")
    return dict(store, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_report_for_parent_run(store, tmp_path, capsys):
    store = _copy_store(store, tmp_path)
    out = tmp_path / "report"
    rc = report_mod.main([store["ids"]["parent"], "--tracking-uri", store["uri"], "--out", str(out),
                          "--log-to-mlflow"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "8 runs, 5 on the Pareto front" in printed and store["ids"]["parent"] in printed
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "runs.csv", "pareto.csv", "histories.csv", "sensitivity.csv", "pareto.png",
            "allocation.png", "learning_curves.png"} <= names
    assert len([n for n in names if n.startswith("scales_")]) == 2
    assert all(_is_png(out / n) for n in names if n.endswith(".png"))
    text = (out / "report.md").read_text()
    assert text.startswith(f"# Report: search `{store['ids']['parent']}`")
    assert "- Runs: 8 (7 FINISHED, 1 FAILED)" in text
    assert "## Runs that did not finish" in text and "RuntimeError: loss is NaN" in text
    assert "| label | run | status | val_accuracy | test_accuracy | cost.avg_weight_bits |" in text
    assert "Hypervolume with reference (0.0000, 32.00): **" in text
    hv = an.hypervolume(an.load_runs(parent_run_id=store["ids"]["parent"], tracking_uri=store["uri"]),
                        reference=(0.0, 32.0))
    assert f"**{hv:.4f}**" in text  # 5.86 - 2*.90 + 24*.90 = 25.66
    assert hv == pytest.approx(25.66)
    assert f"| trial 2 | {store['ids']['t2'][:8]} | FINISHED | 0.8800 | 6.00 |" in text
    assert "| point | trial 6 | trial 1 (uniform) | trial 2 | trial 0 (uniform) | trial 4 |" in text
    assert "| fc1.weight.data | 2 | 4 | 4 | 8 | 8 |" in text
    assert "## Per-layer sensitivity" in text and "| fc2 | activation.data+weight.data | 4 | 8 |" in text
    for png in ("pareto.png", "allocation.png", "learning_curves.png"):
        assert f"]({png})" in text
    # CSVs
    runs_csv = pd.read_csv(out / "runs.csv")
    assert len(runs_csv) == 8 and "bits.fc1.weight.data" in runs_csv.columns
    pareto_csv = pd.read_csv(out / "pareto.csv")
    assert pareto_csv["label"].tolist() == ["trial 6", "trial 1 (uniform)", "trial 2", "trial 0 (uniform)",
                                            "trial 4"]
    hist = pd.read_csv(out / "histories.csv")
    assert list(hist.columns) == ["run_id", "label", "metric", "step", "value"]
    assert {"val_accuracy", "scale.fc1.kernel.data"} <= set(hist["metric"])
    # logged on the parent run as report/
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store["uri"])
    logged = {f.path for f in client.list_artifacts(store["ids"]["parent"], "report")}
    assert "report/report.md" in logged and "report/pareto.png" in logged


def test_report_for_experiment_logs_a_report_run(store, tmp_path):
    store = _copy_store(store, tmp_path)
    out = tmp_path / "exp_report"
    report = report_mod.build_report("unit_exp", tracking_uri=store["uri"], out=out, log_to_mlflow=True, top=3)
    assert len(report.runs) == 9  # the search parent is left out
    text = (out / "report.md").read_text()
    assert text.startswith("# Report: experiment `unit_exp`")
    top = text.split("## Top runs by `val_accuracy`")[1].split("##")[0]
    assert "The 3 best of 8 finished runs." in top
    assert top.count("| trial ") + top.count("| #0 float") == 3 and "| #0 float |" in top
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store["uri"])
    run = client.get_run(report.logged_to_run)
    assert run.data.tags["nics_fix.role"] == "report" and run.info.status == "FINISHED"
    assert "report/report.md" in {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    _, again, _ = report_mod.select_runs(client, "unit_exp")
    assert len(again) == 9  # report runs are not analysed


def test_report_cost_column_follows_the_search(store, tmp_path):
    from mlflow.tracking import MlflowClient

    store = _copy_store(store, tmp_path)
    client = MlflowClient(tracking_uri=store["uri"])
    parent = report_mod.resolve_target(client, store["ids"]["parent"])
    assert parent.kind == "parent" and report_mod.default_minimize(client, parent) == "cost.avg_weight_bits"
    client.log_param(store["ids"]["parent"], "search.cost", "bops")
    assert report_mod.default_minimize(client, parent) == "cost.bops"
    experiment = report_mod.resolve_target(client, "unit_exp")
    assert experiment.kind == "experiment" and report_mod.default_minimize(client, experiment) == "cost.avg_weight_bits"
    assert report_mod.resolve_target(client, store["experiment_id"]).name == "unit_exp"  # an id works too


@pytest.mark.parametrize("target,uri,message", [
    ("no_such_experiment", None, "error: no experiment named 'no_such_experiment' and no run with id"),
    ("f" * 32, None, "error: no run with id 'ffffffffffffffffffffffffffffffff'"),
    ("unit_exp", "sqlite:///{tmp}/missing.db", "error: no MLflow database at sqlite:///"),
    ("unit_exp", "http://127.0.0.1:{port}", "error: cannot reach the MLflow tracking server at http://127.0.0.1:"),
])
def test_report_errors_are_one_line(store, tmp_path, capsys, target, uri, message):
    uri = (uri or store["uri"]).format(tmp=tmp_path, port=_free_port())
    rc = report_mod.main([target, "--tracking-uri", uri, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_command_line_exit_status_and_no_tensorflow(store, tmp_path):
    """``python -m analysis.report`` in a fresh interpreter: one error line, status 2, no TF/Keras imported."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['analysis.report', 'no_such_experiment', '--tracking-uri', {store['uri']!r}]\n"
            "try:\n"
            "    runpy.run_module('analysis.report', run_name='__main__', alter_sys=True)\n"
            "    rc = 0\n"
            "except SystemExit as stop:\n"
            "    rc = stop.code\n"
            "bad = [m for m in ('tensorflow', 'keras', 'experiments', 'nics_fix') if m in sys.modules]\n"
            "print('imported:', bad)\n"
            "sys.exit(rc)\n")
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=path), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "imported: []"
    assert proc.stderr.strip().splitlines() == [
        f"error: no experiment named 'no_such_experiment' and no run with id 'no_such_experiment' at {store['uri']}"]


def test_core_package_never_imports_analysis_pandas_or_mlflow():
    offenders = []
    for path in sorted((REPO / "nics_fix").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n.split(".")[0] in ("analysis", "pandas", "mlflow", "matplotlib")]
    assert offenders == []


# ---------------------------------------------------------------- tracking server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


SERVER_START_S = float(os.environ.get("NICS_FIX_TEST_SERVER_START_S", "30"))


def test_tracking_server_gives_the_same_table(store, tmp_path):
    """The same client code against ``mlflow server`` (skipped if it does not start in time)."""
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli) if mlflow_cli.exists() else (shutil.which("mlflow") or "mlflow"), "server",
               "--backend-store-uri", store["uri"], "--default-artifact-root", str(tmp_path / "server_artifacts"),
               "--host", "127.0.0.1", "--port", str(port := _free_port()), "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"mlflow server did not start within {SERVER_START_S:.0f} s "
                            f"(exit status {server.poll()})")
            time.sleep(0.5)
        remote = an.load_runs("unit_exp", tracking_uri=url)
        local = an.load_runs("unit_exp", tracking_uri=store["uri"])
        assert remote.attrs["tracking_uri"] == url
        remote.attrs.clear()
        local.attrs.clear()
        pd.testing.assert_frame_equal(remote, local)
        children = an.load_runs(parent_run_id=store["ids"]["parent"], tracking_uri=url)
        assert len(children) == 8
        hist = an.load_histories(children, ["val_accuracy"])
        assert len(hist) == 7 * 3 + 1
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        except ProcessLookupError:
            pass
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)
        log.close()


def test_runs_of_several_models_or_datasets_are_refused_with_a_line():
    import pandas as pd

    from analysis.report import _one_model_and_dataset

    _one_model_and_dataset(pd.DataFrame({"model.name": ["mlp", "mlp"], "data.name": ["digits", "digits"]}))
    mixed = pd.DataFrame({"model.name": ["mlp", "lenet5", "mlp"], "data.name": ["digits", "mnist", "digits"]})
    with pytest.raises(AnalysisError, match=r"the runs are of 2 models/datasets \(lenet5/mnist, mlp/digits\): one "
                                            r"Pareto front would mix them"):
        _one_model_and_dataset(mixed)


def test_runs_that_did_not_finish_say_why():
    import pandas as pd

    from analysis.report import why_not_finished

    failed = pd.DataFrame({"error": ["RuntimeError: boom", None, None, None],
                           "nics_fix.pruned": [None, "val_accuracy 0.5000 at epoch 2, below the median", None, None],
                           "nics_fix.infeasible": [None, None, "cost 9 > budget 5", None]})
    assert why_not_finished(failed).tolist() == ["RuntimeError: boom", "pruned: val_accuracy 0.5000 at epoch 2, "
                                                 "below the median", "infeasible: cost 9 > budget 5", ""]


def test_sensitivity_baseline_is_described_by_its_own_bits():
    import pandas as pd

    from analysis.report import bits_text

    row = pd.Series({"run_id": "r", "choice.fixed": "w8a8", "bits.dense1.weight.data": "4",
                     "bits.dense1.activation.data": "8", "bits.relu1.activation.data": "float",
                     "bits.dense2.weight.data": "8", "bits.dense2.weight.grad": None})
    assert bits_text(row) == "dense1 w4 a8, relu1 af, dense2 w8"  # not "w8a8": dense1 was overridden to 4 bits


def test_report_tables_tell_duplicate_labels_apart():
    import pandas as pd

    from analysis.report import _run_table

    df = pd.DataFrame({"label": ["w8a8", "w8a8", "float"], "run_id": ["aaaaaa11", "bbbbbb22", "cccccc33"],
                       "status": ["FINISHED"] * 3, "val_accuracy": [0.9, 0.8, 0.95]})
    assert _run_table(df, ["val_accuracy"])["label"].tolist() == ["w8a8 [aaaaaa]", "w8a8 [bbbbbb]", "float [cccccc]"]
