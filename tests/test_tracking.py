"""MLflow tracking (`run.mlflow`) and Optuna's TPE (`search.algorithm: optuna`) through Ray Tune's own
integrations: two small `raycv tune` runs of the shipped smoke space on a real local Ray, read back with
MLflow's client and Optuna's study; and the checks that refuse what cannot run, before Ray starts.

Each run is a subprocess with a hard time limit (its process group is killed past it) and shrunk with
overrides: 2 trials at a time, 2 folds of 120 validation rows, 3 evaluation points.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pandas as pd
import pytest

from raycv.cli import main
from raycv.preflight import check_extras, check_mlflow_store
from raycv.spaces import load_config

from helpers import SPACES_DIR, run_raycv

SMOKE = str(SPACES_DIR / "smoke.yaml")
# The smoke space, smaller: 2 trials (2 Optuna draws) of 2 folds x 3 points, ASHA stopping after the first.
# Both trials at once (0.25 CPU per fold: 2 x (2 x 0.25 + a driver's share) fits 2 cores): start-up overlaps.
SMALL = ["data.num_folds=2", "data.max_rows=240", "train.epochs=3", "search.num_samples=2",
         "scheduler.grace_period=1", "resources.cpus_per_fold=0.25", "run.max_concurrent_trials=2"]
OPTUNA_PARAMS = "search.params={train.lr: {loguniform: [1.0e-4, 3.0e-3]}, train.seed: {randint: [0, 10000]}}"
RUN_LIMIT_S = 600  # a hang fails the test; the run takes about a minute


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, train_csv) -> dict:
    """One search that both integrations serve: Optuna's TPE chooses the trials (under ASHA), and every trial
    is an MLflow run."""
    cwd = tmp_path_factory.mktemp("tracked")
    tracking_uri = f"sqlite:///{cwd / 'mlflow.db'}"
    proc = run_raycv(["tune", SMOKE, f"data.path={train_csv}", *SMALL, "search.algorithm=optuna", OPTUNA_PARAMS,
                      f"run.mlflow.tracking_uri={tracking_uri}"], cwd=cwd, timeout=RUN_LIMIT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    run_dir = cwd / "runs" / "smoke"
    return {"proc": proc, "run_dir": run_dir, "report": json.loads((run_dir / "report.json").read_text()),
            "tracking_uri": tracking_uri, "cwd": cwd}


# ---------------------------------------------------------------- MLflow


@pytest.mark.ray
@pytest.mark.timeout(RUN_LIMIT_S + 60)
def test_every_trial_is_an_mlflow_run_and_the_best_gets_the_report(tracked_run, tmp_path):
    from mlflow import MlflowClient

    run, tracking_uri = tracked_run, tracked_run["tracking_uri"]
    report, run_dir = run["report"], run["run_dir"]
    trials = {t["trial_id"]: t for t in report["trials"]}
    assert len(trials) == 2

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("smoke")  # run.mlflow.experiment defaults to run.name
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(trials)  # one MLflow run per trial, named by its id
    for mlflow_run in runs:
        trial = trials[mlflow_run.info.run_name]
        assert mlflow_run.data.tags["trial_name"] == trial["trial_id"]
        assert mlflow_run.info.status == "FINISHED"
        # The trial's hyperparameters as params (MLflow keeps them as strings).
        assert {k: float(v) for k, v in mlflow_run.data.params.items()} == pytest.approx(trial["params"])
        # One value per evaluation point Tune saw, equal to the trial's curve in the run directory. A finished
        # trial: every point it trained. One ASHA stopped: up to the point it was stopped at -- its workers
        # may train one more before the stop reaches them, which the curve (and the report) holds and Tune,
        # hence MLflow, never sees (as in tests/test_seeds.py).
        curve = pd.read_csv(run_dir / "curves" / f"{trial['trial_id']}.csv")
        assert len(curve) == trial["eval_points"] >= 1
        seen = len(client.get_metric_history(mlflow_run.info.run_id, "cv_rmse_last"))
        assert seen == len(curve) or (trial["status"] == "stopped" and seen == len(curve) - 1 >= 1), (seen, trial)
        for metric in ("cv_rmse_last", "cv_rmse_best", "fold_0_rmse_last", "fold_1_rmse_best"):
            history = sorted(client.get_metric_history(mlflow_run.info.run_id, metric), key=lambda m: m.step)
            assert [m.step for m in history] == list(range(1, seen + 1)), metric
            assert [m.value for m in history] == pytest.approx(curve[metric].tolist()[:seen], abs=1e-9), metric
        assert mlflow_run.data.metrics["cv_rmse"] == pytest.approx(curve["cv_rmse_last"].iloc[seen - 1], abs=1e-9)

    # The final report, on the best trial's run only.
    by_trial = {r.info.run_name: r.info.run_id for r in runs}
    best = report["best_trial"]
    assert best and f"mlflow: report attached to run {by_trial[best]} (best trial {best})" in run["proc"].stdout
    names = {Path(a.path).name for a in client.list_artifacts(by_trial[best], "raycv_report")}
    assert {"report.md", "report.json", "trials.csv"} <= names
    local = client.download_artifacts(by_trial[best], "raycv_report/report.json", str(tmp_path / "download"))
    assert json.loads(Path(local).read_text()) == report
    for trial_id, run_id in by_trial.items():
        if trial_id != best:
            assert client.list_artifacts(run_id) == []


# ---------------------------------------------------------------- Optuna


@pytest.mark.ray
@pytest.mark.timeout(RUN_LIMIT_S + 60)
def test_optuna_chooses_the_trials_under_asha(tracked_run):
    from ray.tune.search.optuna import OptunaSearch

    run = tracked_run
    report, run_dir = run["report"], run["run_dir"]
    assert len(report["trials"]) == 2 and report["best_trial"]
    assert (run_dir / "report.md").stat().st_size > 0
    for trial in report["trials"]:
        assert trial["status"] in ("finished", "stopped") and trial["eval_points"] >= 1
        assert 1e-4 <= trial["params"]["train.lr"] <= 3e-3 and 0 <= trial["params"]["train.seed"] < 10000

    # The values came from Optuna's study, which Tune saved with the experiment: one Optuna trial per Tune
    # trial, with the same values, told the cv_rmse it ended on (a finished trial's: its last point's).
    (state,) = (run_dir / "ray" / "tune").glob("searcher-state-*.pkl")
    searcher = OptunaSearch()
    searcher.restore(str(state))
    study = searcher._ot_study
    assert study.direction.name == "MINIMIZE"
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    told = {(t.params["train.lr"], t.params["train.seed"]): t.value for t in study.trials}
    ran = {(t["params"]["train.lr"], t["params"]["train.seed"]): t for t in report["trials"]}
    assert told.keys() == ran.keys()
    for values, trial in ran.items():
        if trial["status"] == "finished":
            assert told[values] == pytest.approx(trial["cv_rmse_last"], abs=1e-9)


# ---------------------------------------------------------------- refused before anything starts


def refused(argv: list[str], capsys) -> list[str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 2, (captured.out, captured.err)
    assert "Traceback" not in captured.err
    return captured.err.splitlines()


def test_optuna_with_a_grid_is_refused_naming_the_key(train_csv, capsys):
    lines = refused(["validate", SMOKE, f"data.path={train_csv}", "search.algorithm=optuna"], capsys)
    assert len(lines) == 2, lines  # smoke.yaml's two grids, each named
    assert lines[0].endswith(
        "search.params.train.lr.grid: search.algorithm optuna cannot search a grid (Optuna draws each value, it "
        "does not enumerate them); use choice: [0.003, 0.0001] or search.algorithm=random")
    assert lines[1].endswith("search.params.train.seed.grid: search.algorithm optuna cannot search a grid (Optuna "
                             "draws each value, it does not enumerate them); use choice: [7, 8] or "
                             "search.algorithm=random")


def test_optuna_without_searched_keys_is_refused(train_csv, capsys):
    lines = refused(["validate", SMOKE, f"data.path={train_csv}", "search.algorithm=optuna", "search.params={}"],
                    capsys)
    assert len(lines) == 1 and "search.algorithm: optuna needs at least one key under search.params" in lines[0]


def test_a_setting_whose_extra_is_missing_is_refused_with_the_install_command(train_csv, capsys, monkeypatch):
    """The packages are installed here (the test extra); a None in sys.modules makes their import fail."""
    argv = ["validate", SMOKE, f"data.path={train_csv}", "run.mlflow.tracking_uri=sqlite:///mlflow.db",
            "search.algorithm=optuna", OPTUNA_PARAMS, "--no-model"]
    config = load_config(argv[1], [a for a in argv[2:] if "=" in a])
    assert check_extras(config) == []  # installed: nothing to say
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "optuna", None)
    lines = refused(argv, capsys)
    assert lines == [
        f"raycv: error: {SMOKE}: run.mlflow.tracking_uri: needs MLflow, which is not installed; install it with "
        "pip install 'raycv[mlflow]' (or unset run.mlflow.tracking_uri)",
        f"raycv: error: {SMOKE}: search.algorithm: needs Optuna, which is not installed; install it with "
        "pip install 'raycv[optuna]' (or unset search.algorithm)",
    ]


def test_a_file_store_mlflow_refuses_is_reported(monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (line,) = check_mlflow_store("file:/tmp/mlruns")
    assert line.startswith("run.mlflow.tracking_uri: file:/tmp/mlruns is a file store") and "sqlite:///" in line
    assert len(check_mlflow_store("mlruns")) == 1  # a bare path is a file store too
    with socket.socket() as server:  # a server that answers on its port
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        answering = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert check_mlflow_store("sqlite:///mlflow.db") == check_mlflow_store(answering) == []
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert check_mlflow_store("file:/tmp/mlruns") == []


def test_the_experiment_defaults_to_the_run_name(train_csv):
    config = load_config(SMOKE, [f"data.path={train_csv}", "run.mlflow.tracking_uri=sqlite:///mlflow.db"])
    assert config.run.mlflow.experiment == "smoke"
    config = load_config(SMOKE, [f"data.path={train_csv}", "run.mlflow.tracking_uri=sqlite:///mlflow.db",
                                 "run.mlflow.experiment=commonlit"])
    assert config.run.mlflow.experiment == "commonlit"
    assert load_config(SMOKE, [f"data.path={train_csv}"]).run.mlflow.experiment is None  # off: nothing set
