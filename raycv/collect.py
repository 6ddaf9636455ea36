"""After the search: every trial's files from the run's storage (local or s3://) -> the run directory.

`gather_trials` runs once after `Tuner.fit()`: it copies each trial's out-of-fold predictions and pooled
curve into the run directory and returns one `TrialRecord` per trial, which `run.json` keeps. Everything
after that (scoring, the report) reads only the run directory, so `raycv report RUN_DIR` needs neither Ray
nor GPUs. `prune_fold_checkpoints` then frees the storage of the fold checkpoints nobody will predict with.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from raycv import storage

log = logging.getLogger(__name__)

STATUSES = {
    "finished": "ran every evaluation point",
    "stopped": "stopped early by ASHA",
    "error": "failed (see error)",
}


@dataclass
class TrialRecord:
    """One Tune trial as the report sees it (a row of run.json's `trials`)."""

    trial_id: str
    params: dict = field(default_factory=dict)  # the searched values, by dotted config key
    status: str = "finished"  # one of STATUSES
    eval_points: int = 0  # evaluation points whose pooled predictions were written
    error: str | None = None  # one line, for status "error"
    train_run: str = ""  # the trial's Ray Train run (its storage folder and dashboard name)


def gather_trials(results, storage_path: str, run_dir: Path, max_t: int) -> list[TrialRecord]:
    """One record per result of `Tuner.fit()`; its OOF predictions land in oof/<trial_id>.csv, its curve in
    curves/<trial_id>.csv of `run_dir`."""
    trials = []
    for result in results:
        trial_id = Path(result.path).name
        files = storage.trial_files(trial_id)
        eval_points = 0
        for kind, local in (("oof", storage.run_oof_path), ("curve", storage.run_curve_path)):
            text = storage.read_text(storage_path, files[kind])
            if text is None:
                continue
            storage.write_text_atomic(local(run_dir, trial_id), text)
            if kind == "curve":
                eval_points = len(pd.read_csv(io.StringIO(text)))
        status = "error" if result.error is not None else ("finished" if eval_points >= max_t else "stopped")
        trials.append(TrialRecord(
            trial_id=trial_id, params=dict(result.config or {}), status=status, eval_points=eval_points,
            error=str(result.error).strip().splitlines()[-1] if result.error is not None else None,
            train_run=storage.train_run_name(trial_id),
        ))
    return sorted(trials, key=lambda t: t.trial_id)


def prune_fold_checkpoints(storage_path: str, report: dict, keep: int) -> list[str]:
    """Delete fold checkpoints (model + optimiser) of all but the best `keep` finished trials, ranked on
    the last-point CV RMSE as the report ranks them."""
    finished = [t for t in report["trials"] if t["status"] == "finished" and t["cv_rmse_last"] is not None]
    kept = {t["trial_id"] for t in sorted(finished, key=lambda t: t["cv_rmse_last"])[:keep]}
    removed = []
    for trial in report["trials"]:
        if trial["trial_id"] not in kept:
            removed += storage.delete_fold_checkpoints(storage_path, trial["trial_id"])
    log.info("removed %d fold checkpoints of trials not among the best %d", len(removed), keep)
    return removed
