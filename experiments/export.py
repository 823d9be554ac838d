"""Export job: ``python -m experiments.export run_id=<id>`` (or ``model_path=<fixed_model folder>``).

Restores the run's saved fixed model and writes it as plain integers
(:func:`nics_fix.export_integer_model`) as the run's ``integer_model/``
artifact (``output=<folder>`` also keeps a copy there).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.cli import CONF_DIR, user_errors
from experiments.evaluation import EvalInputError


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    import nics_fix as nf
    from experiments.integer import run_export

    with user_errors(extra=(EvalInputError, nf.ExportError)):
        results = run_export(OmegaConf.to_container(cfg, resolve=True))
    where = f"artifact integer_model/ of run {results['run_id']}" if results["run_id"] else results["path"]
    print(f"integer model: {results['integer_bytes']} bytes (float weights {results['float_bytes']} bytes) "
          f"-> {where}")


if __name__ == "__main__":
    main()
