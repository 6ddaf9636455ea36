"""A driver ended abruptly leaves an honest run: raycv.driver_guard with stand-in drivers, real processes that
end as a driver can (killed alone, or by the immediate exit Ray's core takes when the Ray node under it stops
in order: "The connection to the plasma store is failed. Terminate the process."), and one that ends its run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import die_with_pytest, kill_group

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
