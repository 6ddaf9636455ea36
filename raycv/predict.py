"""Kept fold models -> averaged predictions for new texts, in Kaggle's submission format.

    raycv predict runs/base --data test.csv --out submission.csv [--trials best|top-k|stacked]

As each trial ends among the best `run.keep_fold_models` finished ones, `export_fold_models` writes what
prediction needs into the run directory, in a form that loads without pickles:

    models/<trial>/fold_K.safetensors   the fine-tuned regressor of fold K at its last point (no optimiser);
                                        with search.seeds_per_trial > 1, fold_K_seedS.safetensors: every
                                        fold's model under every seed
    models/<trial>/backbone.json        the backbone's transformers config (the architecture)
    models/<trial>/config.yaml          the trial's resolved config (pooling, max_length, column names)
    models/<trial>/tokenizer/           the fast tokenizer it was trained with
    models/<trial>/files.json           every file above with its size in bytes: predict uses the models
                                        exactly as kept, or says which file is missing or changed

`predict_texts` needs neither Ray nor a GPU (it uses one when present): every fold model of the chosen
trials scores every row in length-sorted batches; a trial's prediction is the average of all its models
(num_folds of them, or num_folds x search.seeds_per_trial with several seeds), and the row's
prediction the average of its trials' (best, top-k) or the report's stacked ensemble of them:
intercept + sum(weight * trial's prediction), over the trials with a weight above 0 (`predict_run`).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors.torch import load_file, save_file

from raycv import RaycvError, first_line, storage
from raycv.config import Config, DataConfig, dump_yaml
from raycv.data import read_texts, tokenize
from raycv.model import autocast_dtype, backbone_config, file_problem, load_tokenizer, regressor_from_weights
from raycv.train_fold import default_device, predict

MODELS_DIR = "models"
KEPT_FILES = "files.json"  # in models/<trial>/: every file export_fold_models wrote -> its size in bytes
# What a fast tokenizer is loaded from: without tokenizer.json transformers silently built another tokenizer from
# what was left. Required of models kept before files.json listed every file.
TOKENIZER_FILES = ("tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json")
KEPT_FIX = "the run's kept models were cut short or edited: run the search again to keep new ones"


def models_dir(run_dir: Path, trial_id: str) -> Path:
    return Path(run_dir) / MODELS_DIR / trial_id


def model_files(config: Config, suffix: str = ".safetensors") -> list[str]:
    """The names of a trial's models: one per fold, and per seed with search.seeds_per_trial > 1."""
    seeds = config.search.seeds_per_trial
    return [storage.fold_state_name(fold, seed_index, seeds, suffix)
            for seed_index in range(seeds) for fold in range(config.data.num_folds)]


def export_fold_models(storage_path: str, run_dir: Path, trial_id: str, config: Config) -> Path:
    """The trial's fold models (every fold's under every seed) at its last checkpoint (its last evaluation
    point) -> safetensors, with the backbone's config, the trial's config and its tokenizer, under
    models/<trial>/ (written whole or not at all)."""
    run = storage.train_run_name(trial_id)
    points = [name for name in storage.list_dirs(storage_path, run) if name.startswith(storage.CHECKPOINT_PREFIX)]
    if not points:
        raise RaycvError(f"trial {trial_id} has no fold checkpoint in {storage_path}/{run} to export")
    target = models_dir(run_dir, trial_id)
    staging = target.with_name(f".{trial_id}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for state_name, model_name in zip(model_files(config, ".pt"), model_files(config), strict=True):
        fold_state = f"{run}/{max(points)}/{state_name}"
        data = storage.read_bytes(storage_path, fold_state)  # retried while a bucket's endpoint does not answer
        if data is None:
            raise RaycvError(f"trial {trial_id} has no {state_name} in {storage_path}/{run}/{max(points)} to export")
        try:  # raycv wrote it, but a storage can hand back a cut-short or edited object
            weights = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["model"]
            tensors = {name: t.contiguous() for name, t in weights.items()}
        except Exception as exc:  # torch's unpickler raises many kinds; a non-dict has no ["model"]
            shutil.rmtree(staging, ignore_errors=True)
            raise RaycvError(f"{storage.shown_path(storage_path, fold_state)}: not a fold checkpoint raycv can "
                             f"export ({first_line(exc)[:200]})") from None
        save_file(tensors, staging / model_name)
    (staging / "backbone.json").write_text(backbone_config(config.model).to_json_string())
    (staging / "config.yaml").write_text(dump_yaml(config))
    load_tokenizer(config.model).save_pretrained(staging / "tokenizer")
    sizes = {path.relative_to(staging).as_posix(): path.stat().st_size
             for path in sorted(staging.rglob("*")) if path.is_file()}
    (staging / KEPT_FILES).write_text(json.dumps(sizes, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def drop_fold_models(run_dir: Path, keep: set[str]) -> None:
    """Remove exported models of trials that are no longer among the kept ones."""
    root = Path(run_dir) / MODELS_DIR
    for directory in root.glob("*") if root.is_dir() else []:
        if directory.is_dir() and directory.name not in keep:
            shutil.rmtree(directory)


@contextlib.contextmanager
def reading(path: Path):
    """A kept model's file that cannot be loaded (cut short, edited, missing) is one line naming it."""
    try:
        yield
    except RaycvError:
        raise
    except Exception as exc:  # yaml, json, pydantic, transformers, safetensors; tokenizers raises bare Exception
        reason = first_line(exc)
        raise RaycvError(f"{path}: cannot load it ({reason[:200]}); {KEPT_FIX}") from None


def check_kept_files(directory: Path) -> None:
    """Every file a trial's kept models were written with (files.json lists them with their sizes) is there as it
    was written, and every file predict opens from them (its config, backbone.json, fold models and tokenizer
    files) is a regular file, checked before any is read: a FIFO among them waited for a writer for ever, a
    directory as tokenizer.json was passed over for another tokenizer, and a missing tokenizer.json was rebuilt
    from what was left of the tokenizer."""
    tokenizer_dir = directory / "tokenizer"
    sizes = kept_sizes(directory)  # None: kept before files.json listed them
    names = ["config.yaml", "backbone.json", *TOKENIZER_FILES, *(sizes or {})]
    paths = [directory / name for name in dict.fromkeys(names)] + sorted(directory.glob("fold_*.safetensors"))
    if tokenizer_dir.is_dir():  # save_pretrained writes files only; a tokenizer/ that is no directory fails to load
        paths += sorted(tokenizer_dir.iterdir())
    problem = next(filter(None, map(file_problem, dict.fromkeys(paths))), None)
    if problem:
        raise RaycvError(f"{problem}; {KEPT_FIX}")
    for name, size in (sizes or {}).items():
        if (found := (directory / name).stat().st_size) != size:
            raise RaycvError(f"{directory / name}: {found} bytes, not the {size} it was kept with; {KEPT_FIX}")


def kept_sizes(directory: Path) -> dict[str, int] | None:
    """files.json of a trial's kept models: every file they were written with (a path inside `directory`) -> its
    size in bytes; None where there is none to read (models kept before raycv wrote it)."""
    path = directory / KEPT_FILES
    if not path.is_symlink() and not path.exists():
        return None
    if problem := file_problem(path):
        raise RaycvError(f"{problem}; {KEPT_FIX}")
    with reading(path):
        sizes = json.loads(path.read_bytes())
    if not (isinstance(sizes, dict) and sizes and all(
            isinstance(name, str) and name and not PurePosixPath(name).is_absolute() and ".." not in
            PurePosixPath(name).parts and "\0" not in name and type(size) is int and size >= 0
            for name, size in sizes.items())):
        raise RaycvError(f"{path}: not the list of kept files (file name -> size in bytes) it was written as; "
                         f"{KEPT_FIX}")
    return sizes


PREDICT_TRIALS = ("best", "top-k", "stacked")  # what `raycv predict --trials` chooses from


def chosen_trials(report: dict, which: str) -> tuple[dict[str, float] | None, float, int]:
    """The report's trials for `--trials which`: (trial -> weight, or None for a plain average; intercept; how
    many of the best finished trials run.keep_fold_models must keep for them). Stacked: only the trials whose
    weight is above 0 (the others need no models)."""
    if which not in PREDICT_TRIALS:
        raise RaycvError(f"--trials {which}: choose one of {', '.join(PREDICT_TRIALS)}")
    if which == "best":
        return ({report["best_trial"]: 1.0} if report["best_trial"] else {}), 0.0, 1
    if which == "top-k":
        trials = report["top_k_ensemble"]["trials"]
        return dict.fromkeys(trials, 1.0), 0.0, len(trials)
    stacked = report["stacked_ensemble"]
    if stacked["cv_rmse_last"] is None:
        raise RaycvError(f"--trials stacked: the run has no stacked ensemble ({stacked['reason']}); use --trials best")
    ranked = stacked["trials"]  # the finished trials, best first, as the search ranks the ones it keeps
    weights = {trial: weight for trial, weight in stacked["weights"].items() if weight > 0}
    return weights, stacked["intercept"], max(ranked.index(trial) + 1 for trial in weights)


def predict_run(run_dir: Path, report: dict, which: str, data_path: str) -> tuple[pd.DataFrame, str]:
    """`raycv predict --trials which`: the submission, and one line saying what made it."""
    weights, intercept, keep = chosen_trials(report, which)
    if not weights:
        raise RaycvError(f"{run_dir} has no finished trial with out-of-fold predictions (in {run_dir / 'oof'}) to "
                         f"predict with (see raycv report {run_dir})")
    stacked = which == "stacked"
    submission = predict_texts(run_dir, list(weights), data_path, weights=weights if stacked else None,
                               intercept=intercept, keep_needed=keep)
    models = sum(len(list(models_dir(run_dir, t).glob("fold_*.safetensors"))) for t in weights)
    how = (f"the stacked ensemble: intercept {intercept:.4f} + " + " + ".join(
        f"{w:.4f} x trial {t}" for t, w in weights.items()) + " (each trial the average of its fold models)"
        if stacked else f"the average of the {models} fold models of {', '.join(weights)}")
    return submission, how + (worse_than_best(report) if stacked else "")


def worse_than_best(report: dict) -> str:
    """Where the stacked ensemble's honest CV score is worse than the best trial's (weights fit to trials
    whose predictions barely vary can be large and generalise badly: the report shows both), a note that
    says so; else ''."""
    best = next((t for t in report["trials"] if t["trial_id"] == report["best_trial"]), None)
    stacked = report["stacked_ensemble"]["cv_rmse_last"]
    if best is None or best["cv_rmse_last"] is None or stacked <= best["cv_rmse_last"]:
        return ""
    return (f"\nnote: the stacked ensemble's CV RMSE ({stacked:.4f}, its weights fit on the other folds) is worse "
            f"than the best trial's ({best['cv_rmse_last']:.4f}); --trials best may serve better")


def predict_texts(run_dir: Path, trial_ids: list[str], data_path: str, batch_size: int = 32,
                  weights: dict[str, float] | None = None, intercept: float = 0.0,
                  keep_needed: int | None = None) -> pd.DataFrame:
    """`id, target` for every row of the CSV at `data_path`: the average of every fold model of the trials
    (every fold's under every seed, with search.seeds_per_trial > 1), or with `weights`, intercept +
    sum(weights[trial] * the average of the trial's fold models). keep_needed:
    the run.keep_fold_models a missing trial's models needed (for the message; default: one per trial)."""
    run_dir = Path(run_dir)
    missing = [t for t in trial_ids if not list(models_dir(run_dir, t).glob("fold_*.safetensors"))]
    if missing:
        needed = keep_needed or len(trial_ids)
        what = f"the stacked ensemble weights {len(trial_ids)} trial(s); " if weights else ""
        raise RaycvError(f"{run_dir} kept no fold models of trial(s) {', '.join(missing)}; {what}the search keeps "
                         "those of the best run.keep_fold_models finished trials (set it to "
                         f"{needed} or more before the search: run.keep_fold_models={needed})")
    configs = {}
    for trial_id in trial_ids:  # every trial's config and fold files before any work
        directory = models_dir(run_dir, trial_id)
        check_kept_files(directory)
        with reading(directory / "config.yaml"):
            configs[trial_id] = Config.model_validate(yaml.safe_load((directory / "config.yaml").read_bytes()))
        folds = set(model_files(configs[trial_id]))
        found = {path.name for path in directory.glob("fold_*.safetensors")}
        if found != folds:
            raise RaycvError(f"{directory}: holds {', '.join(sorted(found))}, not the {len(folds)} fold models "
                             f"{', '.join(sorted(folds))} the trial kept; it was cut short or edited")
    data = configs[trial_ids[0]].data
    rows = read_texts(DataConfig(**{**data.model_dump(), "path": str(data_path)}))
    device, preds = default_device(), {}
    for trial_id, config in configs.items():
        directory = models_dir(run_dir, trial_id)
        from transformers import AutoTokenizer

        with reading(directory / "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer", use_fast=True, local_files_only=True)
            if tokenizer.pad_token_id is None:
                raise ValueError("the tokenizer has no padding token")
            tokens = tokenize(rows["text"].tolist(), tokenizer, config.model.max_length)
        with reading(directory / "backbone.json"):
            backbone = json.loads((directory / "backbone.json").read_bytes())
        dtype = autocast_dtype(config.train.precision, device)
        preds[trial_id] = []
        for fold_path in sorted(directory.glob("fold_*.safetensors")):
            with reading(fold_path):
                model = regressor_from_weights(backbone, config.model.pooling, load_file(fold_path)).to(device)
            preds[trial_id].append(predict(model, tokens, tokenizer.pad_token_id, batch_size, device, dtype,
                                           config.train.pad_to_multiple_of, config.model.max_length))
    if weights is None:
        target = np.mean([fold for folds in preds.values() for fold in folds], axis=0, dtype=np.float64)
    else:
        target = intercept + sum(weights[t] * np.mean(folds, axis=0, dtype=np.float64) for t, folds in preds.items())
    return pd.DataFrame({"id": rows["id"], "target": target})
