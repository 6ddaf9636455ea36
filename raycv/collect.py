"""Trials' out-of-fold predictions -> per-fold, pooled and ensemble RMSEs; the baselines on the same folds.

`gather_trials` runs once after `Tuner.fit()`: it copies each trial's OOF predictions and pooled curve from
the run's storage (local or s3://) into the run directory. Everything after that (`score_trial`,
`ensemble`, the report) reads only the run directory, so `raycv report RUN_DIR` needs neither Ray nor GPUs.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge
from sklearn.metrics import root_mean_squared_error

from raycv import write_atomic

log = logging.getLogger(__name__)


def gather_trials(results, config, max_t: int) -> list[dict]:
    """One record per Tune trial; its OOF predictions land in oof/<trial_id>.csv, its curve in curves/."""
    from raycv.worker import read_from_storage, train_run_name, trial_files

    output_dir = Path(config.run.output_dir)
    trials = []
    for result in results:
        trial_id = Path(result.path).name
        files = trial_files(trial_id)
        eval_points = 0
        for kind, folder in (("oof", "oof"), ("curve", "curves")):
            text = read_from_storage(config.run.storage_path, files[kind])
            if text is None:
                continue
            write_atomic(output_dir / folder / f"{trial_id}.csv", lambda tmp, text=text: Path(tmp).write_text(text))
            if kind == "curve":
                eval_points = len(pd.read_csv(io.StringIO(text)))
        if result.error is not None:
            status = "error"
        else:
            status = "finished" if eval_points >= max_t else "stopped"
        trials.append({
            "trial_id": trial_id, "params": dict(result.config or {}), "status": status, "eval_points": eval_points,
            "error": str(result.error).strip().splitlines()[-1] if result.error is not None else None,
            "train_run": train_run_name(trial_id),
        })
    return sorted(trials, key=lambda t: t["trial_id"])


def rmse(frame: pd.DataFrame, column: str) -> float:
    return float(root_mean_squared_error(frame["target"], frame[column]))


def score_trial(oof: pd.DataFrame) -> dict:
    """Pooled and per-fold RMSE at each fold's best evaluation point and at the last one."""
    scores = {"cv_rmse_best": rmse(oof, "pred_best"), "cv_rmse_last": rmse(oof, "pred_last")}
    for which in ("best", "last"):
        per_fold = [rmse(frame, f"pred_{which}") for _, frame in oof.groupby("fold", sort=True)]
        scores[f"fold_rmse_{which}"] = per_fold
        scores[f"fold_rmse_{which}_mean"] = float(np.mean(per_fold))
        scores[f"fold_rmse_{which}_std"] = float(np.std(per_fold))
    return scores


def ensemble(oofs: list[pd.DataFrame]) -> pd.DataFrame:
    """Average of several trials' OOF predictions, row by row (matched on id)."""
    stacked = pd.concat(oofs, ignore_index=True)
    return stacked.groupby("id", sort=False).agg(
        fold=("fold", "first"), target=("target", "first"), pred_best=("pred_best", "mean"), pred_last=("pred_last", "mean")
    ).reset_index()


def compute_baselines(table: pd.DataFrame) -> dict:
    """On the run's folds: predicting the training folds' mean, and TF-IDF (1-2 grams) + ridge."""
    preds = {"mean": np.empty(len(table)), "tfidf_ridge": np.empty(len(table))}
    for fold in sorted(table["fold"].unique()):
        train, valid = table["fold"] != fold, table["fold"] == fold
        preds["mean"][valid.to_numpy()] = table.loc[train, "target"].mean()
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        features = vectorizer.fit_transform(table.loc[train, "text"])
        ridge = Ridge(alpha=1.0).fit(features, table.loc[train, "target"])
        preds["tfidf_ridge"][valid.to_numpy()] = ridge.predict(vectorizer.transform(table.loc[valid, "text"]))
    baselines = {}
    for name, pred in preds.items():
        frame = pd.DataFrame({"fold": table["fold"], "target": table["target"], "pred": pred})
        baselines[name] = {
            "cv_rmse": rmse(frame, "pred"),
            "fold_rmse": [rmse(f, "pred") for _, f in frame.groupby("fold", sort=True)],
        }
    return baselines


def prune_fold_checkpoints(config, report: dict) -> list[str]:
    """Delete fold checkpoints (model + optimiser) of all but the best `run.keep_fold_models` trials."""
    import pyarrow.fs

    from raycv.worker import storage, train_run_name

    finished = [t for t in report["trials"] if t["status"] == "finished" and t["cv_rmse_best"] is not None]
    finished.sort(key=lambda t: t["cv_rmse_best"])
    keep = {t["trial_id"] for t in finished[: config.run.keep_fold_models]}
    fs, base = storage(config.run.storage_path)
    removed = []
    for trial in report["trials"]:
        if trial["trial_id"] in keep:
            continue
        run_dir = f"{base.rstrip('/')}/{train_run_name(trial['trial_id'])}"
        for info in fs.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True)):
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("point_"):
                fs.delete_dir(info.path)
                removed.append(info.path)
    log.info("removed %d fold checkpoints of trials not among the best %d", len(removed), config.run.keep_fold_models)
    return removed
