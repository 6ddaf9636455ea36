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


def start(run_dir: Path, storage_path: str, resume_command: str) -> None:
    """Start the guard of this process's run; it watches until this process ends."""
    # Neither end is inheritable: Ray's processes started from here do not hold the write end, which this
    # process never closes (the kernel closes it as the process ends).
    read_end, _write_end = os.pipe()
    subprocess.Popen(
        [sys.executable, "-m", "raycv.driver_guard", str(read_end), str(os.getpid()), str(run_dir), storage_path,
         resume_command],
        pass_fds=(read_end,), stdin=subprocess.DEVNULL,
    )
    os.close(read_end)


def watch(read_end: int, driver_pid: int, run_dir: Path, storage_path: str, resume_command: str) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    with os.fdopen(read_end, "rb") as pipe:
        pipe.read()  # returns at the driver's end: nothing is ever written
    return after_driver(driver_pid, run_dir, storage_path, resume_command)


def after_driver(driver_pid: int, run_dir: Path, storage_path: str, resume_command: str) -> int:
    from raycv import RaycvError

    try:
        if not interrupt_run(run_dir, storage_path, driver_pid):
            return 0  # the driver ended the run itself, or another driver has it now
    except RaycvError:  # run.json unreadable: nothing to mark
        return 0
    with contextlib.suppress(OSError):  # the terminal may have gone too: run.json says it
        print(f"raycv: error: the search's driver (pid {driver_pid}) ended without ending the run (Ray's core ends "
              "it when the Ray node it runs on stops, e.g. `ray stop` there; or it was killed); the run is "
              f"interrupted, and resumes from its checkpoints: {resume_command}", file=sys.stderr, flush=True)
    return 1


def interrupt_run(run_dir: Path, storage_path: str | None, driver_pid: int | None = None) -> bool:
    """Mark a run whose driver has gone (or is about to) `interrupted`, with its trials that had not ended
    (collecting what the storage holds, if it answers), and remove their local checkpoint copies, whose uploads
    died too. Only a run that still says `running` (under `driver_pid`, where given); returns whether it did."""
    from raycv.collect import load_run_state, mark_interrupted, save_run_state

    state = load_run_state(run_dir)
    if state is None or state.state != "running" or driver_pid not in (None, state.driver.get("pid")):
        return False
    try:
        mark_interrupted(state, storage_path, run_dir)  # what the storage holds
    except Exception:
        mark_interrupted(state, None, run_dir)
    save_run_state(run_dir, state)
    from raycv.worker import remove_checkpoint_dirs_of

    remove_checkpoint_dirs_of({trial.trial_id for trial in state.trials})
    return True


if __name__ == "__main__":
    fd, pid, directory, storage, command = sys.argv[1:6]
    sys.exit(watch(int(fd), int(pid), Path(directory), storage, command))
