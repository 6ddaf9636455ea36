"""A small process that outlives the driver of `raycv tune`, so that a driver ended abruptly leaves an honest run.

Ray's core ends a driver on the spot, with no Python code run, when the Ray node it runs on stops in order
(`ray stop` on the head, or the program that started a local Ray the run joined exits): "The connection to
the plasma store is failed. Terminate the process.", exit status 1. So does SIGKILL of the driver alone, or
the out-of-memory killer. The run would be left `running` with no line of raycv's.

The driver starts this guard once the run is under way (`start`) and holds the write end of a pipe; the
guard blocks on the read end. The pipe closes when the driver's process ends, however it ends. If run.json
then still says `running` under that driver, the guard marks the run and its running trials `interrupted`
(with what the storage holds), removes their local checkpoint copies, and prints the one line with the
`--resume` command on the driver's stderr. A driver that ended the run itself (finished, interrupted, failed,
or the cluster-watch's lost-head line) leaves nothing to do: the guard exits quietly.

The guard ignores SIGINT, SIGTERM and SIGHUP (Ctrl-C, `ray job stop` and a closed terminal reach the driver's
whole process group: the driver answers them); SIGKILL of the group ends it with the driver, as before.
It imports what it needs only after the driver has gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


def start(run_dir: Path, storage_path: str, resume_command: str) -> subprocess.Popen:
    """Start the guard of this process's run; it watches until this process ends."""
    read_end, write_end = os.pipe()  # not inheritable: Ray's processes started from here do not hold it
    guard = subprocess.Popen(
        [sys.executable, "-m", "raycv.driver_guard", str(read_end), str(os.getpid()), str(run_dir), storage_path,
         resume_command],
        pass_fds=(read_end,), stdin=subprocess.DEVNULL,
    )
    os.close(read_end)
    _held.append(write_end)  # open until this process ends
    return guard


_held: list[int] = []


def watch(read_end: int, driver_pid: int, run_dir: Path, storage_path: str, resume_command: str) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    with os.fdopen(read_end, "rb") as pipe:
        pipe.read()  # returns at the driver's end: nothing is ever written
    return after_driver(driver_pid, run_dir, storage_path, resume_command)


def after_driver(driver_pid: int, run_dir: Path, storage_path: str, resume_command: str) -> int:
    from raycv import RaycvError
    from raycv.collect import load_run_state, mark_interrupted, save_run_state

    try:
        state = load_run_state(run_dir)
    except RaycvError:
        return 0
    if state is None or state.state != "running" or state.driver.get("pid") != driver_pid:
        return 0  # the driver ended the run itself, or another driver has it now
    try:
        mark_interrupted(state, storage_path, run_dir)  # what the storage holds
    except Exception:
        mark_interrupted(state, None, run_dir)
    save_run_state(run_dir, state)
    from raycv.worker import remove_checkpoint_dirs_of

    remove_checkpoint_dirs_of({trial.trial_id for trial in state.trials})  # their uploads died with the driver
    with contextlib.suppress(OSError):  # the terminal may have gone too: run.json says it
        print(f"raycv: error: the search's driver (pid {driver_pid}) ended without ending the run (Ray's core ends "
              "it when the Ray node it runs on stops, e.g. `ray stop` there; or it was killed); the run is "
              f"interrupted, and resumes from its checkpoints: {resume_command}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    fd, pid, directory, storage, command = sys.argv[1:6]
    sys.exit(watch(int(fd), int(pid), Path(directory), storage, command))
