"""Ray Train worker: world rank k fine-tunes fold k with `train_fold`; the folds pool their predictions.

One `TorchTrainer` per trial runs `train_fn_per_worker` on `num_folds` workers. The workers share no
gradients (the model is not wrapped in DDP); they only meet at evaluation points, where
`all_gather_object` over the process group Ray Train set up (gloo on CPU, NCCL on GPU) hands every fold's
validation predictions to rank 0, which reports the pooled out-of-fold RMSE -- the number ASHA ranks on,
since only rank 0's metrics reach Tune. Every worker reports at every point: reports are a barrier.
"""

from __future__ import annotations

import io
import logging
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from raycv.collect import score_trial
from raycv.config import Config
from raycv.metrics import FoldMetrics
from raycv.train_fold import EvalPoint, FoldData, format_progress, split_fold, train_fold

log = logging.getLogger(__name__)
FOLD_STATE = "fold_{}.pt"


def storage(path: str):
    """(pyarrow filesystem, path on it) for a local path or a URI such as s3://bucket/prefix."""
    import pyarrow.fs

    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())


def write_to_storage(storage_path: str, relative: str, text: str) -> None:
    fs, base = storage(storage_path)
    target = f"{base.rstrip('/')}/{relative}"
    fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    tmp = target + ".tmp"
    with fs.open_output_stream(tmp) as stream:
        stream.write(text.encode())
    fs.move(tmp, target)


def read_from_storage(storage_path: str, relative: str) -> str | None:
    import pyarrow.fs

    fs, base = storage(storage_path)
    target = f"{base.rstrip('/')}/{relative}"
    if fs.get_file_info(target).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(target) as stream:
        return stream.read().decode()


def train_run_name(trial_id: str) -> str:
    """A trial's Ray Train run: its storage folder and its name in the dashboard's Train view."""
    return f"train_{trial_id}"


def trial_files(trial_id: str) -> dict[str, str]:
    """Where rank 0 keeps a trial's pooled results in the run's storage (relative paths)."""
    return {"oof": f"results/{trial_id}/oof.csv", "curve": f"results/{trial_id}/curve.csv"}


def pool(gathered: list[dict]) -> dict:
    """All folds' predictions at one evaluation point -> pooled and per-fold RMSEs, and the OOF table."""
    oof = pd.concat([pd.DataFrame(g["rows"]) for g in sorted(gathered, key=lambda g: g["fold"])], ignore_index=True)
    scores = score_trial(oof)  # the collector's scoring, so Tune and the report agree by construction
    metrics = {"cv_rmse": scores["cv_rmse_last"], "cv_rmse_best": scores["cv_rmse_best"]}
    for fold, (last, best) in enumerate(zip(scores["fold_rmse_last"], scores["fold_rmse_best"])):
        metrics[f"fold_{fold}_rmse"] = last
        metrics[f"fold_{fold}_rmse_best"] = best
    return {"metrics": metrics, "oof": oof}


def train_fn_per_worker(loop_config: dict) -> None:
    """Runs on each Ray Train worker. loop_config: config (dict), encoded (fold table, tokens, pad id),
    trial_id, num_points, checkpoint_every."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from ray.train.v2._internal.execution import context as train_execution_context

    # Ray Train 2.60 logs every report at INFO under a logger named after its source file, which
    # LoggingConfig(log_level) does not reach; raycv's own progress line says what matters.
    logging.getLogger(train_execution_context.__file__).setLevel(logging.WARNING)
    config = Config.model_validate(loop_config["config"])
    context = ray.train.get_context()
    fold, world = context.get_world_rank(), context.get_world_size()
    table, tokens, pad_id = loop_config["encoded"]
    data: FoldData = split_fold(table, tokens, fold, pad_id)
    trial_id, num_points = loop_config["trial_id"], loop_config["num_points"]
    checkpoint_every = loop_config["checkpoint_every"]
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # one GPU per fold; NCCL's all_gather_object uses the current device
    fold_metrics = FoldMetrics(config.run.name, trial_id, fold)

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state_path = Path(directory) / FOLD_STATE.format(fold)
            if state_path.exists():
                state = torch.load(state_path, map_location="cpu", weights_only=False)
                log.info("fold %d resumes at step %d", fold, state["step"])
    curve_rows: list[dict] = []

    def on_eval(point: EvalPoint, snapshot) -> None:
        rows = {"id": data.valid_ids, "fold": fold, "target": data.valid_targets.tolist(),
                "pred_best": point.best_preds.tolist(), "pred_last": point.preds.tolist()}
        gathered = [None] * world
        dist.all_gather_object(gathered, {"fold": fold, "rows": rows})
        progress = {"eval_point": point.index, "train_loss": point.train_loss, "step": point.step,
                    "epoch": point.epoch, "num_points": point.num_points}
        metrics = progress
        fold_metrics.record_fold(point.val_rmse, point.samples_per_s, point.index, device)
        if fold == 0:
            pooled = pool(gathered)
            fold_metrics.record_pooled(pooled["metrics"]["cv_rmse"], pooled["metrics"]["cv_rmse_best"])
            # cv_rmse first: Tune's live table shows the first four metrics of a result.
            metrics = {"cv_rmse": pooled["metrics"]["cv_rmse"], "cv_rmse_best": pooled["metrics"]["cv_rmse_best"],
                       **progress, **pooled["metrics"]}
            curve_rows.append({k: v for k, v in metrics.items() if k != "num_points"})
            files = trial_files(trial_id)
            write_to_storage(config.run.storage_path, files["oof"], pooled["oof"].to_csv(index=False))
            write_to_storage(config.run.storage_path, files["curve"], pd.DataFrame(curve_rows).to_csv(index=False))
            folds_text = " ".join(f"{pooled['metrics'][f'fold_{k}_rmse']:.4f}" for k in range(world))
            # sys.stdout, not print: Ray Train patches print into its logger, which shows each line twice.
            sys.stdout.write(f"trial {trial_id} | point {point.index}/{point.num_points} | step {point.step}/{point.total_steps} | "
                  f"cv_rmse {metrics['cv_rmse']:.4f} | cv_rmse_best {metrics['cv_rmse_best']:.4f} | "
                  f"folds {folds_text} | {point.elapsed_s:.0f} s\n")
            sys.stdout.flush()
        else:
            log.debug(format_progress(point, trial_id))

        is_last = point.index == point.num_points
        if is_last or point.index % checkpoint_every == 0:
            with tempfile.TemporaryDirectory() as directory:
                torch.save(snapshot(), Path(directory) / FOLD_STATE.format(fold))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                 checkpoint_dir_name=f"point_{point.index:04d}")
        else:
            ray.train.report(metrics)

    if state is not None and fold == 0:
        # A restarted worker group continues the pooled curve it had written.
        text = read_from_storage(config.run.storage_path, trial_files(trial_id)["curve"])
        if text:
            previous = pd.read_csv(io.StringIO(text))
            curve_rows.extend(previous[previous["eval_point"] <= len(state["curve"])].to_dict("records"))
    train_fold(config, data, device=device, num_points=num_points, on_eval=on_eval, state=state)
