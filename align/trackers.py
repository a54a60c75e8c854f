"""Experiment trackers beside metrics.jsonl and TensorBoard (``train.report_to``): wandb, mlflow, trackio.

Each gets every logged row (numbers only) at its step and the resolved config once. The packages are optional:
``align.config.validate`` refuses a tracker whose package is missing before anything starts.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _Wandb:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "align"), name=run_dir.name, dir=str(run_dir),
                              config=config)

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(_numbers(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, config: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "align"))
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({f"{sec}.{k}": str(v)[:250] for sec, vals in config.items() if isinstance(vals, dict)
                           for k, v in vals.items() if not isinstance(v, dict)})

    def log(self, step: int, metrics: dict) -> None:
        # mlflow metric names take no '@' (pass@k)
        self.mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in _numbers(metrics).items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Trackio:
    def __init__(self, run_dir: Path, config: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "align"), name=run_dir.name, config=config)

    def log(self, step: int, metrics: dict) -> None:
        self.trackio.log(_numbers(metrics), step=step)

    def close(self) -> None:
        self.trackio.finish()


TRACKERS = {"wandb": _Wandb, "mlflow": _MLflow, "trackio": _Trackio}


def open_trackers(names: list[str], run_dir: Path, config: dict) -> list:
    """The trackers named in ``train.report_to`` ("tensorboard" is ``output.tensorboard``, written anyway)."""
    return [TRACKERS[n](run_dir, config) for n in names if n in TRACKERS]
