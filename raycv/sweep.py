"""The search: Ray Tune trials (one hyperparameter set each) scheduled by ASHA on the pooled CV RMSE.

    raycv tune search_spaces/base.yaml [--address auto] [--resume]

Ray 2.60's Train-inside-Tune pattern: `train_driver_fn` is the Tune trial; it runs a `TorchTrainer`
with one worker per fold and seed (`worker.train_fn_per_worker`) and forwards rank 0's reports to Tune through
`TuneReportCallback`. `TrialTracker`, a Tune callback, keeps run.json, each trial's files in the run
directory and the report up to date as trials start and end, so a crash strands nothing; `--resume`
continues an interrupted run with Tune's experiment restore. Named `sweep` so it is not confused with
`ray.tune`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.exceptions import TrainingFailedError
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import FIFOScheduler

from raycv import RaycvError, driver_guard, first_line, storage
from raycv.cluster import ClusterWatch, describe_workers, plan_resources, start_ray, trial_driver_resources
from raycv.collect import (
    ENDED,
    STATUSES,
    RunState,
    collect_trial,
    describe_failure,
    kept_trials,
    load_run_state,
    mark_interrupted,
    new_run_state,
    save_run_state,
    settle,
    this_driver,
)
from raycv.config import Config, dump_yaml
from raycv.data import EncodedFolds
from raycv.predict import drop_fold_models, export_fold_models, models_dir
from raycv.preflight import Plan
from raycv.report import write_report
from raycv.scheduler import ResumableASHA
from raycv.scoring import compute_baselines
from raycv.tracking import attach_report, search_algorithm, tracking_callbacks
from raycv.worker import remove_checkpoint_dirs_of, train_fn_per_worker, write_trial_status

log = logging.getLogger(__name__)
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's 128 + signal number
STORAGE_OUTAGES_PER_TRIAL = 3  # times a trial's Train run resumes after the storage stopped answering
# Ray Train waits this long for a worker group's resources per attempt (its default), and retries a timed-out
# start as a controller failure: run.resource_wait_s is spent in attempts of at most this length.
WORKER_GROUP_START_TIMEOUT_S = 60.0
# While a search runs, the report (report.md, report.json, plots) is refreshed at most this often, in the
# background; `raycv report RUN_DIR` rebuilds it any time, and the search's end writes the final one.
REPORT_REFRESH_S = 30.0


def train_driver_fn(params: dict, base_config: dict, encoded: EncodedFolds, num_points: int) -> None:
    """One Tune trial: this hyperparameter set's `num_folds x search.seeds_per_trial` fold workers in one
    TorchTrainer.

    A trial whose Train run resumes (Tune retried a lost driver, or `--resume`) continues from the fold
    checkpoints Ray Train keeps under the same run name. A fold failure that outlasts Train's own retries
    is written as the trial's status in one line, and the trial ends without raising: Tune's retries are
    for a lost driver, not for re-running the same exception. A failure of the storage itself (a bucket's
    endpoint that stopped answering) is waited out, and the Train run resumes."""
    config = Config.model_validate(base_config).with_overrides(params)
    trial_id = tune.get_context().get_trial_id()
    written = storage.read_text(config.run.storage_path, storage.trial_files(trial_id)["status"])
    ended = json.loads(written)["status"] if written else None
    if ended in ENDED:
        # Tune's experiment state (saved every 10 s or so) can lag behind a trial that ended just before the
        # driver died; on --resume such a trial is not run again.
        print(f"trial {trial_id} | already {ended}; not run again", flush=True)
        return
    # The Train run's state (its name and workers by rank = fold) for the dashboard's state API.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    gpus = float(config.resources.gpus_per_fold)
    per_fold = {"CPU": config.resources.cpus_per_fold, **({"GPU": gpus} if gpus > 0 else {}),
                **config.resources.custom_per_fold}
    # Bounded waiting for resources: Train passes this variable on to its controller, and retries a start
    # that timed out as a controller failure, at most controller_failure_limit times.
    start_timeout = min(WORKER_GROUP_START_TIMEOUT_S, config.run.resource_wait_s)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(start_timeout)
    start_retries = max(math.ceil(config.run.resource_wait_s / start_timeout) - 1, 0)

    def make_trainer() -> TorchTrainer:  # one per attempt: a storage outage starts another
        return TorchTrainer(
            train_fn_per_worker,
            # gloo, also on GPUs: folds share no gradients, only their predictions at evaluation points, and
            # gloo (unlike NCCL) lets several folds share one GPU (resources.gpus_per_fold below 1).
            torch_config=TorchConfig(backend="gloo"),
            train_loop_config={
                "config": config.to_dict(), "encoded": encoded, "trial_id": trial_id,
                "num_points": num_points, "checkpoint_every": config.run.checkpoint_every,
            },
            scaling_config=ScalingConfig(num_workers=config.workers_per_trial, use_gpu=gpus > 0,
                                         resources_per_worker=per_fold),
            run_config=RunConfig(
                name=storage.train_run_name(trial_id),
                storage_path=config.run.storage_path,
                callbacks=[TuneReportCallback()],
                failure_config=FailureConfig(max_failures=config.run.max_failures,
                                             controller_failure_limit=start_retries),
                checkpoint_config=CheckpointConfig(num_to_keep=config.run.checkpoints_to_keep),
                # Ray Train logs every report and checkpoint at INFO; raycv's own progress line says what matters.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )

    for attempt in range(1 + STORAGE_OUTAGES_PER_TRIAL):
        try:
            make_trainer().fit()
            return
        except TrainingFailedError as exc:
            reason = describe_failure(exc, seeded_folds(config))
            if type(getattr(exc, "controller_failure", None)).__name__ == "WorkerGroupStartupTimeoutError":
                wanted = ", ".join(f"{amount:g} {name}" for name, amount in per_fold.items())
                reason = (f"waited {config.run.resource_wait_s:g} s (run.resource_wait_s) for "
                          f"{describe_workers(config)} of {wanted} each, which the cluster never had free; free or "
                          "add them, lower resources.*_per_fold, or raise run.resource_wait_s")
            if attempt < STORAGE_OUTAGES_PER_TRIAL and storage.mentions_outage(str(exc)):
                # The folds failed because the storage stopped answering (a checkpoint upload, most likely), not
                # because of the trial: once it answers again the same Train run resumes from its last checkpoint.
                print(f"trial {trial_id} | the storage did not answer ({reason}); resuming from the last fold "
                      f"checkpoint once it does", flush=True)
                storage.wait_until_writable(config.run.storage_path)  # StorageError after storage.RETRY_FOR_S
                continue
            write_trial_status(config.run.storage_path, trial_id, "error", reason)
            print(f"trial {trial_id} | failed: {reason}", flush=True)
            return


def seeded_folds(config: Config) -> int | None:
    """num_folds where a trial trains several seeds (its world ranks are not its folds), else None."""
    return config.data.num_folds if config.search.seeds_per_trial > 1 else None


def to_param_space(config: Config) -> dict[str, Any]:
    """The `search` section as Ray Tune samplers, keyed by dotted config key."""
    samplers = {"choice": tune.choice, "grid": tune.grid_search}
    space = {}
    for key, dim in config.search.params.items():
        value = getattr(dim, dim.kind)
        if dim.kind in samplers:
            space[key] = samplers[dim.kind](list(value))
        else:
            space[key] = getattr(tune, dim.kind)(*value)
    return space


# ---------------------------------------------------------------- keeping the run directory current


class TrialTracker(tune.Callback):
    """Records each trial's status in run.json as it changes; when a trial ends, collects its files. Dropping
    the fold checkpoints no one will predict with and refreshing the report happen in a background thread
    (`ReportRefresher`), off Tune's event loop, which starts the next trial meanwhile. (Tune keeps the
    tracker with the experiment, so a restored run tracks on.)"""

    def __init__(self, config: Config, max_t: int):
        self.config, self.max_t = config.to_dict(), max_t
        self.run_dir, self.storage_path = Path(config.run.output_dir), config.run.storage_path

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial, "running")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._update(trial, "running")  # Tune retries a lost driver; Train resumes its folds

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._update(trial, ended=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, ended=True, error=trial.get_error())

    def _update(self, trial, status: str | None = None, ended: bool = False, error=None) -> None:
        state = load_run_state(self.run_dir)
        record = state.trial(trial.trial_id)
        record.params = dict(trial.config or {})
        config = Config.model_validate(self.config).with_overrides(record.params)
        record.seeds = config.trial_seeds
        if status:
            record.status = status
        if ended:
            collect_trial(self.storage_path, self.run_dir, record)
            if error is None:
                settle(record, self.max_t)
            elif storage.mentions_outage(str(error)):  # the storage's fault, not the trial's: --resume reruns it
                record.status = "interrupted"
            elif record.status not in ("diverged", "error"):
                record.status, record.reason = "error", describe_failure(error, seeded_folds(config))
            if record.status in ENDED:
                write_trial_status(self.storage_path, record.trial_id, record.status, record.reason)
        save_run_state(self.run_dir, state)
        if ended:
            ReportRefresher.of(self.run_dir, Config.model_validate(self.config)).request()


class ReportRefresher:
    """Refreshes the report and the kept fold models after trials end, in one background thread of the
    driver: at most one refresh every REPORT_REFRESH_S, each covering every trial that ended before it began
    (requests made meanwhile merge into the next). A refresh draws plots and may export fold models: seconds
    of CPU that would otherwise hold up Tune's event loop, and with it the next trial's start. One per run
    directory in this process (the tracker itself is pickled with Tune's experiment state, a thread is not);
    `finish` closes it before it writes the final report, so two refreshes never overlap."""

    running: dict[Path, ReportRefresher] = {}

    @classmethod
    def of(cls, run_dir: Path, config: Config) -> ReportRefresher:
        if run_dir not in cls.running:
            cls.running[run_dir] = cls(run_dir, config)
        return cls.running[run_dir]

    @classmethod
    def close_for(cls, run_dir: Path) -> None:
        """Wait for a refresh under way, and stop."""
        refresher = cls.running.pop(run_dir, None)
        if refresher is not None:
            refresher.close()

    def __init__(self, run_dir: Path, config: Config, min_interval_s: float | None = None):
        self.run_dir, self.config = run_dir, config
        self.min_interval_s = REPORT_REFRESH_S if min_interval_s is None else min_interval_s
        self.wanted, self.closing = threading.Event(), threading.Event()
        self.last_start = -math.inf
        self.thread = threading.Thread(target=self._loop, name="raycv-report-refresh", daemon=True)
        self.thread.start()

    def request(self) -> None:
        self.wanted.set()

    def close(self) -> None:
        self.closing.set()
        self.wanted.set()
        self.thread.join()

    def _loop(self) -> None:
        while True:
            self.wanted.wait()
            self.closing.wait(max(0.0, self.last_start + self.min_interval_s - time.monotonic()))
            if self.closing.is_set():
                return
            self.wanted.clear()
            self.last_start = time.monotonic()
            try:
                keep_fold_models(load_run_state(self.run_dir), self.config)
                write_report(self.run_dir)
            except Exception:  # a report that cannot be drawn yet must not stop the search
                log.warning("could not refresh the report of %s", self.run_dir, exc_info=True)


def keep_fold_models(state: RunState, config: Config) -> None:
    """Export the fold models of the best run.keep_fold_models finished trials (safetensors, for `raycv
    predict`), drop the exports of trials pushed out of that set, and delete the fold checkpoints (model and
    optimiser) of every trial that has ended: only unfinished trials need them, to resume."""
    run_dir, storage_path = Path(config.run.output_dir), config.run.storage_path
    kept = kept_trials(state, run_dir, config.run.keep_fold_models)
    for record in state.trials:
        if record.trial_id in kept and not models_dir(run_dir, record.trial_id).is_dir():
            try:
                export_fold_models(storage_path, run_dir, record.trial_id, config.with_overrides(record.params))
            except (OSError, RaycvError):
                log.warning("could not export the fold models of trial %s", record.trial_id, exc_info=True)
    drop_fold_models(run_dir, kept)
    for record in state.trials:  # a kept trial whose export failed keeps its checkpoints for another try
        if record.status in ENDED and (record.trial_id not in kept or models_dir(run_dir, record.trial_id).is_dir()):
            storage.delete_fold_checkpoints(storage_path, record.trial_id)


# ---------------------------------------------------------------- the search


def run_sweep(config: Config, plan: Plan, address: str | None = None, resume: bool = False,
              command: str = "") -> int:
    """The whole search, from a validated config and its preflight plan (data encoded, points counted)."""
    output_dir = Path(config.run.output_dir)
    resume_command = f"{command} --resume" if command else "raycv tune SPACE --resume"
    previous = check_run_directory(config, output_dir, resume, resume_command)
    started = start_ray(address)
    watch = watch_cluster(config, address, resume_command)
    try:
        gpus, concurrent = plan_resources(config, ray.cluster_resources(), joined=not started)
        config.resources.gpus_per_fold = gpus
        if previous is None:
            write_run_files(config, plan, output_dir)
            state = new_run_state(name=config.run.name, num_points=plan.num_points, max_t=plan.max_t,
                                  scheduler=config.scheduler.type, searched=list(config.search.params),
                                  command=command)
        else:
            state = previous
            state.state, state.driver = "running", this_driver()
        save_run_state(output_dir, state)
        driver_guard.start(output_dir, config.run.storage_path or "", resume_command)  # if Ray's core ends us
        table = plan.encoded.table
        print(f"raycv tune {config.run.name}{' (resumed)' if previous else ''}: {len(table)} rows, "
              f"{config.data.num_folds} folds ({'/'.join(map(str, plan.valid_sizes))} validation rows), "
              f"{plan.num_points} evaluation points per trial, batch {config.train.batch_size}, "
              f"{gpus:g} GPU + {config.resources.cpus_per_fold:g} CPU per fold"
              + (f" x {config.search.seeds_per_trial} seeds: {config.workers_per_trial} fold workers per trial"
                 if config.search.seeds_per_trial > 1 else "") + ", "
              f"{f'up to {concurrent}' if concurrent else 'as many as the autoscaler can place'} trial(s) at a "
              f"time; output {output_dir}", flush=True)
        with forward_sigterm() as received:
            try:
                fit(config, plan, concurrent, resume=previous is not None)
            except Exception as exc:
                stop_on_storage_failure(exc, output_dir, resume_command)
                raise
            finally:
                ReportRefresher.close_for(output_dir)  # before anything else writes the report
                remove_local_checkpoint_copies(output_dir)
        # Off Ray before the summary (the report needs no Ray): fold workers' last lines, which Ray relays a
        # moment late, were printed after "report: ...", as if a trial were still training.
        leave_ray(watch)
        return finish(config, plan.max_t, received, resume_command)
    finally:
        leave_ray(watch)


def leave_ray(watch: ClusterWatch | None) -> None:
    """Stop watching the cluster, then disconnect (a local Ray raycv started stops with it; a cluster joined
    keeps running). Idempotent."""
    if watch:
        watch.stop()
    ray.shutdown()


def remove_local_checkpoint_copies(output_dir: Path) -> None:
    """The search has ended: its trials' local checkpoint copies left on this node (by fold workers Ray ended
    at once, before their upload finished) are garbage; the storage holds every checkpoint a resume uses."""
    state = load_run_state(output_dir)
    if state is not None:
        remove_checkpoint_dirs_of({trial.trial_id for trial in state.trials})


def watch_cluster(config: Config, address: str | None, resume_command: str) -> ClusterWatch | None:
    """A ClusterWatch on the cluster's GCS while the search runs (none through Ray Client, ray://, where the
    driver has no GCS of its own to watch): a head that goes away ends the run as interrupted, in one line."""
    from ray.util.client import ray as ray_client

    if ray_client.is_connected():  # the GCS address is the server side's, maybe not reachable from here
        return None
    try:
        gcs_address = ray.get_runtime_context().gcs_address
    except Exception:
        return None
    where, why = ((f"the Ray cluster at {address}", "the head node is down, or Ray was stopped there") if address else
                  (f"the local Ray (GCS {gcs_address})", "its processes were killed: out of memory?"))

    def on_lost(silent_for: float) -> None:
        try:
            driver_guard.interrupt_run(Path(config.run.output_dir), config.run.storage_path)
        finally:
            print(f"raycv: error: lost {where}: its GCS has not answered for {silent_for:.0f} s ({why}); the run "
                  f"is interrupted, and resumes from its checkpoints once a cluster is up: {resume_command}",
                  file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)  # Ray's core would end the process moments later, with a line of its own

    return ClusterWatch(gcs_address, on_lost).start()


def stop_on_storage_failure(exc: BaseException, output_dir: Path, resume_command: str) -> None:
    """The search stopped because the storage stayed out of reach (raycv's own retries gave up, raised
    through Tune): mark the run and its unfinished trials interrupted and say so in one line (StorageError).
    Anything else: return, for the caller to re-raise."""
    cause, seen = exc, set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, storage.StorageError):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, storage.StorageError):
        return
    state = load_run_state(output_dir)
    mark_interrupted(state, None, output_dir)  # the storage cannot be read now; --resume collects
    save_run_state(output_dir, state)
    raise storage.StorageError(f"{cause}; the run stopped and is resumable once the storage answers: "
                               f"{resume_command}") from None


def check_run_directory(config: Config, output_dir: Path, resume: bool, resume_command: str) -> RunState | None:
    """The run to continue (with --resume), or None for a new run into an empty directory."""
    state = load_run_state(output_dir)
    holds = output_dir.exists() and any(output_dir.iterdir())
    if not resume:
        if state is not None and state.state != "finished":
            ended = sum(t.status in ENDED for t in state.trials)
            raise RaycvError(f"{output_dir} holds an unfinished run ({ended} of the {len(state.trials)} trial(s) it "
                             f"started have ended); continue it with: {resume_command} (or start another with "
                             "run.name=NAME)")
        if holds:
            raise RaycvError(
                f"{output_dir} already holds a run; choose another with run.name=NAME (or run.output_dir=DIR), "
                f"or rebuild its report with: raycv report {output_dir}"
            )
        return None
    if state is None:
        raise RaycvError(f"--resume: {output_dir} holds no raycv run to continue; start one without --resume")
    if state.state == "finished":
        raise RaycvError(f"--resume: the run in {output_dir} has finished; its report: raycv report {output_dir}")
    if state.state == "running" and not state.driver_is_gone():
        raise RaycvError(f"--resume: the run in {output_dir} is still running (raycv tune, pid "
                         f"{state.driver.get('pid')} on {state.driver.get('host')}); stop it first")
    saved_path = output_dir / "resolved_config.yaml"
    try:
        if (kind := storage.what_is_at(saved_path)) not in (None, "a file", "a directory"):
            raise ValueError(f"it is {kind}, not a file")  # a pipe: reading it waited for a writer for ever
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:  # missing, a directory, not UTF-8, not YAML
        saved = exc
    if not isinstance(saved, dict):  # what this run's config must equal is gone
        why = (f"cannot be read ({first_line(saved)})" if isinstance(saved, Exception)
               else "is empty" if saved is None else f"holds a {type(saved).__name__}, not a config")
        raise RaycvError(f"--resume: {saved_path} {why}, so the run cannot be continued as it was; start a new "
                         f"one with run.name=NAME (what it holds so far: raycv report {output_dir})")
    changed = [key for key in _differences(saved, config.to_dict()) if key.split(".")[0] not in ("run", "resources")]
    if changed:
        raise RaycvError(f"--resume: this config differs from the run's at {', '.join(changed)}; resume with the "
                         f"same space and overrides ({state.command or 'see resolved_config.yaml'})")
    return state


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [key for name in sorted(set(a) | set(b))
                for key in _differences(a.get(name), b.get(name), f"{prefix}{name}.")]
    return [] if a == b else [prefix.rstrip(".")]


def write_run_files(config: Config, plan: Plan, output_dir: Path) -> None:
    table = plan.encoded.table
    output_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(output_dir / "resolved_config.yaml", dump_yaml(config))
    storage.write_atomic(output_dir / "folds.csv", lambda tmp: table[["id", "fold", "target"]].to_csv(tmp, index=False))
    storage.write_text_atomic(output_dir / "baselines.json", json.dumps(compute_baselines(table), indent=2))


class forward_sigterm:
    """While Tune runs, SIGTERM (`ray job stop`, a scheduler, `kill`) ends the search the way Ctrl-C does:
    Tune saves its experiment state and stops the trials, which stay resumable. Records which signal came."""

    def __enter__(self) -> dict:
        self.received: dict = {}

        def handler(signum, frame):
            self.received["signal"] = signal.SIGTERM
            signal.raise_signal(signal.SIGINT)  # Tune's own handler takes it from here

        self.previous = signal.signal(signal.SIGTERM, handler)
        return self.received

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def fit(config: Config, plan: Plan, concurrent: int | None, resume: bool) -> None:
    trainable = tune.with_resources(
        tune.with_parameters(train_driver_fn, base_config=config.to_dict(), encoded=plan.encoded.for_workers(),
                             num_points=plan.num_points),
        trial_driver_resources(ray.cluster_resources()),
    )
    experiment_path = f"{config.run.storage_path.rstrip('/')}/tune"
    if resume:
        if not tune.Tuner.can_restore(experiment_path):
            raise RaycvError(f"--resume: Ray Tune saved no experiment state in {experiment_path} (the run stopped "
                             f"before its first trial started); remove {config.run.output_dir} and start again")
        tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                           param_space=to_param_space(config)).fit()
        return
    if config.scheduler.type == "asha":
        scheduler = ResumableASHA(
            config.run.storage_path, time_attr="eval_point", max_t=plan.max_t,
            grace_period=config.scheduler.grace_period,
            reduction_factor=config.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    tracker = TrialTracker(config, plan.max_t)
    tuner = tune.Tuner(
        trainable,
        param_space=to_param_space(config),
        tune_config=tune.TuneConfig(
            metric="cv_rmse", mode="min", num_samples=config.search.num_samples, scheduler=scheduler,
            search_alg=search_algorithm(config),  # None: Tune's random draws and grids
            max_concurrent_trials=concurrent,
            trial_name_creator=lambda trial: trial.trial_id, trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=config.run.storage_path, verbose=1,
            callbacks=[tracker, *tracking_callbacks(config)],
            stop={"eval_point": plan.max_t},
            # A lost trial driver (its node died) is retried; its Train run resumes from the fold checkpoints.
            failure_config=tune.FailureConfig(max_failures=config.run.max_failures),
        ),
    )
    tuner.fit()


def finish(config: Config, max_t: int, received: dict, resume_command: str) -> int:
    """Settle what Tune left unfinished, write the report, print the summary; the exit status."""
    output_dir = Path(config.run.output_dir)
    state = load_run_state(output_dir)
    # Trials Tune stopped on Ctrl-C / SIGTERM; their checkpoints stay for --resume.
    cut_short = mark_interrupted(state, config.run.storage_path, output_dir)
    state.state = "interrupted" if cut_short else "finished"  # Tune ran every trial it was going to
    save_run_state(output_dir, state)
    keep_fold_models(state, config)
    paths = write_report(output_dir)
    report = paths["report"]
    counts = {status: sum(t["status"] == status for t in report["trials"]) for status in STATUSES}
    print(f"trials: {len(report['trials'])} ("
          + ", ".join(f"{n} {'stopped by ASHA' if s == 'stopped' else s}" for s, n in counts.items() if n) + ")")
    for trial in report["trials"]:
        if trial["status"] in ("error", "diverged"):
            print(f"trial {trial['trial_id']} {trial['status']}: {trial['reason']}")
    if report["best_trial"]:
        row = next(t for t in report["trials"] if t["trial_id"] == report["best_trial"])
        print(f"best trial {row['trial_id']}: cv_rmse_last {row['cv_rmse_last']:.4f}, "
              f"cv_rmse_best {row['cv_rmse_best']:.4f}, params {row['params']}")
        if len(row["seed_rmse_last"]) > 1:
            print(f"best trial {row['trial_id']}'s {len(row['seeds'])} seeds ({', '.join(map(str, row['seeds']))}): "
                  "cv_rmse_last " + " / ".join(f"{v:.4f}" for v in row["seed_rmse_last"])
                  + f" each, spread (max - min) {row['seed_rmse_last_range']:.4f}; the scores above are their mean's")
    top_k = report["top_k_ensemble"]
    if top_k["trials"]:
        print(f"top-{len(top_k['trials'])} ensemble: cv_rmse_last {top_k['cv_rmse_last']:.4f}, "
              f"cv_rmse_best {top_k['cv_rmse_best']:.4f}")
    print(paths["summary"])  # the stacked ensemble's honest CV, and what the run cost and ASHA saved
    for entry in report["seed_ensembles"]:
        print(f"seed ensemble of {len(entry['trials'])} trials with {entry['params']}: "
              f"cv_rmse_last {entry['cv_rmse_last']:.4f}, cv_rmse_best {entry['cv_rmse_best']:.4f}")
    baselines = report["baselines"]
    print(f"baselines on the same folds: training mean {baselines['mean']['pooled_rmse']:.4f}, "
          f"TF-IDF + ridge {baselines['tfidf_ridge']['pooled_rmse']:.4f}")
    print(f"report: {paths['report_md']}")
    mlflow, best = config.run.mlflow, report["best_trial"]
    if mlflow.tracking_uri and best:
        try:
            run_id = attach_report(config, best, paths["files"])
            print(f"mlflow: report attached to run {run_id} (best trial {best}) of experiment {mlflow.experiment} "
                  f"at {mlflow.tracking_uri}")
        except Exception as exc:  # the search is done: a tracking server gone away must not fail it
            print(f"mlflow: could not attach the report to the run of trial {best}: {first_line(exc)}")
    if cut_short:
        print(f"interrupted: {len(cut_short)} trial(s) cut short, their fold checkpoints kept; "
              f"continue with: {resume_command}")
        return EXIT_INTERRUPTED[received.get("signal", signal.SIGINT)]
    return 0 if counts["finished"] + counts["stopped"] > 0 else 1
