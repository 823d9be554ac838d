"""Eval job: ``python -m experiments.eval run_id=<id>`` or ``model_path=<fixed_model folder>``.

Restores the saved fixed model, evaluates it in not_training mode on the
same test split, and reports whether it reproduces the recorded accuracy.
``log_to=same|new|none`` chooses where the result is recorded; ``integer=true``
also evaluates with the integer engine (the run's ``integer_model`` artifact,
or an export made on the spot) and reports whether it matches exactly.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.cli import CONF_DIR, check_job_overrides, user_errors
from experiments.evaluation import EvalInputError, run_eval


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> float:
    import nics_fix as nf

    with user_errors(extra=(EvalInputError, nf.ExportError)):
        check_job_overrides(cfg)
        results = run_eval(OmegaConf.to_container(cfg, resolve=True))
    recorded = results["recorded_test_accuracy"]
    note = "" if recorded is None else (
        " (reproduces the recorded accuracy exactly)" if results["reproduced"]
        else f" (recorded {recorded:.6f}: NOT reproduced)")
    print(f"test_accuracy={results['test_accuracy']:.6f}{note}")
    if "integer_test_accuracy" in results:
        same = "matches the simulator exactly" if results["integer_matches"] else "DIFFERS from the simulator"
        print(f"integer_test_accuracy={results['integer_test_accuracy']:.6f} ({same}; "
              f"{results['integer_identical_outputs']} of {results['integer_outputs']} outputs bit-identical)")
    return float(results["test_accuracy"])


if __name__ == "__main__":
    main()
