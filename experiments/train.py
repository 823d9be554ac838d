"""Train job: ``python -m experiments.train [overrides]`` (Hydra).

Examples::

    python -m experiments.train                                  # MLP on digits, float
    python -m experiments.train fixed=w8a8 +fixed.by_name.dense1.weight.data_config.bit_width=4
    python -m experiments.train -m fixed=float,w8a8,w4a4 model=mlp
    python -m experiments.train +experiment=mnist_mlp
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.cli import CONF_DIR, user_errors
from experiments.training import run_training


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    with user_errors():
        results = run_training(OmegaConf.to_container(cfg, resolve=True),
                               output_dir=HydraConfig.get().runtime.output_dir)
    print(f"test_accuracy={results['test_accuracy']:.4f} run_id={results['run_id']}")
    return float(results["objective"])


if __name__ == "__main__":
    main()
