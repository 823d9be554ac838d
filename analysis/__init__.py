"""Cross-run analysis of the platform's MLflow record: tables, Pareto fronts, plots, reports.

Reads what ``experiments/tracking.py`` records (see its docstring for the
names) with MLflow's client only — no TensorFlow, no Keras — so it runs
anywhere the tracking store is reachable::

    import analysis as an

    runs = an.load_runs("nics_fix", tracking_uri="sqlite:///mlflow.db")     # one row per run
    front = an.pareto_front(runs, maximize="val_accuracy", minimize="cost.avg_weight_bits")
    an.hypervolume(runs, "val_accuracy", "cost.avg_weight_bits", reference=(0.0, 32.0))
    an.bit_allocation(front)                                                 # points x runs
    hist = an.load_histories(runs, ["train_loss", "val_accuracy", "scale.*"])
    an.plot_pareto(runs, "pareto.png")

``python -m analysis.report <experiment | parent run id>`` writes all of it
into a folder (``report.md``, PNGs, CSVs).
"""

from analysis.pareto import hypervolume, pareto_front, pareto_mask
from analysis.plots import PlotResult, plot_bit_allocation, plot_learning_curves, plot_pareto, plot_scales
from analysis.runs import (
    FLOAT_BITS,
    AnalysisError,
    bit_allocation,
    bits_columns,
    layer_order_of_run,
    load_histories,
    load_runs,
)
from analysis.sensitivity import layer_sensitivity

__all__ = [
    "AnalysisError", "FLOAT_BITS", "load_runs", "load_histories", "bit_allocation", "bits_columns",
    "layer_order_of_run", "pareto_front", "pareto_mask", "hypervolume", "layer_sensitivity", "PlotResult",
    "plot_pareto", "plot_bit_allocation", "plot_learning_curves", "plot_scales",
]
