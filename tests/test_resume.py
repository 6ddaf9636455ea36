"""A search survives its driver, with its storage in a bucket, and the tests would see it if it did not.

One smoke search (the same grid as conftest.py's `smoke_run`) keeps its storage in a real S3 API on loopback
(conftest.py's `s3`: moto behind a proxy the test can close), as a spot cluster's runs do. It is cut short
twice and resumed twice: Ctrl-C while its first full trial trains (an honest `interrupted`, exit 130),
`--resume`, then SIGKILL of the resumed driver's whole process group while another trial is past its second
checkpointed point, then `--resume` to the end, the endpoint taken away for OUTAGE_S seconds while a later
trial trains. What a rerun or a restart from zero would change is recorded before each resume: the ended
trials' objects in the bucket (ETag, LastModified) and Tune result lines, the cut trial's curve. The finished
run must then equal the uninterrupted `smoke_run` trial by trial, have left its files (and no checkpoint) in
the bucket, and report and predict. And a trial that diverges is reported as such, once.

Real `raycv tune` processes on a real local Ray, each in a process group (and session) of its own that the
test ends itself, under a hard time limit.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from helpers import (
    ENDED,
    S3_BUCKET,
    bucket_objects,
    bucket_text,
    kill_group,
    run_raycv,
    run_state,
    start_raycv,
    wait_for,
)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

NUM_POINTS, NUM_FOLDS = 6, 3  # smoke.yaml: 6 epochs, one evaluation point each; 3 folds
PREFIX = "smoke"
STORAGE = f"s3://{S3_BUCKET}/{PREFIX}"
OUTAGE_S = 10  # how long the endpoint is away during the last resumed run


def curve_rows(client, trial_id: str) -> int:
    """Evaluation points in the pooled curve rank 0 keeps in the storage (rewritten at every point)."""
    text = bucket_text(client, f"{PREFIX}/results/{trial_id}/curve.csv")
    return max(len(text.splitlines()) - 1, 0) if text else 0


def checkpoints(client, trial_id: str) -> set[int]:
    """The points whose fold checkpoints Ray Train has registered (its snapshot names them once their
    uploads are done) and whose every fold file is in the bucket: what a resume can start from."""
    registered = {int(p) for p in re.findall(r"point_(\d{4})", bucket_text(
        client, f"{PREFIX}/train_{trial_id}/checkpoint_manager_snapshot.json") or "")}
    files: dict[int, int] = {}
    for key in bucket_objects(client, f"{PREFIX}/train_{trial_id}/point_"):
        if key.endswith(".pt"):
            point = int(re.search(r"/point_(\d{4})/", key).group(1))
            files[point] = files.get(point, 0) + 1
    return {point for point in registered if files.get(point, 0) >= NUM_FOLDS}


def rung_value(client, trial_id: str) -> float:
    """The trial's pooled RMSE at point 2, smoke.yaml's only ASHA rung below max_t."""
    return float(pd.read_csv(io.StringIO(bucket_text(client, f"{PREFIX}/results/{trial_id}/curve.csv")))
                 ["cv_rmse_last"].iloc[1])


def trial_past_second_checkpoint(client, run_dir: Path, exclude: set[str], as_good_as: str | None = None):
    """A running trial (not in `exclude`) that has reported point 3 and has a checkpoint at point 2 or later;
    with `as_good_as`, one within 10% of that trial at the rung, which ASHA lets train on (a trial ASHA stops
    there may still report point 3: the stop reaches its workers a result late)."""
    for trial in run_state(run_dir)["trials"]:
        trial_id = trial["trial_id"]
        if trial["status"] == "running" and trial_id not in exclude and curve_rows(client, trial_id) >= 3 \
                and max(checkpoints(client, trial_id), default=0) >= 2 \
                and (as_good_as is None or rung_value(client, trial_id) <= 1.1 * rung_value(client, as_good_as)):
            return trial_id
    return None


def tune_result_lines(client, trial_id: str) -> int:
    return len((bucket_text(client, f"{PREFIX}/tune/{trial_id}/result.json") or "").splitlines())


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
def interrupted_run(s3, tmp_path_factory, train_csv):
    """The smoke search in the bucket: Ctrl-C, --resume, SIGKILL, --resume through an outage (and --resume
    once more if that run gave up on the storage); what each phase left, for the tests below."""
    cwd = tmp_path_factory.mktemp("interrupted")
    client = s3["client"]
    args = ["tune", "spaces/smoke.yaml", f"data.path={train_csv}", f"run.storage_path={STORAGE}"]
    run_dir = cwd / "runs" / "smoke"
    seen: dict = {"cwd": cwd, "run_dir": run_dir, "args": args, "client": client}

    # 1. Ctrl-C while the first full trial trains past its second checkpoint.
    log_path = cwd / "1_interrupted.log"
    proc = start_raycv(args, cwd, log_path)
    try:
        first = wait_for(lambda: trial_past_second_checkpoint(client, run_dir, set()), proc, log_path, 500,
                         "trial past its second checkpoint")
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        kill_group(proc)
    seen["interrupted"] = {"trial": first, "returncode": proc.returncode, "out": log_path.read_text(),
                           "state": run_state(run_dir)}

    # A second run without --resume is refused with the command that continues it.
    seen["refused"] = run_raycv(args, cwd=cwd, timeout=300)

    # 2. --resume; SIGKILL once another trial that trains on is past its second checkpoint and some trial
    # has ended.
    log_path = cwd / "2_killed.log"
    proc = start_raycv([*args, "--resume"], cwd, log_path)
    try:
        second = wait_for(lambda: trial_past_second_checkpoint(client, run_dir, {first}, first) if any(
            t["status"] in ENDED for t in run_state(run_dir)["trials"]) else None,
            proc, log_path, 600, "second trial past its second checkpoint")
        started = process_tree(proc.pid)
    finally:
        kill_group(proc)  # SIGKILL: the driver and the local Ray it started; nothing gets to clean up
        proc.wait(timeout=60)
    deadline = time.monotonic() + 60  # Ray workers have process groups of their own: they follow their raylet
    while survivors(started) and time.monotonic() < deadline:
        time.sleep(1)
    # What the bucket holds once nothing writes to it any more: the checkpoints a resume can start from.
    before_kill = {"curve": bucket_text(client, f"{PREFIX}/results/{second}/curve.csv"),
                   "checkpoints": checkpoints(client, second), "objects": bucket_objects(client, PREFIX)}
    seen["killed"] = {"trial": second, "out": log_path.read_text(), "state": run_state(run_dir),
                      "started": len(started), "survivors": survivors(started), **before_kill}

    # The report of what the storage holds: partial, each trial's state.
    seen["partial_report"] = run_raycv(["report", str(run_dir)], cwd=cwd, timeout=300)
    seen["partial_report_json"] = json.loads((run_dir / "report.json").read_text())

    # What a rerun of an ended trial would change: its objects in the bucket, its Tune result lines.
    ended = [t["trial_id"] for t in run_state(run_dir)["trials"] if t["status"] in ENDED]
    seen["ended_before_resume"] = {
        trial_id: {"objects": {key: value for key, value in before_kill["objects"].items()
                               if f"/results/{trial_id}/" in key},
                   "result_lines": tune_result_lines(client, trial_id)} for trial_id in ended}

    # 3. --resume to the end; the endpoint goes away for a while once a trial the kill had not reached trains.
    log_path = cwd / "3_resumed.log"
    proc = start_raycv([*args, "--resume"], cwd, log_path)
    known = {t["trial_id"] for t in seen["killed"]["state"]["trials"] if t["status"] != "pending"}

    def a_later_trial_wrote_a_point():
        return next((t["trial_id"] for t in run_state(run_dir)["trials"]
                     if t["trial_id"] not in known and curve_rows(client, t["trial_id"]) >= 1), None)

    try:
        seen["outage_trial"] = wait_for(a_later_trial_wrote_a_point, proc, log_path, 600, "a point of a later trial")
        s3["proxy"].close()
        time.sleep(OUTAGE_S)
        s3["proxy"].open()
        proc.wait(timeout=600)
    finally:
        kill_group(proc)
        proc.wait(timeout=60)
    seen["resumed"] = {"returncode": proc.returncode, "out": log_path.read_text()}
    seen["final"] = None
    if proc.returncode != 0:  # the run gave up on the storage: one line, and --resume completes it
        seen["final"] = run_raycv([*args, "--resume"], cwd=cwd, timeout=600)
    report_path = run_dir / "report.json"
    seen["report"] = json.loads(report_path.read_text()) if report_path.is_file() else None
    seen["objects"] = bucket_objects(client, PREFIX)
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
    """After Ctrl-C, --resume continues the cut trial from its fold checkpoints in the bucket: its first new
    point follows the checkpoint, point 1 is never trained again."""
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


def test_the_resumed_run_rides_out_the_outage_and_finishes(interrupted_run):
    """The endpoint away for OUTAGE_S seconds mid-trial: the run waits for it and finishes; or, where Ray's
    own uploads gave up first, it ends with one line naming the storage and --resume finishes it."""
    resumed, final, report = interrupted_run["resumed"], interrupted_run["final"], interrupted_run["report"]
    if final is not None:
        errors = [line for line in resumed["out"].splitlines() if line.startswith("raycv: error:")]
        assert resumed["returncode"] == 2 and len(errors) == 1, resumed["out"][-4000:]
        assert f"run.storage_path: cannot write to {STORAGE}" in errors[0]
        assert final.returncode == 0, final.stdout[-4000:] + final.stderr[-4000:]
    else:
        assert resumed["returncode"] == 0, resumed["out"][-4000:]
    assert not report["partial"] and report["state"] == "finished"
    assert len(report["trials"]) == 4 and {t["status"] for t in report["trials"]} <= {"finished", "stopped"}
    for trial in report["trials"]:  # nothing lost: every point of every trial
        oof = pd.read_csv(interrupted_run["run_dir"] / "oof" / f"{trial['trial_id']}.csv")
        assert len(oof) == 450 and oof[["pred_best", "pred_last"]].notna().all().all()
        curve = pd.read_csv(interrupted_run["run_dir"] / "curves" / f"{trial['trial_id']}.csv")
        assert curve["eval_point"].tolist() == list(range(1, trial["eval_points"] + 1))


def test_ended_trials_are_not_run_again(interrupted_run):
    """A rerun would rewrite the trial's files in the bucket (a new ETag or LastModified) and add lines to
    its Tune results: neither happened."""
    ended, client = interrupted_run["ended_before_resume"], interrupted_run["client"]
    assert ended
    for trial_id, before in ended.items():
        assert {f"{PREFIX}/results/{trial_id}/{name}" for name in ("oof.csv", "curve.csv", "status.json")} <= set(
            before["objects"]), trial_id
        for key, stamp in before["objects"].items():
            assert interrupted_run["objects"][key] == stamp, key
        assert tune_result_lines(client, trial_id) == before["result_lines"], trial_id
    statuses = {t["trial_id"]: t["status"] for t in interrupted_run["report"]["trials"]}
    killed_state = {t["trial_id"]: t["status"] for t in interrupted_run["killed"]["state"]["trials"]}
    assert all(statuses[trial_id] == killed_state[trial_id] for trial_id in ended)


def test_the_killed_trial_resumes_at_its_checkpoint(interrupted_run):
    """The trial SIGKILL cut short continues from its latest checkpoint in the bucket: its first new point is
    that checkpoint + 1, point 1 is never printed again, and its curve up to the checkpoint is what it was."""
    killed, run_dir = interrupted_run["killed"], interrupted_run["run_dir"]
    trial_id = killed["trial"]
    out = interrupted_run["resumed"]["out"]
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
    uninterrupted smoke run did: the same status; a finished trial with the same pooled RMSEs, last and best;
    a trial ASHA stopped with the same curve up to the rung where it was stopped (a stop reaches a trial's
    workers a result or so after they report, so how many points past the rung it trained varies)."""
    def by_params(report: dict) -> dict:
        return {(t["params"]["train.lr"], t["params"]["train.seed"]): t for t in report["trials"]}

    def curve(run: dict, trial: dict) -> pd.DataFrame:
        return pd.read_csv(run["run_dir"] / "curves" / f"{trial['trial_id']}.csv")

    resumed, twin = by_params(interrupted_run["report"]), by_params(smoke_run["report"])
    assert resumed.keys() == twin.keys() and len(twin) == 4
    assert sorted(t["status"] for t in twin.values()) == ["finished", "finished", "stopped", "stopped"]
    for params, trial in twin.items():
        got = resumed[params]
        assert got["status"] == trial["status"], params
        if trial["status"] == "finished":
            assert got["eval_points"] == trial["eval_points"] == NUM_POINTS, params
            assert got["cv_rmse_last"] == pytest.approx(trial["cv_rmse_last"], abs=1e-6), params
            assert got["cv_rmse_best"] == pytest.approx(trial["cv_rmse_best"], abs=1e-6), params
        else:
            rung = 2  # smoke.yaml's scheduler.grace_period
            assert min(got["eval_points"], trial["eval_points"]) >= rung, params
            ours, theirs = curve(interrupted_run, got).head(rung), curve(smoke_run, trial).head(rung)
            assert ours["cv_rmse_last"].tolist() == pytest.approx(theirs["cv_rmse_last"].tolist(), abs=1e-6), params
    assert interrupted_run["report"]["best_trial"] is not None


def test_trial_files_and_fold_checkpoints_were_objects_in_the_bucket(interrupted_run):
    """Every trial's files, Tune's state and (before they were pruned) fold checkpoints are objects in the
    bucket; nothing of Ray's storage went to the local disk."""
    killed, now = interrupted_run["killed"]["objects"], interrupted_run["objects"]
    assert any("/point_" in key and key.endswith(".pt") for key in killed), sorted(killed)
    assert f"{PREFIX}/tune/tuner.pkl" in now
    for trial in interrupted_run["report"]["trials"]:
        for name in ("oof.csv", "curve.csv", "status.json"):
            assert f"{PREFIX}/results/{trial['trial_id']}/{name}" in now
    assert not (interrupted_run["run_dir"] / "ray").exists()


def test_checkpoint_pruning_deletes_the_objects(interrupted_run):
    """Every trial has ended: its fold checkpoints (model + optimiser) are gone from the bucket, those the
    killed run had left for the trial it cut short included; the best trial's models were exported first."""
    assert [key for key in interrupted_run["killed"]["objects"] if "/point_" in key]
    assert not [key for key in interrupted_run["objects"] if "/point_" in key]
    best = interrupted_run["report"]["best_trial"]
    assert sorted(p.name for p in (interrupted_run["run_dir"] / "models" / best).glob("fold_*.safetensors")) == [
        "fold_0.safetensors", "fold_1.safetensors", "fold_2.safetensors"]


def test_report_and_predict_work_from_the_run(interrupted_run, train_csv):
    run_dir, cwd = interrupted_run["run_dir"], interrupted_run["cwd"]
    before = json.loads((run_dir / "report.json").read_text())
    (run_dir / "report.md").unlink()
    proc = run_raycv(["report", str(run_dir)], cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "report.md").is_file()
    assert json.loads((run_dir / "report.json").read_text())["trials"] == before["trials"]

    new_texts = pd.read_csv(train_csv).head(12)[["id", "excerpt"]]
    new_texts.to_csv(cwd / "new.csv", index=False)
    proc = run_raycv(["predict", str(run_dir), "--data", str(cwd / "new.csv"), "--out", str(cwd / "sub.csv")],
                     cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    submission = pd.read_csv(cwd / "sub.csv")
    assert submission["id"].tolist() == new_texts["id"].tolist() and submission["target"].notna().all()


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
    assert len((run_dir / "ray" / "tune" / trial["trial_id"] / "result.json").read_text().splitlines()) == 1
    assert not list((run_dir / "ray" / f"train_{trial['trial_id']}").glob("point_*"))
