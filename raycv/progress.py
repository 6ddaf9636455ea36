"""The progress lines raycv prints, one per evaluation point, in one place.

- the worker line, first in each fold worker's log: trial 3f2a_00001 | fold 2 | fold worker started: ...
- the fold line (`raycv train-fold`, and each fold worker's log, where it starts with the trial):
  fold 2 | point 3/8 | step 120/850 | epoch 0.42 | train_loss 0.4100 | val_rmse 0.5012 | best 0.4987 | ...
- the trial line (rank 0 of a trial, once the folds are pooled; with several seeds per trial, the RMSEs are
  of the seed-mean, and `| seeds 0.5301 0.5288 |` gives each seed's own before the time):
  trial 3f2a_00001 | point 3/8 | step 120/850 | cv_rmse_last 0.5203 | cv_rmse_best 0.5102 | folds ... | 38 s
  or, where a fold has diverged, trial 3f2a_00001 | point 3/8 | diverged: fold 2 diverged at point 3 ...
"""

from __future__ import annotations

import re

# Every line above, as a fold worker prints it, starts so. Ray's driver deduplicates worker lines that are
# equal but for their numbers, across processes ("[repeated 3x across cluster]", only the latest shown): that
# would eat the lines of every fold but one, of concurrent trials, and of a trial's workers after a restart.
LINE_START = r"^trial \S+ \| "


def dedup_allow_regex(current: str | None) -> str:
    """RAY_DEDUP_LOGS_ALLOW_REGEX for the driver (read when ray is first imported): the user's own, if any,
    and raycv's progress lines, which Ray then prints as they come."""
    if not current or LINE_START in current:  # unset, or already ours (a raycv started by a raycv)
        return current or LINE_START
    try:
        re.compile(current)
    except re.error:  # left as it is, for raycv tune to refuse in one line (`import ray` would fail on it)
        return current
    return f"(?:{current})|(?:{LINE_START})"


def worker_line(trial: str, fold: int, num_folds: int, pid: int, rank: int | None = None,
                world_size: int | None = None, seed: int | None = None) -> str:
    """The first line of a fold worker's log: which trial and fold this Ray Train worker is (world rank = fold,
    unless the trial trains several seeds: then `seed` is the worker's seed index and `rank` its world rank)."""
    rank, world_size = (fold, num_folds) if rank is None else (rank, world_size)
    seeded = "" if seed is None else f"seed {seed} | "
    return f"trial {trial} | fold {fold} | {seeded}fold worker started: world rank {rank} of {world_size}, pid {pid}"


def fold_line(point, trial: str | None = None, seed: int | None = None) -> str:
    """`point` is a train_fold.EvalPoint; `seed` the worker's seed index where a trial trains several."""
    who = f"trial {trial} | " if trial else ""
    who += "" if seed is None else f"seed {seed} | "
    return (
        f"{who}fold {point.fold} | point {point.index}/{point.num_points} | step {point.step}/{point.total_steps} | "
        f"epoch {point.epoch:.2f} | train_loss {point.train_loss:.4f} | val_rmse {point.val_rmse:.4f} | "
        f"best {point.best_rmse:.4f} | {point.samples_per_s:.1f} samples/s | {point.elapsed_s:.0f} s"
    )


def trial_line(trial: str, point, scores: dict) -> str:
    """`scores` holds cv_rmse_last, cv_rmse_best and fold_rmse_last (one per fold), as scoring computes them;
    with several seeds, seed_rmse_last too (each seed's own pooled RMSE, shown after the seed-mean's)."""
    folds = " ".join(f"{value:.4f}" for value in scores["fold_rmse_last"])
    seeds = " ".join(f"{value:.4f}" for value in scores.get("seed_rmse_last", []))
    return (
        f"trial {trial} | point {point.index}/{point.num_points} | step {point.step}/{point.total_steps} | "
        f"cv_rmse_last {scores['cv_rmse_last']:.4f} | cv_rmse_best {scores['cv_rmse_best']:.4f} | "
        f"folds {folds} | " + (f"seeds {seeds} | " if seeds else "") + f"{point.elapsed_s:.0f} s"
    )


def diverged_line(trial: str, point, reason: str) -> str:
    """The trial line at the point where a fold's loss or predictions stopped being finite."""
    return f"trial {trial} | point {point.index}/{point.num_points} | diverged: {reason}"
