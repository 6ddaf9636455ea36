"""ASHA whose rungs survive `--resume`.

Ray Tune's `Tuner.restore` brings back a search's trials, not its scheduler's state: the ASHAScheduler comes
back from the experiment's tuner.pkl as it was created, its rungs empty. A resumed search would then judge
its later trials against the results it sees after the restart only, and a trial whose fold workers had
reported a rung's point just before the driver died (written to the run's storage, not yet seen by Tune)
would never be judged at that rung: a trial the uninterrupted search stops would run to the end.

`ResumableASHA` is Ray's ASHAScheduler that, the first time Tune adds a trial to it (at the start of a
search, or of a resumed one), replays every evaluation point that every trial wrote to its pooled curve in
the run's storage, in the order they were reported, through ASHA's own brackets: the rungs are what they
were, and a trial the replay stops is stopped at its first result after the restart.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pandas as pd
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from raycv import storage


def reported_points(storage_path: str) -> list[tuple[float, str, int, float]]:
    """(reported_at, trial_id, eval_point, cv_rmse_last) of every point of every trial's pooled curve in the
    storage, in the order they were reported."""
    rows = []
    for trial_id in storage.list_dirs(storage_path, "results"):
        text = storage.read_text(storage_path, storage.trial_files(trial_id)["curve"])
        if not text:
            continue
        curve = pd.read_csv(io.StringIO(text))
        rows += [(float(at), trial_id, int(point), float(value))
                 for at, point, value in zip(curve["reported_at"], curve["eval_point"], curve["cv_rmse_last"],
                                             strict=True)]
    return sorted(rows)


class ResumableASHA(ASHAScheduler):
    """ASHAScheduler(**asha) for the run whose storage is `storage_path` (see the module's docstring)."""

    def __init__(self, storage_path: str, **asha):
        super().__init__(**asha)
        self._storage_path = storage_path
        self._replayed = False
        self._stop_on_resume: set[str] = set()

    def __setstate__(self, state: dict) -> None:  # unpickled from tuner.pkl by Tuner.restore: replay again
        self.__dict__.update(state, _replayed=False, _stop_on_resume=set())

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._replayed:
            self._replayed = True
            self.replay(reported_points(self._storage_path))
        super().on_trial_add(tune_controller, trial)

    def replay(self, points: list[tuple[float, str, int, float]]) -> None:
        """Feed reported points, oldest first, to the bracket each trial is in, as on_trial_result and
        on_trial_complete would have; remember the trials ASHA would have stopped before max_t."""
        for _, trial_id, point, value in points:
            bracket = self._trial_info.setdefault(trial_id, self._brackets[0])
            action = bracket.on_result(SimpleNamespace(trial_id=trial_id), point, self._metric_op * value)
            if action == TrialScheduler.STOP and point < self._max_t:
                self._stop_on_resume.add(trial_id)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if trial.trial_id in self._stop_on_resume:
            self._stop_on_resume.discard(trial.trial_id)
            self._num_stopped += 1
            return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, result)
