"""A driver ended abruptly leaves an honest run: raycv.driver_guard with stand-in drivers, real processes that
end as a driver can (killed alone, or by the immediate exit Ray's core takes when the Ray node under it stops
in order: "The connection to the plasma store is failed. Terminate the process."), and one that ends its run;
then a real joined search whose Ray is stopped in order under it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import die_with_pytest, kill_group, start_raycv, wait_for

RESUME = "raycv tune spaces/smoke.yaml --resume"


def stand_in_driver(run_dir: Path, then: str) -> subprocess.Popen:
    """A process that writes run.json as `raycv tune` does (running, one running trial, itself the driver),
    starts the guard, and then ends: `exit` (Ray core's abrupt exit), `sleep` (to be killed), or `finish`
    (the run ended by the driver itself)."""
    code = f"""
import os, sys, time
from pathlib import Path
from raycv import driver_guard
from raycv.collect import new_run_state, save_run_state
run_dir = Path({str(run_dir)!r})
state = new_run_state(name="smoke", num_points=6, max_t=6, scheduler="asha", searched=["train.lr"])
state.trial("abc_00000").status = "running"
save_run_state(run_dir, state)
driver_guard.start(run_dir, "", {RESUME!r})
print("guarded", flush=True)
if {then!r} == "exit":
    os._exit(1)
if {then!r} == "finish":
    state.state = "finished"
    state.trial("abc_00000").status = "finished"
    save_run_state(run_dir, state)
    sys.exit(0)
time.sleep(600)
"""
    run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=die_with_pytest)


def guard_lines(proc: subprocess.Popen, timeout_s: float = 60) -> list[str]:
    """The `raycv: error:` lines on the driver's stderr, once the driver and its guard (which shares that
    stderr, so the pipe closes only when both have ended) are gone."""
    _, err = proc.communicate(timeout=timeout_s)
    return [line for line in err.splitlines() if line.startswith("raycv: error:")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("end", ["exit", "SIGKILL"])
def test_a_driver_that_ends_abruptly_leaves_the_run_interrupted_in_one_line(end, tmp_path):
    run_dir = tmp_path / "runs" / "smoke"
    driver = stand_in_driver(run_dir, "exit" if end == "exit" else "sleep")
    try:
        assert driver.stdout.readline().strip() == "guarded"
        if end == "SIGKILL":
            os.kill(driver.pid, signal.SIGKILL)  # the driver alone (the OOM killer's way), not its group
        (line,) = guard_lines(driver)
    finally:
        kill_group(driver)
    assert line == (f"raycv: error: the search's driver (pid {driver.pid}) ended without ending the run (Ray's core "
                    "ends it when the Ray node it runs on stops, e.g. `ray stop` there; or it was killed); the run is "
                    f"interrupted, and resumes from its checkpoints: {RESUME}")
    state = json.loads((run_dir / "run.json").read_text())
    assert state["state"] == "interrupted" and [t["status"] for t in state["trials"]] == ["interrupted"]


@pytest.mark.timeout(120)
def test_a_driver_that_ended_its_run_leaves_the_guard_nothing_to_say(tmp_path):
    run_dir = tmp_path / "runs" / "smoke"
    driver = stand_in_driver(run_dir, "finish")
    try:
        assert guard_lines(driver) == []
    finally:
        kill_group(driver)
    assert driver.returncode == 0
    assert json.loads((run_dir / "run.json").read_text())["state"] == "finished"


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ray_stopped_under_a_joined_search_ends_it_as_interrupted_in_one_line(tmp_path, train_csv):
    """A program starts a local Ray; `raycv tune --address` joins it; at the trial's first point the program
    calls ray.shutdown(), which stops that Ray in order (as `ray stop` on a head does). Whichever notices first
    speaks, in one line, and leaves the run interrupted with the command that resumes it: the guard, when Ray's
    core ends the driver on the spot (the plasma store's connection failed), or the driver's own cluster watch,
    when the driver outlives its node's Ray (the GCS silent). Without the guard, the first way left no raycv
    line and run.json `running`."""
    temp_dir = tempfile.mkdtemp(prefix="raycv-own-")  # short: Ray's socket paths must fit 107 bytes
    owner = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(num_cpus=2, include_dashboard=False, "
         f"_temp_dir={temp_dir!r}); print(ray.get_runtime_context().gcs_address, flush=True); "
         "sys.stdin.read(); ray.shutdown()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, start_new_session=True,
        preexec_fn=die_with_pytest)
    driver = None
    try:
        address = owner.stdout.readline().strip()
        assert address, "the owner's local Ray did not start"
        log_path = tmp_path / "tune.log"
        args = ["tune", "--address", address, "spaces/smoke.yaml", f"data.path={train_csv}",
                "search.params={train.lr: {grid: [0.003]}}", "scheduler.type=none", "data.num_folds=2",
                "data.max_rows=240", "train.epochs=2"]
        driver = start_raycv(args, tmp_path, log_path)
        wait_for(lambda: "| point 1/2 |" in log_path.read_text(), driver, log_path, 300, "a first evaluation point")
        owner.stdin.close()  # ray.shutdown(): the Ray under the search stops in order
        driver.wait(timeout=180)
        deadline = time.monotonic() + 60  # the guard writes its line once the driver has gone
        while "raycv: error:" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)  # a second line, if any, would follow at once
        out = log_path.read_text()
    finally:
        if driver is not None:
            kill_group(driver)
        kill_group(owner)
        owner.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert driver.returncode == 1, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("raycv: error:")]
    assert len(lines) == 1, out[-3000:]
    line = lines[0]
    guard = f"raycv: error: the search's driver (pid {driver.pid}) ended without ending the run"
    watch = f"raycv: error: lost the Ray cluster at {address}: its GCS has not answered for"
    assert line.startswith((guard, watch)), line
    assert line.endswith(f"raycv tune spaces/smoke.yaml data.path={train_csv} 'search.params={{train.lr: {{grid: "
                         "[0.003]}}' scheduler.type=none data.num_folds=2 data.max_rows=240 train.epochs=2 "
                         f"--address {address} --resume"), line
    state = json.loads((tmp_path / "runs" / "smoke" / "run.json").read_text())
    assert state["state"] == "interrupted" and [t["status"] for t in state["trials"]] == ["interrupted"]
