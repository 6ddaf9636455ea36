"""ResumableASHA: after `--resume`, ASHA's rungs are what they were before the driver died, rebuilt from the
pooled curves in the run's storage, and a trial the uninterrupted search would have stopped is stopped.
No Ray cluster: the scheduler is driven as Tune drives it (on_trial_add, on_trial_result, on_trial_complete),
beside Ray's own ASHAScheduler fed the same results live. tests/test_resume.py runs it for real."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pandas as pd
import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from raycv import storage
from raycv.scheduler import ResumableASHA, reported_points

ASHA = {"time_attr": "eval_point", "max_t": 6, "grace_period": 2, "reduction_factor": 3}
# (reported_at, trial, point, cv_rmse) as fold workers reported them: trial a runs to the end; b is worse at
# point 2, so ASHA stops it, but it reported point 3 before the stop reached it (results are asynchronous);
# c was cut at point 1 by the driver's death.
REPORTED = [(10.0, "a", 1, 1.06), (11.0, "a", 2, 1.05), (12.0, "a", 3, 1.02), (13.0, "a", 4, 0.93),
            (14.0, "a", 5, 0.91), (15.0, "a", 6, 0.86), (16.0, "b", 1, 1.40), (17.0, "b", 2, 1.38),
            (18.0, "b", 3, 1.36), (19.0, "c", 1, 1.10)]


def write_curves(storage_path: str, reported: list[tuple]) -> None:
    for trial_id in {trial for _, trial, _, _ in reported}:
        rows = [{"cv_rmse_last": value, "eval_point": point, "reported_at": at}
                for at, trial, point, value in reported if trial == trial_id]
        storage.write_text(storage_path, storage.trial_files(trial_id)["curve"], pd.DataFrame(rows).to_csv(index=False))


def trial(trial_id: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id)


def rungs(scheduler: ASHAScheduler) -> list[tuple[int, dict]]:
    return [(milestone, dict(recorded)) for milestone, recorded in scheduler._brackets[0]._rungs]


def live_asha() -> tuple[ASHAScheduler, dict[str, str]]:
    """Ray's ASHAScheduler fed REPORTED as Tune feeds it: a trial it stops sends nothing more."""
    live = ASHAScheduler(**ASHA)
    live.set_search_properties("cv_rmse", "min")
    decisions, stopped = {}, set()
    for _, trial_id, point, value in REPORTED:
        if trial_id in stopped:
            continue
        if trial_id not in decisions:
            live.on_trial_add(None, trial(trial_id))
        result = {"eval_point": point, "cv_rmse": value}
        decisions[trial_id] = live.on_trial_result(None, trial(trial_id), result)
        if decisions[trial_id] == TrialScheduler.STOP:
            stopped.add(trial_id)
            if point == ASHA["max_t"]:
                live.on_trial_complete(None, trial(trial_id), result)
    return live, decisions


def test_reported_points_are_every_curve_row_oldest_first(tmp_path):
    write_curves(str(tmp_path), REPORTED)
    assert reported_points(str(tmp_path)) == sorted(REPORTED)
    assert reported_points(str(tmp_path / "empty")) == []


def test_a_restored_asha_has_the_rungs_the_live_one_had_and_stops_what_it_stopped(tmp_path):
    live, decisions = live_asha()
    assert decisions == {"a": TrialScheduler.STOP, "b": TrialScheduler.STOP, "c": TrialScheduler.CONTINUE}

    write_curves(str(tmp_path), REPORTED)
    # As Tuner.restore gets it: unpickled from tuner.pkl, pickled when the search was created.
    resumed = pickle.loads(pickle.dumps(ResumableASHA(str(tmp_path), **ASHA)))
    resumed.set_search_properties("cv_rmse", "min")
    for trial_id in ("a", "b", "c"):  # Tune adds every trial of the experiment state, ended ones too
        resumed.on_trial_add(None, trial(trial_id))
    assert rungs(resumed) == rungs(live)
    # b had been stopped by ASHA (its stop had not reached it): its first result after the restart stops it;
    # c goes on, judged at point 2 against the rung a and b filled.
    assert resumed.on_trial_result(None, trial("b"), {"eval_point": 4, "cv_rmse": 1.35}) == TrialScheduler.STOP
    assert resumed.on_trial_result(None, trial("c"), {"eval_point": 2, "cv_rmse": 1.00}) == TrialScheduler.CONTINUE
    assert resumed.on_trial_result(None, trial("c"), {"eval_point": 3, "cv_rmse": 0.99}) == TrialScheduler.CONTINUE


@pytest.mark.parametrize("cut", range(len(REPORTED) + 1))
def test_a_resume_after_any_point_ends_with_the_live_rungs(tmp_path, cut):
    """Wherever the driver died, replaying what was reported and then going on live gives ASHA's rungs."""
    live, _ = live_asha()
    write_curves(str(tmp_path), REPORTED[:cut])
    resumed = pickle.loads(pickle.dumps(ResumableASHA(str(tmp_path), **ASHA)))
    resumed.set_search_properties("cv_rmse", "min")
    added, stopped = set(), set()
    for _, trial_id, _, _ in REPORTED[:cut]:
        if trial_id not in added:
            resumed.on_trial_add(None, trial(trial_id))
            added.add(trial_id)
    for _, trial_id, point, value in REPORTED[cut:]:
        if trial_id in stopped:
            continue
        if trial_id not in added:
            resumed.on_trial_add(None, trial(trial_id))
            added.add(trial_id)
        result = {"eval_point": point, "cv_rmse": value}
        if resumed.on_trial_result(None, trial(trial_id), result) == TrialScheduler.STOP:
            stopped.add(trial_id)
            if point == ASHA["max_t"]:
                resumed.on_trial_complete(None, trial(trial_id), result)
    assert rungs(resumed) == rungs(live)
