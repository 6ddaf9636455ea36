"""Out-of-fold predictions -> RMSEs: per fold, pooled, ensembles, and the baselines on the same folds.

Used during training (rank 0 scores the pooled folds for Tune at every evaluation point) and after it (the
report), so what ASHA ranked on and what the report shows agree by construction.

Two figures per prediction set, named the same everywhere (Tune's results, progress lines, curves, report):
- `cv_rmse_last`: every fold's predictions at its final evaluation point -- the honest figure for a fixed
  training length, and the one Tune ranks on (Tune's metric `cv_rmse` is this number);
- `cv_rmse_best`: each fold at its own best evaluation point, chosen on the rows it is scored on, so
  optimistic.

An OOF table has one row per training row: `id, fold, target, pred_best, pred_last`. With
search.seeds_per_trial K > 1, pred_best and pred_last are the mean over the trial's K seeds (what ASHA ranks)
and each seed's own predictions follow as `pred_best_seed0, pred_last_seed0, ..., pred_last_seed{K-1}`.

`stack` fits a stacked ensemble: non-negative weights (and a free intercept) over several trials' last-point
predictions, scored honestly -- fold k's rows are predicted with weights fit on the other folds' rows only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

WHICH = ("last", "best")


def rmse(frame: pd.DataFrame, column: str) -> float:
    # scikit-learn is imported where it is used: fold workers import this module, and only rank 0 scores
    # (each import at worker start-up costs about a second of CPU and 60 MB, five folds per trial).
    from sklearn.metrics import root_mean_squared_error

    return float(root_mean_squared_error(frame["target"], frame[column]))


def per_fold_rmse(frame: pd.DataFrame, column: str) -> list[float]:
    return [rmse(fold_rows, column) for _, fold_rows in frame.groupby("fold", sort=True)]


def score_trial(oof: pd.DataFrame) -> dict:
    """Pooled and per-fold RMSE at the last and at each fold's best evaluation point, with the folds' spread."""
    scores = {}
    for which in WHICH:
        per_fold = per_fold_rmse(oof, f"pred_{which}")
        scores[f"cv_rmse_{which}"] = rmse(oof, f"pred_{which}")
        scores[f"fold_rmse_{which}"] = per_fold
        scores[f"fold_rmse_{which}_mean"] = float(np.mean(per_fold))
        scores[f"fold_rmse_{which}_std"] = float(np.std(per_fold))
    return scores


def oof_table(fold_rows: list[dict]) -> pd.DataFrame:
    """Each fold's validation rows ({"fold": k, "rows": {column: values}}) -> one OOF table, in fold order."""
    frames = [pd.DataFrame(part["rows"]) for part in sorted(fold_rows, key=lambda part: part["fold"])]
    return pd.concat(frames, ignore_index=True)


def seed_mean_table(seed_tables: list[pd.DataFrame]) -> pd.DataFrame:
    """One OOF table per seed of a trial (the same rows in the same order) -> the trial's: pred_best and
    pred_last the mean over the seeds; with more than one seed, each seed's own columns after them."""
    if len(seed_tables) == 1:
        return seed_tables[0]
    first = seed_tables[0]
    assert all(table["id"].tolist() == first["id"].tolist() for table in seed_tables), "seeds' rows differ"
    mean = first[["id", "fold", "target"]].copy()
    for which in ("best", "last"):  # the columns in the order of a one-seed table
        mean[f"pred_{which}"] = np.mean([table[f"pred_{which}"].to_numpy(dtype=float) for table in seed_tables], axis=0)
    for k, table in enumerate(seed_tables):
        for which in ("best", "last"):
            mean[f"pred_{which}_seed{k}"] = table[f"pred_{which}"].to_numpy()
    return mean


def seed_columns(oof: pd.DataFrame, which: str) -> list[str]:
    """The per-seed prediction columns of an OOF table, seed 0 first; [pred_{which}] with one seed."""
    count = sum(column.startswith(f"pred_{which}_seed") for column in oof.columns)
    return [f"pred_{which}_seed{k}" for k in range(count)] if count else [f"pred_{which}"]


def seed_columns_problem(oof: pd.DataFrame) -> str | None:
    """Why an OOF table's per-seed columns are not pred_best_seedK and pred_last_seedK for each K from 0 to
    some K-1 (none at all with one seed), or None: `seed_columns` counts them and reads them by number."""
    found = [column for column in oof.columns if any(column.startswith(f"pred_{which}_seed") for which in WHICH)]
    count = len(found) // len(WHICH)
    if sorted(found) == sorted(f"pred_{which}_seed{k}" for which in WHICH for k in range(count)):
        return None
    return (f"its seed columns {', '.join(found[:6])}{', ...' if len(found) > 6 else ''} are not pred_best_seedK "
            "and pred_last_seedK for each K from 0 to the trial's seeds - 1")


def score_seeds(oof: pd.DataFrame) -> dict:
    """Each seed's own pooled RMSE (at the last point, and at each fold's best) and their range, max - min
    (0 with one seed, whose own RMSE is the trial's)."""
    scores = {}
    for which in WHICH:
        per_seed = [rmse(oof, column) for column in seed_columns(oof, which)]
        scores[f"seed_rmse_{which}"] = per_seed
        scores[f"seed_rmse_{which}_range"] = float(max(per_seed) - min(per_seed))
    return scores


def ensemble(oofs: list[pd.DataFrame]) -> pd.DataFrame:
    """Average of several trials' OOF predictions, row by row (matched on id)."""
    stacked = pd.concat(oofs, ignore_index=True)
    return stacked.groupby("id", sort=False).agg(
        fold=("fold", "first"), target=("target", "first"),
        pred_best=("pred_best", "mean"), pred_last=("pred_last", "mean"),
    ).reset_index()


def score_ensemble(oofs: list[pd.DataFrame]) -> dict:
    """Both pooled figures and both per-fold lists of the average of `oofs`."""
    mixed = ensemble(oofs)
    scores = {}
    for which in WHICH:
        scores[f"cv_rmse_{which}"] = rmse(mixed, f"pred_{which}")
        scores[f"fold_rmse_{which}"] = per_fold_rmse(mixed, f"pred_{which}")
    return scores


STACK_MIN_TRIALS = 2


def stack(oofs: dict[str, pd.DataFrame]) -> dict:
    """A stacked ensemble of the trials' last-point OOF predictions (`oofs`: trial id -> OOF table).

    The prediction for a row is `intercept + sum(weights[t] * pred_last[t])`, with every weight >= 0
    (scikit-learn's LinearRegression(positive=True): non-negative least squares) and a free intercept: it
    absorbs a bias the trials share, so the weights need not sum to 1. Honest score (`cv_rmse_last`): for
    each fold k the weights are fit on the other folds' OOF rows only and applied to fold k's rows; the
    pooled RMSE of those predictions, and per fold. `weights`/`intercept` are fit on all rows: what
    `raycv predict --trials stacked` uses. `in_sample_rmse` scores that all-rows fit on the rows it was fit
    on (optimistic, shown only for comparison). Rows are matched on id; only rows every trial predicted
    are used."""
    from sklearn.linear_model import LinearRegression

    trial_ids = list(oofs)
    if len(trial_ids) < STACK_MIN_TRIALS:
        raise ValueError(f"stacking needs {STACK_MIN_TRIALS} or more trials, got {len(trial_ids)}")
    first = oofs[trial_ids[0]].set_index("id")
    preds = pd.DataFrame({t: oofs[t].set_index("id")["pred_last"] for t in trial_ids}).dropna()
    rows = first.loc[preds.index, ["fold", "target"]]
    features, target, folds = preds.to_numpy(), rows["target"].to_numpy(), rows["fold"].to_numpy()
    if len(np.unique(folds)) < 2:
        raise ValueError("the trials' OOF predictions share rows of fewer than two folds")
    fit = lambda mask: LinearRegression(positive=True).fit(features[mask], target[mask])  # noqa: E731
    honest = np.empty(len(target))
    fold_weights = []
    for fold in sorted(np.unique(folds)):
        held_out = folds == fold
        model = fit(~held_out)
        honest[held_out] = model.predict(features[held_out])
        fold_weights.append({"fold": int(fold), "intercept": float(model.intercept_),
                             "weights": dict(zip(trial_ids, map(float, model.coef_), strict=True))})
    frame = pd.DataFrame({"fold": folds, "target": target, "pred_last": honest})
    everything = fit(np.ones(len(target), dtype=bool))
    frame["in_sample"] = everything.predict(features)
    return {
        "cv_rmse_last": rmse(frame, "pred_last"), "fold_rmse_last": per_fold_rmse(frame, "pred_last"),
        "weights": dict(zip(trial_ids, map(float, everything.coef_), strict=True)),
        "intercept": float(everything.intercept_), "in_sample_rmse": rmse(frame, "in_sample"),
        "rows": int(len(target)), "fold_weights": fold_weights,
    }


def compute_baselines(table: pd.DataFrame) -> dict:
    """On the run's folds: predicting the training folds' mean, and TF-IDF (1-2 grams) + ridge.
    `table` has columns text, target, fold. A baseline has one prediction per row: `pooled_rmse`."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    preds = {"mean": np.empty(len(table)), "tfidf_ridge": np.empty(len(table))}
    for fold in sorted(table["fold"].unique()):
        train, valid = (table["fold"] != fold).to_numpy(), (table["fold"] == fold).to_numpy()
        preds["mean"][valid] = table.loc[train, "target"].mean()
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        features = vectorizer.fit_transform(table.loc[train, "text"])
        ridge = Ridge(alpha=1.0).fit(features, table.loc[train, "target"])
        preds["tfidf_ridge"][valid] = ridge.predict(vectorizer.transform(table.loc[valid, "text"]))
    baselines = {}
    for name, pred in preds.items():
        frame = pd.DataFrame({"fold": table["fold"], "target": table["target"], "pred": pred})
        baselines[name] = {"pooled_rmse": rmse(frame, "pred"), "fold_rmse": per_fold_rmse(frame, "pred")}
    return baselines
