"""Each trial's files from the run's storage (local or s3://) -> the run directory, and the run's state.

The run's state lives in `run.json` in the run directory, rewritten whenever a trial starts or ends: the
run's settings, whether it is `running`, `interrupted` or `finished`, and one `TrialRecord` per trial.
As a trial ends, `collect_trial` copies its out-of-fold predictions and pooled curve into the run
directory and settles its status, so the report can be refreshed during the search and rebuilt after a
crash. Everything after that (scoring, the report) reads only the run directory: `raycv report RUN_DIR`
needs neither Ray nor GPUs.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import pandas as pd
import yaml
from pydantic import Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic reads TypedDicts from here before Python 3.12

from raycv import RaycvError, first_line, shown, storage
from raycv.config import fold_and_seed

STATUSES = {
    "pending": "created, waiting for resources",
    "running": "training now",
    "finished": "ran every evaluation point",
    "stopped": "stopped early by ASHA; its scores are those of the last point it reached",
    "diverged": "stopped when a loss or prediction became NaN or infinite (see reason)",
    "error": "failed (see reason)",
    "interrupted": "cut short by Ctrl-C, SIGTERM or a lost driver; raycv tune ... --resume continues it",
}
ENDED = ("finished", "stopped", "diverged", "error")  # a trial in one of these never runs again
RUN_STATES = ("running", "interrupted", "finished")


@dataclass
class TrialRecord:
    """One Tune trial as the report sees it (a row of run.json's `trials`)."""

    trial_id: str
    params: dict = field(default_factory=dict)  # the searched values, by dotted config key
    status: str = "pending"  # one of STATUSES
    eval_points: int = 0  # evaluation points whose pooled predictions were written
    reason: str | None = None  # one line, for status diverged or error
    train_run: str = ""  # the trial's Ray Train run (its storage folder and dashboard name)
    # times its fold workers resumed from a checkpoint (a lost worker or node, --resume), and the evaluation
    # points they trained again because those came after the checkpoint
    restarts: int = 0
    points_redone: int = 0
    # when the search started the trial (time.time() on the driver, as the tracker first saw it): the report's
    # cost counts the fold workers' start-up from it. None once the trial was interrupted (a resumed trial's time
    # is its fold workers' training time, from its curve)
    started_s: float | None = None
    # the train.seed each of its search.seeds_per_trial seeds trained with (seed 0 is the trial's train.seed;
    # config.seed_for); the trial's predictions are their mean
    seeds: list[int] = field(default_factory=list)


PID_MAX = 2**31 - 1  # the largest a pid_t holds: a larger pid in run.json names no process (os.kill overflows)


class Driver(TypedDict, total=False):
    """Who ran the search (collect.this_driver); a run.json written by hand may leave it out."""

    host: str
    pid: Annotated[int, Field(ge=1, le=PID_MAX)]


@dataclass
class RunState:
    """run.json: what a run is, how far it got, and every trial it started."""

    name: str
    num_points: int  # evaluation points of a full trial
    max_t: int  # ASHA's horizon, in evaluation points
    scheduler: str
    searched: list[str]
    command: str = ""  # how the run was started (for the --resume hint)
    state: str = "running"  # running | interrupted | finished
    driver: Driver = field(default_factory=dict)  # host and pid of the `raycv tune` process
    started_at: str = ""
    updated_at: str = ""
    trials: list[TrialRecord] = field(default_factory=list)

    def trial(self, trial_id: str) -> TrialRecord:
        """The record of `trial_id`, added (pending) if the run has none yet."""
        for record in self.trials:
            if record.trial_id == trial_id:
                return record
        self.trials.append(TrialRecord(trial_id=trial_id, train_run=storage.train_run_name(trial_id),
                                       started_s=time.time()))
        self.trials.sort(key=lambda record: record.trial_id)
        return self.trial(trial_id)

    def driver_is_gone(self) -> bool:
        """True where the run says it is running but its driver process on this host no longer exists."""
        if self.state != "running" or self.driver.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(self.driver["pid"]), 0)
        except (ProcessLookupError, KeyError, ValueError):
            return True
        except PermissionError:
            return False
        return False


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def this_driver() -> dict:
    """Who runs the search: this process, on this host."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def new_run_state(**settings) -> RunState:
    stamp = now()
    return RunState(**settings, driver=this_driver(), started_at=stamp, updated_at=stamp)


def load_run_state(run_dir: Path) -> RunState | None:
    """run.json, checked field by field (a file cut short or edited by hand is one line naming it)."""
    path = Path(run_dir) / "run.json"
    if not run_file_exists(path):
        return None
    try:
        state = TypeAdapter(RunState).validate_python(json.loads(path.read_bytes().decode()))
        if state.state not in RUN_STATES:
            raise ValueError(f"state {shown(state.state)} is none of {', '.join(RUN_STATES)}")
        for record in state.trials:
            if record.status not in STATUSES:
                raise ValueError(f"trial {record.trial_id}: status {shown(record.status)} is none of "
                                 f"{', '.join(STATUSES)}")
    # pydantic's ValidationError and JSON's errors are ValueErrors; JSON nested thousands deep, a RecursionError
    except (OSError, ValueError, RecursionError) as exc:
        reason = first_line(exc) if not isinstance(exc, ValidationError) else _first_error(exc)
        raise RaycvError(f"{path}: not a run state raycv wrote ({reason}); it may be cut short or edited") from None
    return state


def run_file_exists(path: Path) -> bool:
    """Whether the run's file `path` is there (False where nothing is). Something else in its place (a
    directory, a FIFO, a device, a socket) is one line naming it, as is a path the system cannot look up at
    all (a name longer than it allows, a folder on the way it may not enter): reading a FIFO waits for a
    writer for ever, and skipping it would report the run without the file. A loop of links or a NUL byte is
    no file (pathlib's own answer)."""
    try:
        kind = storage.what_is_at(path)
    except ValueError:  # a NUL in the name
        return False
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EBADF):  # what pathlib's is_file answers False to
            return False
        raise RaycvError(f"{path}: cannot look it up ({storage.path_refusal(exc)})") from None
    if kind in (None, "a file"):
        return kind is not None
    raise RaycvError(f"{path} is {kind}, not a file raycv wrote; remove it, or put back the run's file")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(map(str, err['loc'])) or 'the top'}: {err['msg']}" + (
        f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else "")


def save_run_state(run_dir: Path, state: RunState) -> None:
    state.updated_at = now()
    storage.write_text_atomic(Path(run_dir) / "run.json", json.dumps(asdict(state), indent=2))


class WrittenStatus(TypedDict):
    """results/<trial>/status.json: how the trial ended (worker.write_trial_status)."""

    status: str  # one of ENDED
    reason: str | None


COUNT = Annotated[int, Field(strict=True, ge=0, le=PID_MAX)]  # beyond it, the report's cost would overflow a float


class Restart(TypedDict):
    """One entry of results/<trial>/restarts.json: a resume from fold checkpoints (worker.record_restart)."""

    checkpoint_point: COUNT
    points_redone: COUNT


WRITTEN_STATUS, RESTARTS = TypeAdapter(WrittenStatus), TypeAdapter(list[Restart])


@dataclass
class TrialFiles:
    """What the storage holds of one trial now, read and checked (read_trial_files); None: no such file."""

    oof: str | None = None
    curve: str | None = None
    eval_points: int | None = None  # the curve's rows
    restarts: list[Restart] = field(default_factory=list)
    status: WrittenStatus | None = None


def read_trial_files(storage_path: str, run_dir: Path, trial_id: str) -> TrialFiles:
    """The trial's files in the storage, each checked before anything is written: one that is cut short or
    edited is one line naming it, and where a copy goes in the run directory something other than a file
    (a directory, a FIFO) is refused too."""
    files, found = storage.trial_files(trial_id), TrialFiles()
    for local in (storage.run_oof_path, storage.run_curve_path):
        run_file_exists(local(run_dir, trial_id))
    found.oof = _read_checked(storage_path, files["oof"], str)
    curve = _read_checked(storage_path, files["curve"], lambda text: (text, len(pd.read_csv(io.StringIO(text)))))
    if curve is not None:
        found.curve, found.eval_points = curve
    found.restarts = _read_checked(storage_path, files["restarts"], RESTARTS.validate_json) or []
    found.status = _read_checked(storage_path, files["status"], _written_status)
    return found


def _written_status(text: str) -> WrittenStatus:
    written = WRITTEN_STATUS.validate_json(text)
    if written["status"] not in ENDED:
        raise ValueError(f"status {shown(written['status'])} is none of {', '.join(ENDED)}")
    return written


def _read_checked(storage_path: str, relative: str, parse):
    """parse(text) of a trial's file in the storage, None where there is none; a file that cannot be read,
    decoded or parsed (JSON nested thousands deep: a RecursionError) is one line naming it."""
    try:
        text = storage.read_text(storage_path, relative)
        return None if text is None else parse(text)
    except ValidationError as exc:  # before ValueError, which it is
        reason = _first_error(exc)
    except (OSError, ValueError, RecursionError) as exc:
        reason = storage.path_refusal(exc)
    raise RaycvError(f"{storage.shown_path(storage_path, relative)}: not what raycv wrote ({reason}); it may be cut "
                     "short or edited: remove it, and the trial is collected without it")


def store_trial_files(run_dir: Path, record: TrialRecord, found: TrialFiles) -> None:
    """Copy what `read_trial_files` found into the run directory and settle the record from it."""
    for text, local in ((found.oof, storage.run_oof_path), (found.curve, storage.run_curve_path)):
        if text is not None:
            storage.write_text_atomic(local(run_dir, record.trial_id), text)
    if found.eval_points is not None:
        record.eval_points = found.eval_points
    record.restarts = len(found.restarts)
    record.points_redone = sum(restart["points_redone"] for restart in found.restarts)
    if found.status:
        record.status, record.reason = found.status["status"], found.status["reason"]


def collect_trial(storage_path: str, run_dir: Path, record: TrialRecord) -> None:
    """Copy the trial's OOF predictions and curve as the storage holds them now into the run directory;
    record how many evaluation points they cover and any status its trial driver or rank 0 wrote. A damaged
    file is one line naming it, and then nothing is copied."""
    store_trial_files(run_dir, record, read_trial_files(storage_path, run_dir, record.trial_id))


def settle(record: TrialRecord, max_t: int) -> None:
    """The status of a trial Tune saw end without an error: diverged or failed folds (collect_trial read
    that from the storage), else finished or stopped by the scheduler."""
    if record.status not in ("diverged", "error"):
        record.status = "finished" if record.eval_points >= max_t else "stopped"


def last_cv_rmse(run_dir: Path, trial_id: str) -> float | None:
    """A trial's pooled last-point RMSE at its final evaluation point, from its curve in the run directory."""
    path = storage.run_curve_path(run_dir, trial_id)
    if not run_file_exists(path):
        return None
    curve = pd.read_csv(path)
    return float(curve["cv_rmse_last"].iloc[-1]) if len(curve) else None


def kept_trials(state: RunState, run_dir: Path, keep: int) -> set[str]:
    """The best `keep` finished trials, ranked on the last-point CV RMSE as the report ranks them: those
    whose fold models the run keeps for prediction."""
    finished = [(last_cv_rmse(run_dir, r.trial_id), r.trial_id) for r in state.trials if r.status == "finished"]
    return {trial_id for _, trial_id in sorted(pair for pair in finished if pair[0] is not None)[:keep]}


def refresh_unfinished(run_dir: Path) -> RunState | None:
    """For `raycv report` on a run that has not finished: copy each unfinished trial's latest files from the
    storage where it can be reached; a run whose driver on this host is gone is interrupted, and so are its
    unfinished trials (saved to run.json, as the driver would have on Ctrl-C)."""
    state = load_run_state(run_dir)
    if state is None or state.state == "finished":
        return state
    storage_path = _storage_path(Path(run_dir) / "resolved_config.yaml")
    reachable = bool(storage_path) and _reachable(storage_path)
    if state.driver_is_gone():
        mark_interrupted(state, storage_path if reachable else None, Path(run_dir))
        save_run_state(run_dir, state)
    elif reachable:
        unfinished = [record for record in state.trials if record.status not in ENDED]
        found = [read_trial_files(storage_path, Path(run_dir), record.trial_id) for record in unfinished]
        for record, files in zip(unfinished, found, strict=True):  # every trial checked before any is copied
            store_trial_files(Path(run_dir), record, files)
    return state


def _storage_path(config_path: Path) -> str | None:
    """run.storage_path of the run's resolved config; None where it cannot be read (the report says why)."""
    try:
        value = yaml.safe_load(config_path.read_bytes())["run"]["storage_path"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None
    return value if isinstance(value, str) and value else None


def mark_interrupted(state: RunState, storage_path: str | None, run_dir: Path) -> list[TrialRecord]:
    """The run's driver stopped: collect what the storage holds of each trial that had not ended (unless
    `storage_path` is None), mark those trials and the run interrupted; returns them. A trial that did end
    meanwhile (its status is in the storage) keeps that status."""
    cut_short = [record for record in state.trials if record.status not in ENDED]
    # every trial's files checked before any is copied: a damaged one leaves the run directory as it was
    found = [read_trial_files(storage_path, run_dir, record.trial_id) for record in cut_short] if storage_path else []
    for record, files in zip(cut_short, found or [None] * len(cut_short), strict=True):
        if files is not None:
            store_trial_files(run_dir, record, files)
        if record.status not in ENDED:
            record.status = "interrupted"
            record.started_s = None  # its next session starts on --resume; the time between counts for nothing
    state.state = "interrupted"
    return cut_short


def _reachable(storage_path: str) -> bool:
    return "://" in storage_path or Path(storage_path).is_dir()


# ---------------------------------------------------------------- one readable line per failure

MEMORY_KILL = re.compile(r"memory used=([\d.]+)\s*GB.*?was running was ([\d.]+)\s*GB\s*/\s*([\d.]+)\s*GB", re.S)


def describe_failure(error: BaseException | str, num_folds: int | None = None) -> str:
    """One line for a failed trial: which fold, what happened, and for a memory kill, how much the worker
    held and what to change. `error` is Ray Train's WorkerGroupError (failures by world rank) or any
    exception or message. Rank = fold, unless `num_folds` is given for a trial of several seeds per fold:
    then rank r is fold r % num_folds under seed r // num_folds (config.fold_and_seed)."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        return "; ".join(f"{_worker(rank, num_folds)}: {_describe_one(exc)}" for rank, exc in sorted(failures.items()))
    return _describe_one(error)


def _worker(rank: int, num_folds: int | None) -> str:
    if num_folds is None:
        return f"fold {rank}"
    fold, seed_index = fold_and_seed(rank, num_folds)
    return f"fold {fold} seed {seed_index}"


def _describe_one(error: BaseException | str) -> str:
    text = str(error)
    if "running low on memory" in text or "OutOfMemoryError" in text or "OutOfMemoryError" in type(error).__name__:
        match = MEMORY_KILL.search(text)
        held = (f": the worker held {float(match.group(1)):.1f} GB while the node used {float(match.group(2)):.1f} "
                f"of {float(match.group(3)):.1f} GB") if match else ""
        return (f"killed by Ray's memory monitor{held}; lower train.batch_size or model.max_length, or give each "
                "fold more memory (fewer folds per node: raise resources.cpus_per_fold)")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    name = type(error).__name__ if isinstance(error, BaseException) else ""
    if name and not last.startswith(name):
        last = f"{name}: {last}" if last else name
    return last[:300]
