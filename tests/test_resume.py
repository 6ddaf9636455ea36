"""A search survives its driver, and the tests would see it if it did not.

One smoke search (the same grid as conftest.py's `smoke_run`) is cut short twice and resumed twice:
Ctrl-C while its first full trial trains (an honest `interrupted`, exit 130), `--resume`, then SIGKILL of
the resumed driver's whole process group while another trial is past its second checkpointed point, then
`--resume` to the end. What a rerun or a restart from zero would change is recorded before each resume: the
ended trials' OOF file modification times and Tune result lines, the cut trial's curve. The finished run
must then equal the uninterrupted `smoke_run` trial by trial. And a trial that diverges is reported as
such, once. Real `raycv tune` processes on a real local Ray, each in a process group (and session) of its
own that the test ends itself, under a hard time limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from helpers import ENDED, kill_group, run_raycv, run_state, start_raycv, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

NUM_POINTS = 6  # smoke.yaml: 6 epochs, one evaluation point each



def curve_rows(run_dir: Path, trial_id: str) -> int:
    """Evaluation points in the pooled curve rank 0 keeps in the storage (rewritten at every point)."""
    path = run_dir / "ray" / "results" / trial_id / "curve.csv"
    try:
        return max(len(path.read_text().splitlines()) - 1, 0)
    except OSError:
        return 0


def checkpoints(run_dir: Path, trial_id: str) -> set[int]:
    """The points whose fold checkpoints (every fold's file) are in the storage now."""
    found = set()
    for point in (run_dir / "ray" / f"train_{trial_id}").glob("point_*"):
        if len(list(point.glob("fold_*.pt"))) == 3:
            found.add(int(point.name.removeprefix("point_")))
    return found


def trial_past_second_checkpoint(run_dir: Path, exclude: set[str]):
    """A running trial (not in `exclude`) that has reported point 3 and has a checkpoint at point 2 or later."""
    for trial in run_state(run_dir)["trials"]:
        trial_id = trial["trial_id"]
        if trial["status"] == "running" and trial_id not in exclude and curve_rows(run_dir, trial_id) >= 3 \
                and max(checkpoints(run_dir, trial_id), default=0) >= 2:
            return trial_id
    return None


def tune_result_lines(run_dir: Path, trial_id: str) -> int:
    return len((run_dir / "ray" / "tune" / trial_id / "result.json").read_text().splitlines())


def process_tree(pid: int) -> list[psutil.Process]:
    """The process `pid` and everything it started: the driver, its local Ray's GCS, raylet, dashboard, and
    every Ray worker the raylet started (trial drivers, fold workers)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def survivors(processes: list[psutil.Process]) -> list[str]:
    """Those of `processes` still alive (the same process: psutil checks its start time, not only the pid)."""
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} {' '.join(process.cmdline())[:100]}")
    return alive


def trial_points(out: str, trial_id: str) -> list[int]:
    """The evaluation points a trial's pooled progress line was printed for, in order."""
    return [int(p) for p in re.findall(rf"trial {re.escape(trial_id)} \| point (\d+)/\d+ \| step", out)]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, train_csv):
    """The smoke search: Ctrl-C, --resume, SIGKILL, --resume; what each phase left, for the tests below."""
    cwd = tmp_path_factory.mktemp("interrupted")
    args = ["tune", "spaces/smoke.yaml", f"data.path={train_csv}"]
    run_dir = cwd / "runs" / "smoke"
    seen: dict = {"cwd": cwd, "run_dir": run_dir, "args": args}

    # 1. Ctrl-C while the first full trial trains past its second checkpoint.
    log_path = cwd / "1_interrupted.log"
    proc = start_raycv(args, cwd, log_path)
    try:
        first = wait_for(lambda: trial_past_second_checkpoint(run_dir, set()), proc, log_path, 500,
                         "trial past its second checkpoint")
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        kill_group(proc)
    seen["interrupted"] = {"trial": first, "returncode": proc.returncode, "out": log_path.read_text(),
                           "state": run_state(run_dir)}

    # A second run without --resume is refused with the command that continues it.
    seen["refused"] = run_raycv(args, cwd=cwd, timeout=300)

    # 2. --resume; SIGKILL once another trial is past its second checkpoint and some trial has ended.
    log_path = cwd / "2_killed.log"
    proc = start_raycv([*args, "--resume"], cwd, log_path)
    try:
        second = wait_for(lambda: trial_past_second_checkpoint(run_dir, {first}) if any(
            t["status"] in ENDED for t in run_state(run_dir)["trials"]) else None,
            proc, log_path, 600, "second trial past its second checkpoint")
        started = process_tree(proc.pid)
    finally:
        kill_group(proc)  # SIGKILL: the driver and the local Ray it started; nothing gets to clean up
        proc.wait(timeout=60)
    deadline = time.monotonic() + 60  # Ray workers have process groups of their own: they follow their raylet
    while survivors(started) and time.monotonic() < deadline:
        time.sleep(1)
    # What the storage holds once nothing writes to it any more: the checkpoints a resume can start from.
    before_kill = {"curve": (run_dir / "ray" / "results" / second / "curve.csv").read_text(),
                   "checkpoints": checkpoints(run_dir, second)}
    seen["killed"] = {"trial": second, "out": log_path.read_text(), "state": run_state(run_dir),
                      "started": len(started), "survivors": survivors(started), **before_kill}

    # The report of what the storage holds: partial, each trial's state.
    seen["partial_report"] = run_raycv(["report", str(run_dir)], cwd=cwd, timeout=300)
    seen["partial_report_json"] = json.loads((run_dir / "report.json").read_text())

    # What a rerun of an ended trial would change.
    ended = [t["trial_id"] for t in run_state(run_dir)["trials"] if t["status"] in ENDED]
    seen["ended_before_resume"] = {
        trial_id: {"oof_mtime_ns": (run_dir / "oof" / f"{trial_id}.csv").stat().st_mtime_ns,
                   "result_lines": tune_result_lines(run_dir, trial_id)} for trial_id in ended}

    # 3. --resume to the end.
    seen["resumed"] = run_raycv([*args, "--resume"], cwd=cwd, timeout=900)
    report_path = run_dir / "report.json"
    seen["report"] = json.loads(report_path.read_text()) if report_path.is_file() else None
    return seen


def test_ctrl_c_interrupts_honestly(interrupted_run):
    """SIGINT mid-trial: the trial is `interrupted` (not stopped), its fold checkpoints stay, exit 130."""
    seen = interrupted_run["interrupted"]
    out, state = seen["out"], seen["state"]
    assert seen["returncode"] == 130, out[-3000:]
    assert "continue with: raycv tune spaces/smoke.yaml" in out and "--resume" in out
    assert state["state"] == "interrupted"
    trial = next(t for t in state["trials"] if t["trial_id"] == seen["trial"])
    assert trial["status"] == "interrupted" and 3 <= trial["eval_points"] < NUM_POINTS
    assert {t["status"] for t in state["trials"]} <= ENDED | {"interrupted", "pending"}


def test_a_second_run_without_resume_is_refused_with_the_command_that_continues_it(interrupted_run):
    proc = interrupted_run["refused"]
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "holds an unfinished run" in proc.stderr and "--resume" in proc.stderr


def test_the_interrupted_trial_resumes_from_its_checkpoint(interrupted_run):
    """After Ctrl-C, --resume continues the cut trial from its fold checkpoints: its first new point follows
    the checkpoint, point 1 is never trained again."""
    trial_id = interrupted_run["interrupted"]["trial"]
    before = trial_points(interrupted_run["interrupted"]["out"], trial_id)
    after = trial_points(interrupted_run["killed"]["out"], trial_id)
    assert before[0] == 1 and after, interrupted_run["killed"]["out"][-3000:]
    assert 2 <= after[0] - 1 <= before[-1]  # resumed from a checkpoint at point 2 or later
    assert 1 not in after and after[-1] == NUM_POINTS
    assert "resumes at step" in interrupted_run["killed"]["out"]
    # The report counts the restart and the points trained again (those past the checkpoint).
    reached = next(t for t in interrupted_run["interrupted"]["state"]["trials"] if t["trial_id"] == trial_id)
    trial = next(t for t in interrupted_run["report"]["trials"] if t["trial_id"] == trial_id)
    assert (trial["restarts"], trial["points_redone"]) == (1, reached["eval_points"] - (after[0] - 1))


def test_a_killed_driver_strands_nothing(interrupted_run):
    """SIGKILL of the driver's process group: no process it started (its local Ray's GCS, raylet, dashboard,
    trial drivers, fold workers) outlives it."""
    killed = interrupted_run["killed"]
    assert killed["started"] > 5 and killed["survivors"] == []


def test_the_report_of_a_killed_run_is_partial(interrupted_run):
    proc, report = interrupted_run["partial_report"], interrupted_run["partial_report_json"]
    assert proc.returncode == 0, proc.stderr
    assert "partial report: the run is interrupted" in proc.stdout
    assert report["partial"] and report["state"] == "interrupted"
    assert {t["status"] for t in report["trials"]} <= ENDED | {"interrupted", "pending"}
    ended = {t["trial_id"] for t in interrupted_run["killed"]["state"]["trials"] if t["status"] in ENDED}
    assert ended and {t["trial_id"] for t in report["trials"] if t["status"] in ENDED} == ended


def test_the_resumed_run_finishes(interrupted_run):
    proc, report = interrupted_run["resumed"], interrupted_run["report"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert not report["partial"] and report["state"] == "finished"
    assert len(report["trials"]) == 4 and {t["status"] for t in report["trials"]} <= {"finished", "stopped"}
    for trial in report["trials"]:
        oof = pd.read_csv(interrupted_run["run_dir"] / "oof" / f"{trial['trial_id']}.csv")
        assert len(oof) == 450 and oof[["pred_best", "pred_last"]].notna().all().all()


def test_ended_trials_are_not_run_again(interrupted_run):
    """A rerun would rewrite the trial's OOF file and add lines to its Tune results: neither happened."""
    run_dir, ended = interrupted_run["run_dir"], interrupted_run["ended_before_resume"]
    assert ended
    for trial_id, before in ended.items():
        assert (run_dir / "oof" / f"{trial_id}.csv").stat().st_mtime_ns == before["oof_mtime_ns"], trial_id
        assert tune_result_lines(run_dir, trial_id) == before["result_lines"], trial_id
    statuses = {t["trial_id"]: t["status"] for t in interrupted_run["report"]["trials"]}
    killed_state = {t["trial_id"]: t["status"] for t in interrupted_run["killed"]["state"]["trials"]}
    assert all(statuses[trial_id] == killed_state[trial_id] for trial_id in ended)


def test_the_killed_trial_resumes_at_its_checkpoint(interrupted_run):
    """The trial SIGKILL cut short continues from its latest stored checkpoint: its first new point is that
    checkpoint + 1, point 1 is never printed again, and its curve up to the checkpoint is what it was."""
    killed, run_dir = interrupted_run["killed"], interrupted_run["run_dir"]
    trial_id = killed["trial"]
    out = interrupted_run["resumed"].stdout + interrupted_run["resumed"].stderr
    after = trial_points(out, trial_id)
    assert after, out[-3000:]
    resumed_from = after[0] - 1
    assert resumed_from >= 2 and resumed_from in killed["checkpoints"], (after, killed["checkpoints"])
    assert 1 not in after and after[-1] == NUM_POINTS
    before_lines = killed["curve"].splitlines()
    final_lines = (run_dir / "curves" / f"{trial_id}.csv").read_text().splitlines()
    assert final_lines[: resumed_from + 1] == before_lines[: resumed_from + 1]  # header + points up to it
    assert len(final_lines) == NUM_POINTS + 1
    trial = next(t for t in interrupted_run["report"]["trials"] if t["trial_id"] == trial_id)
    assert (trial["restarts"], trial["points_redone"]) == (1, len(before_lines) - 1 - resumed_from)


def test_the_resumed_run_equals_an_uninterrupted_one(interrupted_run, smoke_run):
    """Trial by trial (the same grid: 2 learning rates x 2 seeds), the twice-interrupted search ends as the
    uninterrupted smoke run did: the same status and the same pooled RMSEs, last and best."""
    def by_params(report: dict) -> dict:
        return {(t["params"]["train.lr"], t["params"]["train.seed"]): t for t in report["trials"]}

    resumed, twin = by_params(interrupted_run["report"]), by_params(smoke_run["report"])
    assert resumed.keys() == twin.keys() and len(twin) == 4
    for params, trial in twin.items():
        got = resumed[params]
        assert (got["status"], got["eval_points"]) == (trial["status"], trial["eval_points"]), params
        assert got["cv_rmse_last"] == pytest.approx(trial["cv_rmse_last"], abs=1e-6), params
        assert got["cv_rmse_best"] == pytest.approx(trial["cv_rmse_best"], abs=1e-6), params
    assert interrupted_run["report"]["best_trial"] is not None


def test_a_trial_that_diverges_is_reported_as_diverged_and_not_retried(tmp_path, train_csv):
    """Targets far beyond float32's range make every fold's loss infinite: the trial stops at its first
    point as diverged, with the reason, and is not retried (one Tune result, one diverged line)."""
    data = pd.read_csv(train_csv)
    data["target"] = data["target"] * 1e30
    exploding = tmp_path / "exploding.csv"
    data.to_csv(exploding, index=False)
    args = ["tune", "spaces/smoke.yaml", f"data.path={exploding}", "search.params={train.lr: {grid: [0.003]}}",
            "search.num_samples=1", "train.epochs=3"]
    proc = run_raycv(args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # no trial produced a result
    run_dir = tmp_path / "runs" / "smoke"
    report = json.loads((run_dir / "report.json").read_text())
    (trial,) = report["trials"]
    assert trial["status"] == "diverged" and "diverged at point 1" in trial["reason"]
    assert "train_loss" in trial["reason"] and report["best_trial"] is None
    assert "\n" not in trial["reason"] and f"trial {trial['trial_id']} diverged: fold " in proc.stdout
    everything = proc.stdout + proc.stderr
    assert everything.count(f"trial {trial['trial_id']} | point 1/3 | diverged: fold ") == 1, everything[-3000:]
    assert tune_result_lines(run_dir, trial["trial_id"]) == 1
    assert not list((run_dir / "ray" / f"train_{trial['trial_id']}").glob("point_*"))
