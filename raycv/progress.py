"""The progress lines raycv prints, one per evaluation point, in one place.

- the worker line, first in each fold worker's log: trial 3f2a_00001 | fold 2 | fold worker started: ...
- the fold line (`raycv train-fold`, and each fold worker's log, where it starts with the trial):
  fold 2 | point 3/8 | step 120/850 | epoch 0.42 | train_loss 0.4100 | val_rmse 0.5012 | best 0.4987 | ...
- the trial line (rank 0 of a trial, once the folds are pooled):
  trial 3f2a_00001 | point 3/8 | step 120/850 | cv_rmse_last 0.5203 | cv_rmse_best 0.5102 | folds ... | 38 s
  or, where a fold has diverged, trial 3f2a_00001 | point 3/8 | diverged: fold 2 diverged at point 3 ...
"""

from __future__ import annotations


def worker_line(trial: str, fold: int, num_folds: int, pid: int) -> str:
    """The first line of a fold worker's log: which trial and fold this Ray Train worker (world rank = fold) is."""
    return f"trial {trial} | fold {fold} | fold worker started: world rank {fold} of {num_folds}, pid {pid}"


def fold_line(point, trial: str | None = None) -> str:
    """`point` is a train_fold.EvalPoint."""
    who = f"trial {trial} | " if trial else ""
    return (
        f"{who}fold {point.fold} | point {point.index}/{point.num_points} | step {point.step}/{point.total_steps} | "
        f"epoch {point.epoch:.2f} | train_loss {point.train_loss:.4f} | val_rmse {point.val_rmse:.4f} | "
        f"best {point.best_rmse:.4f} | {point.samples_per_s:.1f} samples/s | {point.elapsed_s:.0f} s"
    )


def trial_line(trial: str, point, scores: dict) -> str:
    """`scores` holds cv_rmse_last, cv_rmse_best and fold_rmse_last (one per fold), as scoring computes them."""
    folds = " ".join(f"{value:.4f}" for value in scores["fold_rmse_last"])
    return (
        f"trial {trial} | point {point.index}/{point.num_points} | step {point.step}/{point.total_steps} | "
        f"cv_rmse_last {scores['cv_rmse_last']:.4f} | cv_rmse_best {scores['cv_rmse_best']:.4f} | "
        f"folds {folds} | {point.elapsed_s:.0f} s"
    )


def diverged_line(trial: str, point, reason: str) -> str:
    """The trial line at the point where a fold's loss or predictions stopped being finite."""
    return f"trial {trial} | point {point.index}/{point.num_points} | diverged: {reason}"
