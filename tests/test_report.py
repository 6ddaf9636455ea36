"""The collector and report on a run directory laid out as `raycv tune` leaves it, without Ray.

The run is written here by hand on the real data's folds, so the statuses Ray rarely produces on 2 cores
(an errored trial with no predictions, a stopped trial that scores better than every finished one) are
covered too.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from raycv.cli import main
from raycv.config import DataConfig
from raycv.data import load_folds
from raycv.report import write_report
from raycv.scoring import compute_baselines


def hand_rmse(truth, pred) -> float:
    return float(np.sqrt(np.mean((np.asarray(truth) - np.asarray(pred)) ** 2)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, train_csv) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    table = load_folds(DataConfig(path=str(train_csv), num_folds=3, max_rows=300))
    table[["id", "fold", "target"]].to_csv(run_dir / "folds.csv", index=False)
    (run_dir / "baselines.json").write_text(json.dumps(compute_baselines(table)))
    (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump({"run": {"ensemble_top_k": 3}}))
    rng = np.random.default_rng(0)
    noise = {"t_good": 0.5, "t_fair": 0.7, "t_stopped": 0.3}  # the stopped trial looks best: it must not win
    for trial_id, scale in noise.items():
        oof = table[["id", "fold", "target"]].copy()
        oof["pred_best"] = oof["target"] + rng.normal(0, scale, len(oof))
        oof["pred_last"] = oof["target"] + rng.normal(0, scale * 1.1, len(oof))
        (run_dir / "oof").mkdir(exist_ok=True)
        oof.to_csv(run_dir / "oof" / f"{trial_id}.csv", index=False)
        points = 2 if trial_id == "t_stopped" else 6
        curve = pd.DataFrame({"eval_point": range(1, points + 1), "cv_rmse_last": np.linspace(1.0, scale, points)})
        (run_dir / "curves").mkdir(exist_ok=True)
        curve.to_csv(run_dir / "curves" / f"{trial_id}.csv", index=False)
    trials = [
        {"trial_id": "t_good", "params": {"train.lr": 3e-5}, "status": "finished", "eval_points": 6, "reason": None},
        {"trial_id": "t_fair", "params": {"train.lr": 1e-5}, "status": "finished", "eval_points": 6, "reason": None},
        {"trial_id": "t_stopped", "params": {"train.lr": 5e-6}, "status": "stopped", "eval_points": 2, "reason": None},
        {"trial_id": "t_error", "params": {"train.lr": 9e-5}, "status": "error", "eval_points": 0,
         "reason": "fold 1: RuntimeError: worker died"},
    ]
    (run_dir / "run.json").write_text(json.dumps(
        {"name": "handmade", "num_points": 6, "max_t": 6, "scheduler": "asha", "searched": ["train.lr"],
         "state": "finished", "trials": trials}))
    return run_dir


def test_report_json_scores_every_trial_from_its_oof(run_dir):
    report = write_report(run_dir)["report"]
    assert report == json.loads((run_dir / "report.json").read_text())
    by_id = {t["trial_id"]: t for t in report["trials"]}
    assert set(by_id) == {"t_good", "t_fair", "t_stopped", "t_error"}
    for trial_id in ("t_good", "t_fair", "t_stopped"):
        oof = pd.read_csv(run_dir / "oof" / f"{trial_id}.csv")
        assert by_id[trial_id]["cv_rmse_best"] == pytest.approx(hand_rmse(oof["target"], oof["pred_best"]), abs=1e-12)
        assert by_id[trial_id]["cv_rmse_last"] == pytest.approx(hand_rmse(oof["target"], oof["pred_last"]), abs=1e-12)
        per_fold = [hand_rmse(f["target"], f["pred_last"]) for _, f in oof.groupby("fold")]
        assert by_id[trial_id]["fold_rmse_last"] == pytest.approx(per_fold, abs=1e-12)
        assert by_id[trial_id]["fold_rmse_last_std"] == pytest.approx(np.std(per_fold), abs=1e-12)
    assert by_id["t_error"]["cv_rmse_best"] is None and by_id["t_error"]["status"] == "error"
    # Ranked by CV RMSE at the last point, trials without predictions last.
    assert [t["trial_id"] for t in report["trials"]] == ["t_stopped", "t_good", "t_fair", "t_error"]


def test_best_trial_and_ensemble_come_from_finished_trials_only(run_dir):
    report = write_report(run_dir)["report"]
    assert report["best_trial"] == "t_good"
    top_k = report["top_k_ensemble"]
    assert top_k["k"] == 3 and top_k["trials"] == ["t_good", "t_fair"]
    good = pd.read_csv(run_dir / "oof" / "t_good.csv").set_index("id")
    fair = pd.read_csv(run_dir / "oof" / "t_fair.csv").set_index("id").loc[good.index]
    for which in ("last", "best"):
        mixed = (good[f"pred_{which}"] + fair[f"pred_{which}"]) / 2
        assert top_k[f"cv_rmse_{which}"] == pytest.approx(hand_rmse(good["target"], mixed), abs=1e-12)
        per_fold = [hand_rmse(good["target"][good["fold"] == k], mixed[good["fold"] == k]) for k in range(3)]
        assert top_k[f"fold_rmse_{which}"] == pytest.approx(per_fold, abs=1e-12)
    assert top_k["cv_rmse_last"] < report["trials"][1]["cv_rmse_last"]  # averaging noise helps
    assert report["seed_ensembles"] == []  # train.seed is not searched here


def test_a_seed_ensemble_averages_trials_that_differ_only_in_seed(run_dir, tmp_path):
    """With train.seed searched, finished trials sharing every other searched value form a seed ensemble;
    the top-k ensemble still takes the best k finished trials whatever they differ in."""
    seeded = tmp_path / "seeded"
    shutil.copytree(run_dir, seeded)
    oof = pd.read_csv(seeded / "oof" / "t_fair.csv")
    oof["pred_last"] = oof["target"] + np.random.default_rng(1).normal(0, 0.6, len(oof))
    oof.to_csv(seeded / "oof" / "t_other.csv", index=False)
    run = json.loads((seeded / "run.json").read_text())
    seeds = {"t_good": 1, "t_fair": 2, "t_stopped": 3, "t_error": 4}
    for trial in run["trials"]:
        trial["params"] = {"train.lr": 3e-5, "train.seed": seeds[trial["trial_id"]]}
    run["trials"].append({"trial_id": "t_other", "params": {"train.lr": 1e-5, "train.seed": 5}, "status": "finished",
                          "eval_points": 6, "reason": None})
    run["searched"] = ["train.lr", "train.seed"]
    (seeded / "run.json").write_text(json.dumps(run))

    report = write_report(seeded)["report"]

    assert report["top_k_ensemble"]["trials"] == ["t_good", "t_other", "t_fair"]
    (entry,) = report["seed_ensembles"]
    assert entry["params"] == {"train.lr": 3e-5} and entry["trials"] == ["t_good", "t_fair"]
    good = pd.read_csv(seeded / "oof" / "t_good.csv").set_index("id")
    fair = pd.read_csv(seeded / "oof" / "t_fair.csv").set_index("id").loc[good.index]
    mixed = (good["pred_last"] + fair["pred_last"]) / 2
    assert entry["cv_rmse_last"] == pytest.approx(hand_rmse(good["target"], mixed), abs=1e-12)
    assert "## Seed ensembles" in (seeded / "report.md").read_text()


def test_baselines_on_the_run_folds(run_dir):
    report = write_report(run_dir)["report"]
    folds = pd.read_csv(run_dir / "folds.csv")
    mean_pred = np.empty(len(folds))
    for fold in range(3):
        mean_pred[folds["fold"] == fold] = folds.loc[folds["fold"] != fold, "target"].mean()
    assert report["baselines"]["mean"]["pooled_rmse"] == pytest.approx(hand_rmse(folds["target"], mean_pred), abs=1e-12)
    assert report["baselines"]["tfidf_ridge"]["pooled_rmse"] < report["baselines"]["mean"]["pooled_rmse"]


def test_markdown_csv_and_plots(run_dir):
    paths = write_report(run_dir)
    text = (run_dir / "report.md").read_text()
    leaderboard = text.split("## Leaderboard")[1].split("\n## ")[0]
    rows = [line for line in leaderboard.splitlines() if line.startswith("| t_")]
    assert len(rows) == 4
    assert all(row.count("|") == text.splitlines()[6].count("|") for row in rows)  # as many cells as the header
    assert "error (fold 1: RuntimeError: worker died)" in text
    assert "optimistic" in text and "TF-IDF (1-2 grams) + ridge" in text
    trials = pd.read_csv(run_dir / "trials.csv")
    assert list(trials["trial_id"]) == ["t_stopped", "t_good", "t_fair", "t_error"]
    assert {"param.train.lr", "fold_0_rmse_best", "fold_2_rmse_last"} <= set(trials.columns)
    for name in paths["plots"].values():
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_markdown_table_has_as_many_cells_per_row_as_its_header(run_dir, tmp_path):
    """With searched keys and without (a one-trial run searches nothing): header, separator and rows agree."""
    unsearched = tmp_path / "unsearched"
    shutil.copytree(run_dir, unsearched)
    state = json.loads((unsearched / "run.json").read_text())
    state["searched"], state["trials"] = [], [{**state["trials"][0], "params": {}}]
    (unsearched / "run.json").write_text(json.dumps(state))
    for directory in (run_dir, unsearched):
        write_report(directory)
        tables: list[list[str]] = []
        for line in (directory / "report.md").read_text().splitlines() + [""]:
            if line.startswith("|"):
                tables[-1].append(line) if tables and tables[-1] else tables.append([line])
            elif tables and tables[-1]:
                tables.append([])
        for table in filter(None, tables):
            cells = {line.count("|") for line in table}
            assert len(cells) == 1 and "|  |" not in table[0], table


def test_report_on_a_directory_that_is_no_run_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raycv: error:") and "run.json" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_partial_report_plots_interrupted_trials_without_a_warning(run_dir, tmp_path, capsys):
    """A run cut short while its only trials trained: the hyperparameter plot had no finished or stopped
    trial to label, and matplotlib's "No artists with labels found" warning reached the user's console."""
    import warnings

    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    state = json.loads((partial / "run.json").read_text())
    state["state"] = "interrupted"
    for trial in state["trials"]:
        trial["status"] = "interrupted" if trial["status"] != "error" else trial["status"]
    (partial / "run.json").write_text(json.dumps(state))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["report", str(partial)]) == 0
    assert "partial report: the run is interrupted" in capsys.readouterr().out
    assert (partial / "rmse_by_param.png").stat().st_size > 0
