"""Bit allocation search: ``python -m experiments.search [overrides]`` (Hydra).

Composes ``conf/search.yaml`` (the train config plus the ``search`` group) and
hands it to :func:`experiments.searching.run_search`. Examples::

    python -m experiments.search                                   # TPE, 20 trials, MLP on digits
    python -m experiments.search search.sampler=random search.n_trials=30
    python -m experiments.search 'search.pin={dense1:8,dense3:8}' search.baseline=uniform
    python -m experiments.search search.objective=budget search.budget=20000 trainer.epochs=5

Running the same command again resumes the study (same ``search.study_name``
and storage).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.cli import CONF_DIR, check_job_overrides, user_errors



@hydra.main(version_base=None, config_path=CONF_DIR, config_name="search")
def main(cfg: DictConfig) -> int:
    from hydra.core.hydra_config import HydraConfig

    from experiments import tracking
    from experiments.searching import SearchConfigError, run_search

    with user_errors((SearchConfigError,)):
        check_job_overrides(cfg)
        summary = run_search(OmegaConf.to_container(cfg, resolve=True),
                             output_dir=HydraConfig.get().runtime.output_dir,
                             choices=tracking.hydra_choices())
    if summary.get("interrupted"):
        sys.exit(130)
    return len(summary["pareto"])


if __name__ == "__main__":
    main()
