"""Experiment tracking and model-based search for `raycv tune`, through Ray Tune's own integrations.

    raycv tune spaces/smoke.yaml run.mlflow.tracking_uri=sqlite:///mlflow.db search.algorithm=optuna

- `run.mlflow.tracking_uri` set: Tune's `MLflowLoggerCallback` (it runs in the Tune driver) makes every
  trial an MLflow run of the experiment `run.mlflow.experiment`, named and tagged (`trial_name`) with the
  trial id, with the trial's searched values as params and every reported metric (`cv_rmse_last`,
  `cv_rmse_best`, `fold_K_rmse_last`, ...) at each evaluation point (Tune's `training_iteration` is the
  step). At the end `attach_report` logs the run directory's report to the best trial's MLflow run.
- `search.algorithm: optuna`: Tune's `OptunaSearch` (Optuna's TPE) picks each trial's values from the
  results so far, under the same ASHA; its metric and mode (`cv_rmse`, min) come from the TuneConfig.

Both packages are extras (`pip install 'raycv[mlflow]'`, `'raycv[optuna]'`): `preflight.check_extras`
refuses a setting whose package is missing before Ray starts, and only these functions import them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from raycv import RaycvError
from raycv.config import Config

if TYPE_CHECKING:
    from ray.tune.search import Searcher

ARTIFACT_DIR = "raycv_report"  # the artifacts' folder in the MLflow run


def tracking_callbacks(config: Config) -> list:
    """Tune callbacks for `run.mlflow`; none when it is off."""
    mlflow = config.run.mlflow
    if not mlflow.tracking_uri:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback  # imports mlflow: only when it is asked for

    return [MLflowLoggerCallback(tracking_uri=mlflow.tracking_uri, experiment_name=mlflow.experiment,
                                 tags={"raycv_run": config.run.name, "raycv_output_dir": config.run.output_dir})]


def search_algorithm(config: Config) -> Searcher | None:
    """None for `random` (Tune's own random draws and grids), else Optuna's TPE."""
    if config.search.algorithm == "random":
        return None
    from ray.tune.search.optuna import OptunaSearch  # imports optuna: only when it is asked for

    return OptunaSearch()  # metric/mode from TuneConfig; grids were refused by validation


def attach_report(config: Config, trial_id: str, files: list[Path]) -> str:
    """Log the report's files (`write_report`'s "files") to the MLflow run the callback made for `trial_id` (the newest,
    should --resume have made a second); the run's id."""
    from mlflow import MlflowClient

    mlflow = config.run.mlflow
    client = MlflowClient(tracking_uri=mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(mlflow.experiment)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.trial_name = '{trial_id}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    ) if experiment else []
    if not runs:
        raise RaycvError(f"no MLflow run of trial {trial_id} in experiment {mlflow.experiment} at "
                         f"{mlflow.tracking_uri}")
    run_id = runs[0].info.run_id
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_DIR)
    return run_id
