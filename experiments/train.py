"""Train job: ``python -m experiments.train [overrides]`` (Hydra).

Examples::

    python -m experiments.train                                  # MLP on digits, float
    python -m experiments.train fixed=w8a8 +fixed.by_name.dense1.weight.data_config.bit_width=4
    python -m experiments.train -m fixed=float,w8a8,w4a4 model=mlp
    python -m experiments.train +experiment=mnist_mlp
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.cli import CONF_DIR, check_job_overrides, tee_to, user_errors
from experiments.training import run_training


def closing_lines(results: dict, cfg: dict, output_dir: str, fixed_name: str | None) -> list[str]:
    """What a person reads at the end: the result, where it is recorded, how to look, what to try next."""
    import mlflow

    run = mlflow.MlflowClient().get_run(results["run_id"])
    from experiments.tracking import without_passwords

    uri = without_passwords(mlflow.get_tracking_uri())  # a database password never reaches the console or train.log
    label = f"fixed={fixed_name}" if fixed_name else "the trained model"
    lines = [f"test_accuracy={results['test_accuracy']:.4f} run_id={results['run_id']}"]
    compared = results.get("compare_bits") or {}
    if compared:
        lines.append("Fixed point at work: the trained weights, every weight and activation rounded to N bits "
                     "(post-training, compare_bits):")
        lines.append(f"  {label:<22} test_accuracy {results['test_accuracy']:.4f}  (trained, the reference)")
        for bits, accuracy in compared.items():
            lines.append(f"  {f'{bits}-bit rounded':<22} test_accuracy {accuracy:.4f}  "
                         f"({accuracy - results['test_accuracy']:+.4f})")
    experiment = run.info.experiment_id
    lines += [
        f"Recorded: MLflow store {uri}, experiment {cfg.get('mlflow', {}).get('experiment_name', 'nics_fix')!r}, "
        f"run {run.info.run_name} ({results['run_id']})",
        f"Output folder: {Path(output_dir)} (train.log, checkpoint/, fixed_model/)",
        f"Look at it: mlflow ui --backend-store-uri {uri} --port 5000, then open "
        f"http://127.0.0.1:5000/#/experiments/{experiment}?workflowType=machine_learning (the runs table)",
        "Next: python -m experiments.train fixed=w4a4   (train in 4-bit fixed point; compare with the rows above)",
    ]
    return lines


def interrupted_line(err: BaseException, overrides: list[str]) -> str:
    """One line for an interrupted train job: what stopped, its run, the command that resumes it."""
    import mlflow

    run = mlflow.last_active_run()
    what = f"signal {str(err).split()[-1]}" if str(err).startswith("signal") else "Ctrl-C"
    if run is None:
        return f"interrupted ({what}) before the MLflow run started: nothing to resume"
    kept = [shlex.quote(o) for o in overrides if not o.lstrip("+").startswith("trainer.resume=")]
    command = " ".join(["python -m experiments.train", *kept, f"trainer.resume={run.info.run_id}"])
    return (f"interrupted ({what}): run {run.info.run_id} ended {run.info.status} after its last checkpoint; "
            f"resume it with: {command}")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    with tee_to(Path(output_dir) / f"{hydra_cfg.job.name}.log"), user_errors():
        plain = OmegaConf.to_container(cfg, resolve=True)  # a ${...} naming nothing: one error line
        check_job_overrides(plain)
        try:
            results = run_training(plain, output_dir=output_dir)
        except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the run is KILLED; say how to go on
            print(interrupted_line(err, [str(o) for o in hydra_cfg.overrides.task]), file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        lines = closing_lines(results, plain, output_dir, hydra_cfg.runtime.choices.get("fixed"))
        if hydra_cfg.mode.name == "MULTIRUN":  # jobs of a sweep (joblib: in parallel) print interleaved
            label = f"[job {hydra_cfg.job.num}: {hydra_cfg.job.override_dirname or 'defaults'}]"
            lines = [f"{label} {line}" for line in lines]
        print("\n".join(lines), flush=True)
    return float(results["objective"])


if __name__ == "__main__":
    main()
