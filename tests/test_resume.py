"""A search survives its driver: killed outright, then resumed; interrupted with Ctrl-C, then resumed; and a
trial that diverges is reported as such. Real `raycv tune` processes on a real local Ray, each in a process
group of its own that the test ends itself, under a hard time limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import kill_group, raycv_env, run_raycv

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

ENDED = {"finished", "stopped", "diverged", "error"}


def start_raycv(args: list[str], cwd: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "raycv.cli", *args], cwd=cwd, env=raycv_env(), text=True,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):  # not there yet, or being replaced
        return {"trials": []}


def wait_for(condition, proc: subprocess.Popen, log_path: Path, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert proc.poll() is None, f"raycv exited before {what}:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {limit_s} s:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.5)


def test_a_killed_driver_strands_nothing_and_the_run_resumes(tmp_path, train_csv):
    args = ["tune", "spaces/smoke.yaml", f"data.path={train_csv}"]
    run_dir = tmp_path / "runs" / "smoke"
    log_path = tmp_path / "first.log"
    proc = start_raycv(args, tmp_path, log_path)
    try:
        wait_for(lambda: any(t["status"] in ENDED for t in run_state(run_dir)["trials"]), proc, log_path, 500,
                 "trial that ended")
    finally:
        kill_group(proc)  # SIGKILL: the driver and the local Ray it started; nothing gets to clean up
        proc.wait(timeout=60)
    ended = {t["trial_id"]: t for t in run_state(run_dir)["trials"] if t["status"] in ENDED}
    oof_before = {trial_id: (run_dir / "oof" / f"{trial_id}.csv").read_bytes() for trial_id in ended}

    # The report of what the storage holds: partial, each trial's state.
    proc = run_raycv(["report", str(run_dir)], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "partial report: the run is interrupted" in proc.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["partial"] and report["state"] == "interrupted"
    assert {t["status"] for t in report["trials"]} <= ENDED | {"interrupted"}
    assert {t["trial_id"] for t in report["trials"] if t["status"] in ENDED} == set(ended)

    # Running again without --resume is refused with the command that continues it.
    proc = run_raycv(args, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "holds an unfinished run" in proc.stderr and "--resume" in proc.stderr

    proc = run_raycv([*args, "--resume"], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert not report["partial"] and report["state"] == "finished"
    assert len(report["trials"]) == 4 and {t["status"] for t in report["trials"]} <= {"finished", "stopped"}
    for trial_id, before in oof_before.items():  # trials that had ended were not run again
        assert (run_dir / "oof" / f"{trial_id}.csv").read_bytes() == before, trial_id
        assert next(t for t in report["trials"] if t["trial_id"] == trial_id)["status"] == ended[trial_id]["status"]
    for trial in report["trials"]:
        oof = pd.read_csv(run_dir / "oof" / f"{trial['trial_id']}.csv")
        assert len(oof) == 450 and oof[["pred_best", "pred_last"]].notna().all().all()


def test_ctrl_c_interrupts_honestly_and_the_run_resumes(tmp_path, train_csv):
    """SIGINT mid-trial: the trial is `interrupted` (not stopped), its fold checkpoints stay, exit 130;
    --resume continues it from those checkpoints to the end."""
    args = ["tune", "spaces/smoke.yaml", f"data.path={train_csv}", "search.params={train.lr: {grid: [0.003]}}",
            "search.num_samples=1", "train.epochs=8"]
    run_dir = tmp_path / "runs" / "smoke"
    log_path = tmp_path / "first.log"
    proc = start_raycv(args, tmp_path, log_path)
    try:
        wait_for(lambda: list((run_dir / "ray").glob("train_*/point_0003")), proc, log_path, 500, "checkpoint")
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        kill_group(proc)
    out = log_path.read_text()
    assert proc.returncode == 130, out[-3000:]
    assert "continue with: raycv tune spaces/smoke.yaml" in out and "--resume" in out
    (trial,) = run_state(run_dir)["trials"]
    assert trial["status"] == "interrupted" and run_state(run_dir)["state"] == "interrupted"
    assert list((run_dir / "ray" / f"train_{trial['trial_id']}").glob("point_*/fold_*.pt"))  # kept
    points_before = trial["eval_points"]
    assert 3 <= points_before < 8

    proc = run_raycv([*args, "--resume"], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((run_dir / "report.json").read_text())
    (trial,) = report["trials"]
    assert trial["status"] == "finished" and trial["eval_points"] == 8 and report["state"] == "finished"
    assert "fold 0 resumes at step" in proc.stdout + proc.stderr or "resumes at step" in proc.stdout + proc.stderr
    curve = pd.read_csv(run_dir / "curves" / f"{trial['trial_id']}.csv")
    assert curve["eval_point"].tolist() == list(range(1, 9))


def test_a_trial_that_diverges_is_reported_as_diverged(tmp_path, train_csv):
    """Targets far beyond float32's range make every fold's loss infinite: the trial stops at its first
    point as diverged, with the reason, and is not retried."""
    data = pd.read_csv(train_csv)
    data["target"] = data["target"] * 1e30
    exploding = tmp_path / "exploding.csv"
    data.to_csv(exploding, index=False)
    args = ["tune", "spaces/smoke.yaml", f"data.path={exploding}", "search.params={train.lr: {grid: [0.003]}}",
            "search.num_samples=1", "train.epochs=3"]
    proc = run_raycv(args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # no trial produced a result
    report = json.loads((tmp_path / "runs" / "smoke" / "report.json").read_text())
    (trial,) = report["trials"]
    assert trial["status"] == "diverged" and "diverged at point 1" in trial["reason"]
    assert "train_loss" in trial["reason"] and report["best_trial"] is None
    assert f"trial {trial['trial_id']} diverged: fold " in proc.stdout
    assert "\n" not in trial["reason"]
