"""The stacked ensemble, the cost accounting and `predict --trials stacked` (issue 20).

The stacked CV is recomputed here by hand (its own fold loop, scipy's NNLS on centred columns for the
non-negative weights with a free intercept), never through raycv's scoring. Most tests read small run
directories written here; the last ones read the session's real smoke search (tests/conftest.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.optimize import nnls

from raycv import RaycvError
from raycv.config import DataConfig
from raycv.data import load_folds
from raycv.predict import chosen_trials, predict_run
from raycv.report import trial_wall_s, write_report
from raycv.scoring import compute_baselines, stack

from helpers import pooled_rmse


def nnls_with_intercept(features: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares with weights >= 0 and a free intercept: the intercept is the means' difference, the
    weights NNLS on the centred columns."""
    means = features.mean(axis=0)
    weights, _ = nnls(features - means, target - target.mean())
    return weights, float(target.mean() - means @ weights)


def stacked_by_hand(oofs: dict[str, pd.DataFrame]) -> dict:
    """The honest stacked CV from OOF tables: fold k predicted with weights fit on the other folds' rows."""
    trial_ids = list(oofs)
    table = oofs[trial_ids[0]][["id", "fold", "target"]].set_index("id")
    for trial_id in trial_ids:
        table[trial_id] = oofs[trial_id].set_index("id")["pred_last"]
    features, target = table[trial_ids].to_numpy(), table["target"].to_numpy()
    honest = np.empty(len(table))
    for fold in sorted(table["fold"].unique()):
        held_out = (table["fold"] == fold).to_numpy()
        weights, intercept = nnls_with_intercept(features[~held_out], target[~held_out])
        honest[held_out] = intercept + features[held_out] @ weights
    frame = pd.DataFrame({"fold": table["fold"].to_numpy(), "target": target, "pred": honest})
    weights, intercept = nnls_with_intercept(features, target)
    return {"cv_rmse_last": pooled_rmse(frame, "pred"),
            "fold_rmse_last": [pooled_rmse(part, "pred") for _, part in frame.groupby("fold")],
            "weights": dict(zip(trial_ids, weights, strict=True)), "intercept": intercept}


def noisy_oofs(noise: dict[str, float], rows: int = 240, folds: int = 4, seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    base = pd.DataFrame({"id": [f"r{i:03d}" for i in range(rows)], "fold": np.arange(rows) % folds,
                         "target": rng.normal(-1, 1, rows)})
    oofs = {}
    for trial_id, scale in noise.items():
        oof = base.copy()
        oof["pred_last"] = 0.8 * oof["target"] + 0.1 + rng.normal(0, scale, rows)  # shrunk and biased, as models are
        oof["pred_best"] = oof["pred_last"]
        oofs[trial_id] = oof.sample(frac=1, random_state=len(oofs)).reset_index(drop=True)  # rows in any order
    return oofs


# ---------------------------------------------------------------- the stacking itself, on small frames


def test_stack_matches_a_fold_loop_by_hand():
    oofs = noisy_oofs({"a": 0.4, "b": 0.6, "c": 0.5})
    stacked, expected = stack(oofs), stacked_by_hand(oofs)
    assert stacked["cv_rmse_last"] == pytest.approx(expected["cv_rmse_last"], abs=1e-9)
    assert stacked["fold_rmse_last"] == pytest.approx(expected["fold_rmse_last"], abs=1e-9)
    assert stacked["weights"] == pytest.approx(expected["weights"], abs=1e-9)
    assert stacked["intercept"] == pytest.approx(expected["intercept"], abs=1e-9)
    assert stacked["rows"] == 240 and len(stacked["fold_weights"]) == 4
    # Honest: weights fit on the rows they score do better than weights that never saw them.
    assert stacked["in_sample_rmse"] < stacked["cv_rmse_last"]
    # Stacking undoes the shared shrink and bias that averaging keeps.
    average = oofs["a"][["id", "target"]].copy()
    average["pred"] = np.mean([o.set_index("id").loc[average["id"], "pred_last"].to_numpy() for o in oofs.values()],
                              axis=0)
    assert stacked["cv_rmse_last"] < pooled_rmse(average, "pred")


def test_stack_gives_a_useless_trial_no_weight():
    oofs = noisy_oofs({"good": 0.3, "fair": 0.5})
    rng = np.random.default_rng(5)
    useless = oofs["good"].copy()
    useless["pred_last"] = -useless["target"] + rng.normal(0, 0.1, len(useless))  # anti-correlated
    stacked = stack({**oofs, "useless": useless})
    assert stacked["weights"]["useless"] == 0.0
    assert all(w >= 0 for part in stacked["fold_weights"] for w in part["weights"].values())
    assert stacked["weights"]["good"] > stacked["weights"]["fair"] > 0


def test_stack_needs_two_trials():
    with pytest.raises(ValueError, match="2 or more"):
        stack(noisy_oofs({"alone": 0.3}))


# ---------------------------------------------------------------- the cost arithmetic, on small frames


def test_a_trials_wall_time_runs_from_its_start_to_its_last_point():
    # Started at 1000 s; its training loop began at 1030 s (30 s of fold-worker start-up); points at 2 and 4.5 s.
    curve = pd.DataFrame({"fold_busy_s": [2.0, 4.0], "fold_callbacks_s": [0.0, 0.5], "reported_at": [1032.0, 1034.5]})
    assert trial_wall_s(1000.0, curve) == (pytest.approx(34.5), "trial start")
    assert trial_wall_s(None, curve) == (pytest.approx(4.5), "curve")  # start unknown: training time only
    # Restarted after point 2 (its fold workers' clock began again): the sessions' training times add up.
    restarted = pd.DataFrame({"fold_busy_s": [2.0, 4.0, 1.0, 3.0], "fold_callbacks_s": [0.0, 0.5, 0.0, 0.5],
                              "reported_at": [1032.0, 1034.5, 1091.0, 1093.5]})
    assert trial_wall_s(1000.0, restarted) == (pytest.approx(30 + 4.5 + 3.5), "trial start")
    assert trial_wall_s(1000.0, pd.DataFrame({"eval_point": [1]})) == (None, None)
    assert trial_wall_s(1000.0, None) == (None, None)


# ---------------------------------------------------------------- in the report, on the real data's folds


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, train_csv) -> Path:
    """A finished ASHA run written by hand on the real data's folds: three finished trials, one stopped by
    ASHA, one error. Every trial's fold workers take 20 s to start and 40 s an evaluation point (+1 s once);
    t_fair's start was not recorded (timed from its curve alone), t_third's workers restarted after point 3."""
    run_dir = tmp_path_factory.mktemp("stacking_run")
    table = load_folds(DataConfig(path=str(train_csv), num_folds=3, max_rows=300))
    table[["id", "fold", "target"]].to_csv(run_dir / "folds.csv", index=False)
    (run_dir / "baselines.json").write_text(json.dumps(compute_baselines(table)))
    config = {"data": {"num_folds": 3}, "resources": {"gpus_per_fold": 0.5, "cpus_per_fold": 2},
              "run": {"ensemble_top_k": 2, "gpu_hour_price": 2.5}}
    (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(0)
    trials = {"t_good": (0.45, "finished", 6, 1000.0), "t_fair": (0.6, "finished", 6, None),
              "t_third": (0.55, "finished", 6, 3000.0), "t_stopped": (0.9, "stopped", 2, 5000.0),
              "t_error": (None, "error", 0, 7000.0)}
    records = []
    for trial_id, (scale, status, points, started_s) in trials.items():
        if scale is not None:
            oof = table[["id", "fold", "target"]].copy()
            oof["pred_last"] = 0.7 * oof["target"] - 0.2 + rng.normal(0, scale, len(oof))
            oof["pred_best"] = oof["pred_last"]
            (run_dir / "oof").mkdir(exist_ok=True)
            oof.to_csv(run_dir / "oof" / f"{trial_id}.csv", index=False)
            busy = 40.0 * np.arange(1, points + 1)
            if trial_id == "t_third":
                busy = np.concatenate([busy[:3], busy[:3]])  # its clock began again at the restart
            curve = pd.DataFrame({"eval_point": range(1, points + 1), "cv_rmse_last": np.linspace(1.0, scale, points),
                                  "fold_busy_s": busy, "fold_callbacks_s": 1.0,
                                  "reported_at": (started_s or 0) + 20 + busy + 1 + 500 * (np.arange(points) >= 3)
                                  * (trial_id == "t_third")})  # t_third's second session began 500 s later
            (run_dir / "curves").mkdir(exist_ok=True)
            curve.to_csv(run_dir / "curves" / f"{trial_id}.csv", index=False)
        records.append({"trial_id": trial_id, "params": {"train.lr": 1e-5}, "status": status, "eval_points": points,
                        "reason": "fold 0: boom" if status == "error" else None, "started_s": started_s,
                        "restarts": int(trial_id == "t_third"), "points_redone": 2 * int(trial_id == "t_third")})
    (run_dir / "run.json").write_text(json.dumps(
        {"name": "stacking", "num_points": 6, "max_t": 6, "scheduler": "asha", "searched": ["train.lr"],
         "state": "finished", "trials": records}))
    return run_dir


def test_the_report_stacks_every_finished_trial_with_an_honest_cv(run_dir):
    report = write_report(run_dir)["report"]
    stacked = report["stacked_ensemble"]
    finished = ["t_good", "t_third", "t_fair"]
    assert stacked["trials"] == [t["trial_id"] for t in report["trials"] if t["status"] == "finished"]
    assert sorted(stacked["trials"]) == sorted(finished) and stacked["num_trials"] == 3
    oofs = {t: pd.read_csv(run_dir / "oof" / f"{t}.csv", dtype={"id": str}) for t in stacked["trials"]}
    expected = stacked_by_hand(oofs)
    assert stacked["cv_rmse_last"] == pytest.approx(expected["cv_rmse_last"], abs=1e-9)
    assert stacked["fold_rmse_last"] == pytest.approx(expected["fold_rmse_last"], abs=1e-9)
    assert stacked["weights"] == pytest.approx(expected["weights"], abs=1e-9)
    assert stacked["intercept"] == pytest.approx(expected["intercept"], abs=1e-9)
    assert stacked["num_weighted"] == sum(w > 0 for w in expected["weights"].values())
    assert stacked["reason"] is None and stacked["rows"] == 300
    # Beside the best trial and the top-k average: the trials' shared shrink is undone, so stacking wins.
    best = next(t for t in report["trials"] if t["trial_id"] == report["best_trial"])
    assert stacked["cv_rmse_last"] < report["top_k_ensemble"]["cv_rmse_last"] < best["cv_rmse_last"]
    text = (run_dir / "report.md").read_text()
    section = text.split("## Stacked ensemble")[1].split("\n## ")[0]
    assert f"| stacked ensemble (weights fit on the other folds) | {stacked['cv_rmse_last']:.4f} |" in section
    assert f"| best trial {best['trial_id']} |" in section and "All 3 finished trials stacked" in section


def test_cost_totals_are_the_sum_of_the_trials(run_dir):
    report = write_report(run_dir)["report"]
    cost = report["cost"]
    rows = {row["trial_id"]: row for row in cost["trials"]}
    assert [row["trial_id"] for row in cost["trials"]] == [t["trial_id"] for t in report["trials"]]
    # folds x per-fold resources x wall time: 20 s of start-up and 6 points of 40 s (+1 s)
    assert rows["t_good"]["wall_s"] == pytest.approx(261.0) and rows["t_good"]["wall_s_source"] == "trial start"
    assert rows["t_good"]["worker_s"] == pytest.approx(3 * 261.0)
    assert rows["t_good"]["cpu_s"] == pytest.approx(3 * 2 * 261.0)
    assert rows["t_good"]["gpu_s"] == pytest.approx(3 * 0.5 * 261.0)
    assert rows["t_good"]["gpu_cost"] == pytest.approx(3 * 0.5 * 261.0 / 3600 * 2.5)
    assert rows["t_fair"]["wall_s"] == pytest.approx(241.0) and rows["t_fair"]["wall_s_source"] == "curve"
    assert rows["t_third"]["wall_s"] == pytest.approx(20 + 121 + 121)  # two sessions of 3 points
    assert rows["t_stopped"]["wall_s"] == pytest.approx(20 + 81)
    assert rows["t_error"]["wall_s"] is None and rows["t_error"]["gpu_s"] is None
    assert rows["t_third"]["points_trained"] == 8  # 6 points and 2 redone after a restart
    total = cost["total"]
    for key in ("wall_s", "worker_s", "cpu_s", "gpu_s", "eval_points", "points_trained"):
        assert total[key] == pytest.approx(sum(row[key] or 0 for row in cost["trials"])), key
    assert total["gpu_hours"] == pytest.approx(total["gpu_s"] / 3600)
    assert total["gpu_cost"] == pytest.approx(sum(row["gpu_cost"] or 0 for row in cost["trials"]))
    assert total["trials_without_wall_time"] == ["t_error"]
    # ASHA stopped t_stopped at point 2 of max_t 6: 4 of 4 x 6 points saved, at the run's mean GPU-s a point.
    asha = cost["asha_saved"]
    assert asha["points_saved"] == 4 and asha["points_if_all_ran_to_max_t"] == 24
    assert asha["fraction_saved"] == pytest.approx(4 / 24)
    per_point = total["gpu_s"] / (6 + 6 + 8 + 2)
    assert asha["gpu_s_per_point"] == pytest.approx(per_point)
    assert asha["gpu_hours_saved"] == pytest.approx(4 * per_point / 3600)
    assert asha["gpu_cost_saved"] == pytest.approx(4 * per_point / 3600 * 2.5)
    text = (run_dir / "report.md").read_text()
    assert "## Cost" in text and "ASHA saved 4 of 24 evaluation points (17%)" in text
    summary = write_report(run_dir)["summary"]
    assert "stacked ensemble of 3 trials" in summary and "ASHA saved 4 of 24 points (17%)" in summary


def test_without_two_finished_trials_the_stacked_ensemble_says_why(run_dir, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(run_dir, alone)
    state = json.loads((alone / "run.json").read_text())
    for trial in state["trials"]:
        if trial["trial_id"] in ("t_fair", "t_third"):
            trial["status"] = "stopped"
    state["scheduler"] = "none"  # (by hand: no scheduler stops trials, so nothing is saved)
    (alone / "run.json").write_text(json.dumps(state))
    paths = write_report(alone)
    stacked = paths["report"]["stacked_ensemble"]
    assert stacked["cv_rmse_last"] is None and stacked["weights"] is None and stacked["num_trials"] == 1
    assert stacked["reason"] == "1 finished trial(s) with predictions; stacking needs 2 or more"
    assert "None: 1 finished trial(s)" in (alone / "report.md").read_text()
    assert "stacked ensemble: none (1 finished trial(s)" in paths["summary"]
    assert "Scheduler none: every trial runs to max_t" in (alone / "report.md").read_text()
    assert "ASHA" not in paths["summary"] and paths["report"]["cost"]["asha_saved"]["scheduler"] == "none"
    with pytest.raises(RaycvError, match="--trials stacked: the run has no stacked ensemble"):
        chosen_trials(paths["report"], "stacked")
    # Without gpu_hour_price and with a CPU run: GPU time is 0, money is not shown.
    config = yaml.safe_load((alone / "resolved_config.yaml").read_text())
    config["resources"]["gpus_per_fold"], config["run"]["gpu_hour_price"] = 0, None
    (alone / "resolved_config.yaml").write_text(yaml.safe_dump(config))
    cost = write_report(alone)["report"]["cost"]
    assert cost["total"]["gpu_s"] == 0 and cost["total"]["gpu_cost"] is None
    assert cost["asha_saved"]["gpu_cost_saved"] is None
    assert cost["total"]["worker_s"] > 0 and "GPU cost" not in (alone / "report.md").read_text()


def test_oof_files_that_cannot_be_stacked_give_a_reason_not_a_traceback(run_dir, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(run_dir, edited)
    for trial_id in ("t_good", "t_fair", "t_third"):  # no row in common with any other trial's
        oof = pd.read_csv(edited / "oof" / f"{trial_id}.csv", dtype={"id": str})
        oof["id"] = trial_id + oof["id"]
        oof.to_csv(edited / "oof" / f"{trial_id}.csv", index=False)
    stacked = write_report(edited)["report"]["stacked_ensemble"]
    assert stacked["cv_rmse_last"] is None and stacked["reason"] == (
        "cannot stack the finished trials: the trials' OOF predictions share rows of fewer than two folds")


def test_a_stacked_ensemble_worse_than_the_best_trial_is_said_so_when_predicting(run_dir):
    """Weights fit to trials whose predictions barely vary (a short smoke run) can be in the thousands and
    score worse than the best trial on the folds they were not fit on; `predict --trials stacked` says so."""
    from raycv.predict import worse_than_best

    report = write_report(run_dir)["report"]
    assert worse_than_best(report) == ""  # here it beats every trial
    best = next(t for t in report["trials"] if t["trial_id"] == report["best_trial"])
    report["stacked_ensemble"]["cv_rmse_last"] = best["cv_rmse_last"] + 0.25
    assert worse_than_best(report) == (
        f"\nnote: the stacked ensemble's CV RMSE ({best['cv_rmse_last'] + 0.25:.4f}, its weights fit on the other "
        f"folds) is worse than the best trial's ({best['cv_rmse_last']:.4f}); --trials best may serve better")


def test_stacked_prediction_needs_the_weighted_trials_models(run_dir):
    report = write_report(run_dir)["report"]
    weights, intercept, keep = chosen_trials(report, "stacked")
    assert weights == {t: w for t, w in report["stacked_ensemble"]["weights"].items() if w > 0}
    assert keep == max(report["stacked_ensemble"]["trials"].index(t) + 1 for t in weights)
    with pytest.raises(RaycvError) as raised:
        predict_run(run_dir, report, "stacked", "unused.csv")
    message = str(raised.value)
    assert "\n" not in message and f"run.keep_fold_models={keep}" in message


# ---------------------------------------------------------------- the real smoke search (a Ray run, once a session)


@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_the_smoke_run_reports_a_stacked_ensemble_and_its_cost(smoke_run):
    run_dir, report = smoke_run["run_dir"], smoke_run["report"]
    stacked = report["stacked_ensemble"]
    finished = [t["trial_id"] for t in report["trials"] if t["status"] == "finished"]
    assert stacked["trials"] == finished and len(finished) >= 2, report["trials"]
    oofs = {t: pd.read_csv(run_dir / "oof" / f"{t}.csv", dtype={"id": str}) for t in finished}
    expected = stacked_by_hand(oofs)
    assert stacked["cv_rmse_last"] == pytest.approx(expected["cv_rmse_last"], abs=1e-6)
    assert stacked["fold_rmse_last"] == pytest.approx(expected["fold_rmse_last"], abs=1e-6)
    assert stacked["weights"] == pytest.approx(expected["weights"], abs=1e-6)
    out = smoke_run["proc"].stdout
    assert f"stacked ensemble of {len(finished)} trials: cv_rmse_last {stacked['cv_rmse_last']:.4f}" in out
    cost = report["cost"]
    for key in ("wall_s", "worker_s", "cpu_s", "gpu_s", "eval_points", "points_trained"):
        assert cost["total"][key] == pytest.approx(sum(row[key] for row in cost["trials"])), key
    started = {t["trial_id"]: t["started_s"] for t in json.loads((run_dir / "run.json").read_text())["trials"]}
    for row in cost["trials"]:
        assert row["wall_s_source"] == "trial start" and row["wall_s"] > 0, row
        assert row["cpu_s"] == pytest.approx(3 * 0.5 * row["wall_s"]) and row["gpu_s"] == 0
        curve = pd.read_csv(run_dir / "curves" / f"{row['trial_id']}.csv")
        assert row["eval_points"] == len(curve)
        # One session each: from the trial's start to its last point, by hand.
        assert row["wall_s"] == pytest.approx(curve["reported_at"].iloc[-1] - started[row["trial_id"]], abs=2.0)
        # Tune's own clock (its result rows, in the storage once the run is over) agrees: it starts the trial a
        # moment after the tracker sees it and stops once the last point's checkpoint is stored.
        rows = [json.loads(line) for line in (run_dir / "ray" / "tune" / row["trial_id"] / "result.json").open()]
        assert abs(row["wall_s"] - rows[-1]["time_total_s"]) < 0.2 * rows[-1]["time_total_s"], (row, rows[-1])
    stopped = [row for row in cost["trials"] if row["status"] == "stopped"]
    assert cost["asha_saved"]["points_saved"] == sum(6 - row["eval_points"] for row in stopped)
    assert cost["asha_saved"]["points_if_all_ran_to_max_t"] == 6 * len(cost["trials"])
    assert f"ASHA saved {cost['asha_saved']['points_saved']} of" in out


@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_predict_stacked_writes_the_weighted_submission(smoke_run, train_csv, tmp_path, capsys):
    """`raycv predict RUN --trials stacked`. The smoke run keeps the best trial's fold models only
    (run.keep_fold_models 1): a stacked prediction that weights another trial is refused in one line naming
    the setting, exit 2, nothing written. In a copy whose every finished trial has kept models (the best
    trial's files under the others' names: what is checked is the weighting, not the models), the submission
    is intercept + sum(weight x the trial's fold-model average)."""
    from raycv.cli import main
    from raycv.predict import predict_texts

    run_dir, report = smoke_run["run_dir"], smoke_run["report"]
    seen = set(pd.read_csv(run_dir / "folds.csv", dtype={"id": str})["id"])
    rows = pd.read_csv(train_csv, dtype={"id": str})
    test = rows[~rows["id"].isin(seen)].head(30)[["id", "excerpt"]]
    data, out = str(tmp_path / "test.csv"), tmp_path / "submission.csv"
    test.to_csv(data, index=False)
    weights, intercept, keep = chosen_trials(report, "stacked")
    if keep > 1:
        assert main(["predict", str(run_dir), "--data", data, "--out", str(out), "--trials", "stacked"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"set it to {keep} or more before the search: run.keep_fold_models={keep}" in line
        assert not out.exists()

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ray"))
    for trial_id in report["stacked_ensemble"]["trials"]:
        if not (copy / "models" / trial_id).is_dir():
            shutil.copytree(copy / "models" / report["best_trial"], copy / "models" / trial_id)
    assert main(["predict", str(copy), "--data", data, "--out", str(out), "--trials", "stacked"]) == 0
    printed = capsys.readouterr().out
    assert "the stacked ensemble: intercept" in printed
    best_cv = next(t["cv_rmse_last"] for t in report["trials"] if t["trial_id"] == report["best_trial"])
    note = "note: the stacked ensemble's CV RMSE ("
    assert (note in printed) == (report["stacked_ensemble"]["cv_rmse_last"] > best_cv), printed
    submission = pd.read_csv(out, dtype={"id": str})
    assert list(submission.columns) == ["id", "target"] and submission["id"].tolist() == test["id"].tolist()
    expected = intercept + sum(w * predict_texts(copy, [t], data)["target"].to_numpy() for t, w in weights.items())
    assert submission["target"].to_numpy() == pytest.approx(expected, abs=1e-5)
    best = predict_texts(copy, [report["best_trial"]], data)["target"].to_numpy()
    assert not np.allclose(submission["target"].to_numpy(), best)  # the weights and intercept moved it
