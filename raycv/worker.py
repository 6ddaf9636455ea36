"""Ray Train worker: world rank r fine-tunes one fold under one seed with `train_fold`; the workers pool.

One `TorchTrainer` per trial runs `train_fn_per_worker` on `num_folds x search.seeds_per_trial` workers:
rank r trains fold r % num_folds under the trial's seed r // num_folds (`config.fold_and_seed`; with one seed
per trial, rank = fold). The workers share no gradients (the model is not wrapped in DDP); they only meet at
evaluation points, where `all_gather_object` over the gloo process group Ray Train set up (on CPUs and GPUs
alike) hands every worker's validation predictions to rank 0, which averages each row over the seeds and
reports the pooled out-of-fold RMSE of that seed-mean -- the number ASHA ranks on, since only rank 0's
metrics reach Tune. Every worker reports at every point: reports are a barrier.

At each evaluation point (`on_eval`): gather -> score -> write the trial's files -> print -> report.
If any worker has diverged (a non-finite loss or prediction), every worker stops at that point, and rank 0
records why in the trial's status file instead of scoring predictions that are not numbers.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raycv import progress, storage
from raycv.config import Config, fold_and_seed
from raycv.data import EncodedFolds
from raycv.metrics import FoldMetrics
from raycv.scoring import oof_table, score_seeds, score_trial, seed_mean_table
from raycv.train_fold import EvalPoint, FoldData, split_fold, train_fold

log = logging.getLogger(__name__)


def train_fn_per_worker(loop_config: dict) -> None:
    """Runs on each Ray Train worker. loop_config: config (dict), encoded (EncodedFolds), trial_id,
    num_points, checkpoint_every."""
    quiet_train_report_logs()
    mark_training_thread()
    remove_orphaned_checkpoint_dirs()
    config = Config.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    num_folds, seeds = config.data.num_folds, config.trial_seeds
    assert world_size == num_folds * len(seeds), (world_size, num_folds, seeds)
    fold, seed_index = fold_and_seed(rank, num_folds)
    # train_fold takes its seed from the config: this worker's seed of the trial (seed 0 is train.seed itself)
    fold_config = config.with_overrides({"train.seed": seeds[seed_index]}) if seed_index else config
    seed = seed_index if len(seeds) > 1 else None  # named in lines and file names only with several seeds
    state_name = storage.fold_state_name(fold, seed_index, len(seeds))
    encoded: EncodedFolds = loop_config["encoded"]
    data = split_fold(encoded, fold)
    trial_id, checkpoint_every = loop_config["trial_id"], loop_config["checkpoint_every"]
    # The GPU Ray gave this worker (a whole one, or a share of one with resources.gpus_per_fold < 1).
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    fold_metrics = FoldMetrics(config.run.name, trial_id, fold, seed)
    # Ray Train creates its RayTrainWorker actors without a name or a __repr__, so the dashboard's Actors page
    # cannot say which trial and fold an actor is: its log (Actors -> the actor -> Log) says so, first thing.
    say(progress.worker_line(trial_id, fold, num_folds, os.getpid(), rank, world_size, seed))
    state = restore_fold_state(state_name)
    curve = restore_curve(config.run.storage_path, trial_id, state) if rank == 0 else []

    def on_eval(point: EvalPoint, snapshot) -> bool:
        parts = gather_folds(point, data, world_size, seed_index)
        fold_metrics.record_fold(point.val_rmse, point.samples_per_s, point.index, device, point.rss_mb)
        say(progress.fold_line(point, trial_id, seed))  # every worker's own line, in its own log
        metrics = {"eval_point": point.index, "train_loss": point.train_loss, "step": point.step,
                   "epoch": point.epoch,
                   # the largest fold worker's memory now and at its peak: how memory moves over a run
                   "max_fold_rss_mb": max(part["rss_mb"] for part in parts),
                   "max_fold_peak_rss_mb": max(part["peak_rss_mb"] for part in parts),
                   # rank 0's training + evaluation time so far, without its time in on_eval, and the
                   # wall clock: what `raycv bench` splits a trial's wall time with
                   "fold_busy_s": point.elapsed_s - point.callbacks_s, "fold_callbacks_s": point.callbacks_s,
                   "reported_at": time.time()}
        diverged = [(f"seed {part['seed_index']}: " if len(seeds) > 1 else "") + part["diverged"]
                    for part in parts if part["diverged"]]
        if diverged:  # every worker stops here; nothing to score or to checkpoint
            if rank == 0:
                reason = "; ".join(diverged)
                write_trial_status(config.run.storage_path, trial_id, "diverged", reason)
                say(progress.diverged_line(trial_id, point, reason))
            report({"cv_rmse": float("nan"), "diverged": 1.0, **metrics}, point.index, None, state_name, trial_id)
            return True
        if rank == 0:
            oof = seed_mean_table([oof_table([part for part in parts if part["seed_index"] == k])
                                   for k in range(len(seeds))])
            scores = {**score_trial(oof), **(score_seeds(oof) if len(seeds) > 1 else {})}
            metrics = {**tune_metrics(scores), **metrics}
            fold_metrics.record_pooled(scores["cv_rmse_last"], scores["cv_rmse_best"])
            curve.append({key: value for key, value in metrics.items() if key != "cv_rmse"})
            write_trial_files(config.run.storage_path, trial_id, oof, curve)
            say(progress.trial_line(trial_id, point, scores))
        keep = point.index == point.num_points or point.index % checkpoint_every == 0
        report(metrics, point.index, snapshot if keep else None, state_name, trial_id)
        return False

    train_fold(fold_config, data, device=device, num_points=loop_config["num_points"], on_eval=on_eval, state=state)


def say(line: str) -> None:
    """One progress line on this worker's stdout: its log file, which the dashboard shows under Actors -> Log,
    and (through Ray's log monitor) the driver's console. sys.stdout, not print: Ray Train patches print
    into its logger, which shows each line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------- the steps of an evaluation point


def gather_folds(point: EvalPoint, data: FoldData, world_size: int, seed_index: int) -> list[dict]:
    """Every worker's validation predictions at this point (one per fold and seed), on every rank (a
    collective: all workers call it)."""
    rows = {"id": data.valid_ids, "fold": data.fold, "target": data.valid_targets.tolist(),
            "pred_best": point.best_preds.tolist(), "pred_last": point.preds.tolist()}
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, {"fold": data.fold, "seed_index": seed_index, "rows": rows,
                                      "diverged": point.diverged, "rss_mb": point.rss_mb,
                                      "peak_rss_mb": point.peak_rss_mb})
    return gathered


def tune_metrics(scores: dict) -> dict:
    """What rank 0 reports to Tune. `cv_rmse` is Tune's ranking metric: the last-point pooled RMSE (of the
    seed-mean, with several seeds), first so that Tune's live table shows it. With several seeds, each
    seed's own pooled RMSE too (seed_K_cv_rmse_last, seed_K_cv_rmse_best)."""
    metrics = {"cv_rmse": scores["cv_rmse_last"], "cv_rmse_last": scores["cv_rmse_last"],
               "cv_rmse_best": scores["cv_rmse_best"]}
    for which in ("last", "best"):
        metrics.update({f"fold_{k}_rmse_{which}": value for k, value in enumerate(scores[f"fold_rmse_{which}"])})
    for which in ("last", "best"):
        metrics.update({f"seed_{k}_cv_rmse_{which}": value
                        for k, value in enumerate(scores.get(f"seed_rmse_{which}", []))})
    return metrics


def write_trial_files(storage_path: str, trial_id: str, oof: pd.DataFrame, curve: list[dict]) -> None:
    """The trial's pooled predictions and curve so far, rewritten at every point: what the collector reads."""
    files = storage.trial_files(trial_id)
    storage.write_text(storage_path, files["oof"], oof.to_csv(index=False))
    storage.write_text(storage_path, files["curve"], pd.DataFrame(curve).to_csv(index=False))


def write_trial_status(storage_path: str, trial_id: str, status: str, reason: str | None) -> None:
    """How a trial ended (and why, for diverged or error: one line, no traceback), for the collector and
    for a resumed run, which does not run an ended trial again."""
    text = json.dumps({"status": status, "reason": reason})
    storage.write_text(storage_path, storage.trial_files(trial_id)["status"], text)


def report(metrics: dict, eval_point: int, snapshot, state_name: str, trial_id: str) -> None:
    """`ray.train.report`, with this worker's checkpoint (`state_name`: its fold and seed) when `snapshot` is
    given (every worker, same point).

    The fold's state is saved here, before training goes on; Ray Train copies it into the run's storage in a
    background thread (`CheckpointUploadMode.ASYNC`) and deletes the local copy, so the fold trains on while
    its checkpoint is written (a BERT-large fold with its optimiser is about 4 GB). The metrics reach Tune
    once the copy is done, in order; a failed copy fails the fold, and the trial ends only after its last
    checkpoint is stored."""
    if snapshot is None:
        ray.train.report(metrics)
        return
    directory = checkpoint_dir(trial_id, state_name)
    torch.save(snapshot(), Path(directory) / state_name)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                     checkpoint_dir_name=storage.checkpoint_dir_name(eval_point),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


# ---------------------------------------------------------------- this process's local checkpoint copies

# A fold's state goes to a local directory, which Ray Train deletes once it has copied it into the run's storage
# (in the background). A worker stopped before the copy is done (ASHA stopping its trial, the end of a search,
# Ctrl-C, a lost node) would leave it behind in the node's temp directory: a few GB for a large model, each
# time. The directories are named by trial and by the pid of the worker that made them, so they can be found
# and removed: by the worker as it leaves, by the run's driver once the search ends (on its node), or by a
# later fold worker on the node once they are old.
CHECKPOINT_DIR_PREFIX = "raycv-ckpt-"
CHECKPOINT_DIR_NAME = re.compile(rf"{re.escape(CHECKPOINT_DIR_PREFIX)}(?P<trial>.+)-p(?P<pid>\d+)-")
_made_here: set[str] = set()  # this process's checkpoint directories not yet known to be deleted


def checkpoint_dir(trial_id: str, state_name: str) -> str:
    """A fresh local directory for this worker's fold state at one point, named by trial, pid and fold (and
    seed)."""
    _made_here.difference_update({d for d in _made_here if not os.path.exists(d)})  # copied and deleted
    tag = state_name.removesuffix(".pt").replace("_", "")
    directory = tempfile.mkdtemp(prefix=f"{CHECKPOINT_DIR_PREFIX}{trial_id}-p{os.getpid()}-{tag}-")
    _made_here.add(directory)
    return directory


def remove_checkpoint_dirs_made_here() -> None:
    for directory in list(_made_here):
        shutil.rmtree(directory, ignore_errors=True)
    _made_here.clear()


def _checkpoint_dirs_here():
    """(entry, name match) of every raycv checkpoint directory in this node's temp directory."""
    with os.scandir(tempfile.gettempdir()) as entries:
        for entry in entries:
            match = CHECKPOINT_DIR_NAME.match(entry.name)
            if match and entry.is_dir(follow_symlinks=False):
                yield entry, match


def remove_orphaned_checkpoint_dirs(min_age_s: float = 3600.0) -> None:
    """Checkpoint directories in this node's temp directory whose worker is gone (SIGKILLed: out of memory, a
    lost node) and which are at least `min_age_s` old (a pid seen from another PID namespace sharing the temp
    directory would look gone: the age keeps its live uploads)."""
    for entry, match in _checkpoint_dirs_here():
        if _pid_alive(int(match["pid"])):
            continue
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime >= min_age_s:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


def remove_checkpoint_dirs_of(trial_ids: set[str]) -> int:
    """This node's checkpoint directories of these trials, whichever worker made them: what the run's driver
    calls once its search has ended (every trial of it ended or interrupted: none is still uploading, and a
    worker that Ray ended at once, without Python's exit, could not remove its own). Returns how many."""
    removed = 0
    for entry, match in _checkpoint_dirs_here():
        if match["trial"] in trial_ids:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


_training_thread: threading.Thread | None = None  # the Ray Train thread running train_fn_per_worker here


def mark_training_thread() -> None:
    """Marks the calling thread as this process's training thread, for `_leave_at_exit`."""
    global _training_thread
    _training_thread = threading.current_thread()


@atexit.register
def _leave_at_exit() -> None:
    """When Ray stops a fold worker while it trains (ASHA stopping its trial, Ctrl-C, the end of a search), it
    sends SIGTERM: Ray shuts the worker down and Python then tears itself down under Ray Train's training
    thread, still mid-step, which aborts with a native stack dump of a hundred lines on the driver's console.
    The trial has nothing left to save (a checkpoint whose copy did not finish is not the trial's). By the
    time Python runs its atexit handlers, Ray's SIGTERM handling has already shut the worker's Ray core down
    and told the raylet; so this worker removes its unfinished checkpoint copies and leaves at once, with
    Ray's exit status for a SIGTERM. A worker whose training ended, and every other process, exits as before."""
    remove_checkpoint_dirs_made_here()
    if _training_thread is not None and _training_thread.is_alive():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


# ---------------------------------------------------------------- resuming a restarted worker group


def restore_fold_state(state_name: str) -> dict | None:
    """This worker's state (its file `state_name`, named by fold and seed) from the trial's latest checkpoint,
    if Ray Train restarted the worker group."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state_path = Path(directory) / state_name
        if not state_path.exists():
            return None
        # weights_only: the storage may be a shared bucket; a fold state is tensors and plain types.
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    log.info("%s resumes at step %d", state_name, state["step"])
    return state


def restore_curve(storage_path: str, trial_id: str, state: dict | None) -> list[dict]:
    """The pooled curve rank 0 had written up to the checkpoint it resumes from; the restart (from which
    point, how many points it reached before and so trains again) is added to the trial's restarts file."""
    text = storage.read_text(storage_path, storage.trial_files(trial_id)["curve"]) if state else None
    if not text:
        return []
    previous = pd.read_csv(io.StringIO(text))
    resumed_at = len(state["curve"])
    record_restart(storage_path, trial_id, resumed_at, int((previous["eval_point"] > resumed_at).sum()))
    return previous[previous["eval_point"] <= resumed_at].to_dict("records")


def record_restart(storage_path: str, trial_id: str, checkpoint_point: int, points_redone: int) -> None:
    """Append one restart to the trial's restarts file (rank 0 only): what the report shows of it."""
    path = storage.trial_files(trial_id)["restarts"]
    restarts = json.loads(storage.read_text(storage_path, path) or "[]")
    restarts.append({"checkpoint_point": checkpoint_point, "points_redone": points_redone})
    storage.write_text(storage_path, path, json.dumps(restarts))


# ---------------------------------------------------------------- Ray internals raycv depends on


def quiet_train_report_logs() -> None:
    """Ray Train 2.60 logs every report at INFO ("Reporting training result ...") under a logger named after
    its source file, which `LoggingConfig(log_level)` does not reach. No public API names that logger, so
    this reaches for the private module; checked against ray 2.60.0 (tests/test_structure.py pins it)."""
    from ray.train.v2._internal.execution import context as train_execution_context

    logging.getLogger(train_execution_context.__file__).setLevel(logging.WARNING)
