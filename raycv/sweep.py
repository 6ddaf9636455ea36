"""The search: Ray Tune trials (one hyperparameter set each) scheduled by ASHA on the pooled CV RMSE.

    raycv tune search_spaces/base.yaml [--address auto]

Ray 2.60's Train-inside-Tune pattern: `train_driver_fn` is the Tune trial; it runs a `TorchTrainer`
with one worker per fold (`worker.train_fn_per_worker`) and forwards rank 0's reports to Tune through
`TuneReportCallback`. Named `sweep` so it is not confused with `ray.tune`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from raycv import RaycvError, storage
from raycv.collect import gather_trials, prune_fold_checkpoints
from raycv.config import Config, dump_yaml
from raycv.data import EncodedFolds, encode_folds
from raycv.model import load_tokenizer
from raycv.report import write_report
from raycv.scoring import compute_baselines
from raycv.train_fold import trial_eval_points

TRIAL_DRIVER_CPU = 0.25  # the Tune trial's own actor; the fold workers reserve their own resources


def train_driver_fn(params: dict, base_config: dict, encoded: EncodedFolds, num_points: int) -> None:
    """One Tune trial: this hyperparameter set's `num_folds` fold workers in one TorchTrainer."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from raycv.worker import train_fn_per_worker

    config = Config.model_validate(base_config).with_overrides(params)
    trial_id = tune.get_context().get_trial_id()
    # The dashboard's Train view lists this trial as the Train run "train_<trial id>", its workers by world
    # rank -- the fold index. Ray Train records that state only when asked to.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    gpus = float(config.resources.gpus_per_fold)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "config": config.to_dict(), "encoded": encoded, "trial_id": trial_id,
            "num_points": num_points, "checkpoint_every": config.run.checkpoint_every,
        },
        scaling_config=ScalingConfig(
            num_workers=config.data.num_folds,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": config.resources.cpus_per_fold, **({"GPU": gpus} if gpus > 0 else {})},
        ),
        run_config=RunConfig(
            name=storage.train_run_name(trial_id),
            storage_path=config.run.storage_path,
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.checkpoints_to_keep),
            # Ray Train logs every report and checkpoint at INFO; raycv's own progress line says what matters.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer.fit()


def start_ray(address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS); else start a local Ray. True if we started it.

    Token authentication stays on: Ray 2.60 enables it for a new local Ray and for address="auto" when a
    token exists; for an explicit address we do the same (RAY_AUTH_MODE=token when a token is available)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if address:
        _check_reachable(address)
        try:
            context = ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RaycvError(f"cannot join the Ray cluster at {address}: {str(exc).strip().splitlines()[-1]}") from None
        print(f"joined the Ray cluster at {address}; dashboard: {_url(context.dashboard_url)}", flush=True)
        return False
    context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1")
    print(f"started a local Ray for this run; dashboard: {_url(context.dashboard_url)} "
          f"(token authentication: the token is in ~/.ray/auth_token)", flush=True)
    return True


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens on: ray.init would retry it for minutes."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", ray://..., or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise RaycvError(f"cannot join the Ray cluster at {address}: nothing answers there ({exc.strerror or exc}); "
                         "start it with `ray start --head` or check --address") from None


def _token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).is_file()


def _url(dashboard_url: str | None) -> str:
    if not dashboard_url:
        return "(no dashboard)"
    return dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"


def plan_resources(config: Config, joined: bool) -> tuple[float, int]:
    """GPUs per fold (resolving auto) and concurrent trials, from what the cluster holds now."""
    import ray

    available = ray.cluster_resources()
    cpus, gpus_total = available.get("CPU", 0), available.get("GPU", 0)
    folds = config.data.num_folds
    gpus = config.resources.gpus_per_fold
    gpus = (1.0 if gpus_total > 0 else 0.0) if gpus == "auto" else float(gpus)
    cpu_need = folds * config.resources.cpus_per_fold + TRIAL_DRIVER_CPU
    gpu_need = folds * gpus
    short = []
    if cpu_need > cpus:
        short.append(
            f"{cpu_need:g} CPUs ({folds} folds x resources.cpus_per_fold {config.resources.cpus_per_fold:g} "
            f"+ {TRIAL_DRIVER_CPU} for the trial), the cluster has {cpus:g}"
        )
    if gpu_need > gpus_total:
        short.append(
            f"{gpu_need:g} GPUs ({folds} folds x resources.gpus_per_fold {gpus:g}), the cluster has {gpus_total:g}"
        )
    if short and not joined:
        raise RaycvError(
            f"one trial needs {'; and '.join(short)}; "
            "lower resources.cpus_per_fold / gpus_per_fold or join a cluster with --address"
        )
    if short:
        print(f"waiting for the autoscaler: one trial needs {'; '.join(short)}")
    fits = [math.floor(cpus / cpu_need)] + ([math.floor(gpus_total / gpu_need)] if gpu_need else [])
    concurrent = config.run.max_concurrent_trials or max(1, min(fits))
    return gpus, concurrent


def to_param_space(config: Config) -> dict[str, Any]:
    """The `search` section as Ray Tune samplers, keyed by dotted config key."""
    from ray import tune

    samplers = {"choice": tune.choice, "grid": tune.grid_search}
    space = {}
    for key, dim in config.search.params.items():
        value = getattr(dim, dim.kind)
        if dim.kind in samplers:
            space[key] = samplers[dim.kind](list(value))
        else:
            space[key] = getattr(tune, dim.kind)(*value)
    return space


def run_sweep(config: Config, address: str | None = None) -> int:
    output_dir = Path(config.run.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise RaycvError(
            f"{output_dir} already holds a run; choose another with run.name=NAME (or run.output_dir=DIR), "
            f"or rebuild its report with: raycv report {output_dir}"
        )
    encoded = encode_folds(config, load_tokenizer(config.model))  # bad data fails here, before Ray starts
    table = encoded.table
    valid_sizes = table["fold"].value_counts().sort_index().tolist()
    num_points = trial_eval_points(config.train, table["fold"])
    max_t = config.scheduler.max_t or num_points
    if max_t > num_points:
        raise RaycvError(f"scheduler.max_t is {max_t} but a trial has only {num_points} evaluation points; lower it")
    if config.scheduler.grace_period > max_t:
        raise RaycvError(
            f"scheduler.grace_period {config.scheduler.grace_period} exceeds the {max_t} evaluation points of a trial"
        )

    started = start_ray(address)
    try:
        gpus, concurrent = plan_resources(config, joined=not started)
        config.resources.gpus_per_fold = gpus
        output_dir.mkdir(parents=True, exist_ok=True)
        storage.write_text_atomic(output_dir / "resolved_config.yaml", dump_yaml(config))
        storage.write_atomic(
            output_dir / "folds.csv", lambda tmp: table[["id", "fold", "target"]].to_csv(tmp, index=False)
        )
        storage.write_text_atomic(output_dir / "baselines.json", json.dumps(compute_baselines(table), indent=2))
        print(f"raycv tune {config.run.name}: {len(table)} rows, {config.data.num_folds} folds "
              f"({'/'.join(map(str, valid_sizes))} validation rows), {num_points} evaluation points "
              f"per trial, batch {config.train.batch_size}, "
              f"{gpus:g} GPU + {config.resources.cpus_per_fold:g} CPU per fold, "
              f"up to {concurrent} trial(s) at a time; output {output_dir}")
        results = _fit(config, encoded.for_workers(), num_points, max_t, concurrent)
        return _finish(config, results, num_points, max_t)
    finally:
        if started:
            import ray

            ray.shutdown()


def _fit(config: Config, encoded: EncodedFolds, num_points: int, max_t: int, concurrent: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if config.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="eval_point", max_t=max_t, grace_period=config.scheduler.grace_period,
            reduction_factor=config.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    trainable = tune.with_parameters(
        train_driver_fn, base_config=config.to_dict(), encoded=encoded, num_points=num_points
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPU}),
        param_space=to_param_space(config),
        tune_config=tune.TuneConfig(
            metric="cv_rmse", mode="min", num_samples=config.search.num_samples, scheduler=scheduler,
            max_concurrent_trials=concurrent,
            trial_name_creator=lambda trial: trial.trial_id, trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=config.run.storage_path, verbose=1,
            stop={"eval_point": max_t}, failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    return tuner.fit()


def _finish(config: Config, results, num_points: int, max_t: int) -> int:
    output_dir = Path(config.run.output_dir)
    trials = gather_trials(results, config.run.storage_path, output_dir, max_t)
    run = {"name": config.run.name, "num_points": num_points, "max_t": max_t, "scheduler": config.scheduler.type,
           "searched": list(config.search.params), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
           "trials": [asdict(trial) for trial in trials]}
    storage.write_text_atomic(output_dir / "run.json", json.dumps(run, indent=2))
    paths = write_report(output_dir)
    report = paths["report"]
    prune_fold_checkpoints(config.run.storage_path, report, config.run.keep_fold_models)
    best = report.get("best_trial")
    counts = {s: sum(t["status"] == s for t in report["trials"]) for s in ("finished", "stopped", "error")}
    print(f"trials: {len(report['trials'])} ({counts['finished']} finished, {counts['stopped']} stopped by ASHA, "
          f"{counts['error']} errors)")
    if best:
        row = next(t for t in report["trials"] if t["trial_id"] == best)
        print(f"best trial {best}: cv_rmse_last {row['cv_rmse_last']:.4f}, cv_rmse_best {row['cv_rmse_best']:.4f}, "
              f"params {row['params']}")
    top_k = report["top_k_ensemble"]
    if top_k["trials"]:
        print(f"top-{len(top_k['trials'])} ensemble: cv_rmse_last {top_k['cv_rmse_last']:.4f}, "
              f"cv_rmse_best {top_k['cv_rmse_best']:.4f}")
    for entry in report["seed_ensembles"]:
        print(f"seed ensemble of {len(entry['trials'])} trials with {entry['params']}: "
              f"cv_rmse_last {entry['cv_rmse_last']:.4f}, cv_rmse_best {entry['cv_rmse_best']:.4f}")
    baselines = report["baselines"]
    print(f"baselines on the same folds: training mean {baselines['mean']['pooled_rmse']:.4f}, "
          f"TF-IDF + ridge {baselines['tfidf_ridge']['pooled_rmse']:.4f}")
    print(f"report: {paths['report_md']}")
    return 0 if counts["finished"] + counts["stopped"] > 0 else 1
