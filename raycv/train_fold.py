"""One fold's fine-tuning: plain PyTorch, no Ray.

    raycv train-fold search_spaces/smoke.yaml --fold 0 data.path=../shared/data/commonlit/train.csv

AdamW with layer-wise LR decay, linear warmup then linear decay, gradient clipping, bf16 autocast on CUDA.
The fold's validation rows are scored at evenly spaced evaluation points; for every row the prediction at
the best point and at the last point are kept. `on_eval` (a plain callable) is how a caller -- the CLI's
printer or the Ray worker -- sees each point, and it may stop the loop by returning True; `state` resumes
from a `snapshot()` it was handed. A fold whose training loss or predictions stop being finite has
diverged: the loop reports that point (with the reason) and stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from transformers import get_linear_schedule_with_warmup

from raycv.config import Config, TrainConfig
from raycv.data import EncodedFolds, bucketed_batches, collate, sorted_batches
from raycv.model import autocast_dtype, build_model, param_groups


@dataclass
class FoldData:
    """One fold's rows, already tokenised: the driver tokenises once and hands this to each worker."""

    fold: int
    train_ids: list[str]
    train_tokens: list[list[int]]
    train_targets: np.ndarray
    valid_ids: list[str]
    valid_tokens: list[list[int]]
    valid_targets: np.ndarray
    pad_id: int


def split_fold(encoded: EncodedFolds, fold: int) -> FoldData:
    """Fold `fold`'s validation rows and the rest (its training rows), from the driver's encoded table."""
    table, tokens = encoded.table, encoded.tokens
    is_valid = (table["fold"] == fold).to_numpy()
    pick = lambda mask: [tokens[i] for i in np.flatnonzero(mask)]  # noqa: E731
    return FoldData(
        fold=fold,
        train_ids=table["id"][~is_valid].tolist(),
        train_tokens=pick(~is_valid),
        train_targets=table["target"][~is_valid].to_numpy(dtype=np.float32),
        valid_ids=table["id"][is_valid].tolist(),
        valid_tokens=pick(is_valid),
        valid_targets=table["target"][is_valid].to_numpy(dtype=np.float32),
        pad_id=encoded.pad_id,
    )


@dataclass
class EvalPoint:
    """What the loop knows at one evaluation point."""

    fold: int
    index: int  # 1-based evaluation point
    num_points: int
    step: int
    total_steps: int
    epoch: float
    train_loss: float  # mean training MSE since the previous point
    val_rmse: float
    best_rmse: float
    preds: np.ndarray  # this point's validation predictions, in FoldData.valid_ids order
    best_preds: np.ndarray
    elapsed_s: float
    samples_per_s: float
    diverged: str | None = None  # why this fold cannot go on (a non-finite loss or prediction), else None
    rss_mb: float = 0.0  # this process's resident memory now, and its peak so far (MB)
    peak_rss_mb: float = 0.0
    callbacks_s: float = 0.0  # time spent in on_eval at the earlier points (pooling, reporting, checkpoints)


@dataclass
class FoldResult:
    fold: int
    ids: list[str]
    targets: np.ndarray
    pred_best: np.ndarray
    pred_last: np.ndarray
    curve: list[dict] = field(default_factory=list)  # one {point, step, epoch, train_loss, val_rmse} per point
    diverged: str | None = None  # set when training stopped on a non-finite loss or prediction

    @property
    def best_rmse(self) -> float:
        return min(row["val_rmse"] for row in self.curve)

    @property
    def last_rmse(self) -> float:
        return self.curve[-1]["val_rmse"]

    def predictions(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "id": self.ids, "fold": self.fold, "target": self.targets,
                "pred_best": self.pred_best, "pred_last": self.pred_last,
            }
        )


def fold_seed(seed: int, fold: int) -> int:
    """Each fold's model init and batch order come from (trial seed, fold index)."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def steps_per_epoch(train_rows: int, batch_size: int) -> int:
    return math.ceil(train_rows / batch_size)


def num_eval_points(train: TrainConfig, train_rows: int) -> int:
    """How many evaluation points a fold with `train_rows` training rows gets."""
    total = train.epochs * steps_per_epoch(train_rows, train.batch_size)
    wanted = (
        train.epochs * train.evals_per_epoch if train.evals_per_epoch else math.ceil(total / train.eval_every_n_steps)
    )
    return min(wanted, total)


def trial_eval_points(train: TrainConfig, folds: pd.Series) -> int:
    """Evaluation points of a trial: the fewest any of its folds allows, since every fold reports at every
    point (Ray Train's reports are a barrier). `folds` is the fold column of the fold table."""
    return min(num_eval_points(train, int((folds != fold).sum())) for fold in folds.unique())


def eval_steps(total_steps: int, num_points: int) -> list[int]:
    """Evenly spaced optimiser steps at which to evaluate; the last is always the final step."""
    steps = sorted({round(total_steps * j / num_points) for j in range(1, num_points + 1)})
    assert len(steps) == num_points and steps[0] >= 1, (total_steps, num_points)
    return steps


def tame_glibc_malloc() -> None:
    """Keep a CPU fold's memory flat. Training allocates and frees activations of tens of MB whose sizes
    change with every batch length; glibc's defaults (an arena per thread, an mmap threshold that climbs to
    32 MB after the first large free) keep them in fragmented heaps, and a MiniLM fold grew from 2.6 to
    3.5 GB in 71 steps (measured; 0.98 GB and flat with the settings below, no slower). This is what
    MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=262144 do, applied in-process; either variable, when set,
    wins. A no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        if "MALLOC_ARENA_MAX" not in os.environ:
            libc.mallopt(-8, 2)  # M_ARENA_MAX
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: large blocks go back to the OS when freed
    except (OSError, AttributeError):
        pass


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (after an evaluation pass's differently shaped batches)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_mb() -> tuple[float, float]:
    """(resident, peak resident) memory of this process in MB: how a fold's memory moves over a run."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    try:
        with open("/proc/self/statm") as statm:
            now = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is all there is
        now = peak
    return now, peak


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict(model, tokens: list[list[int]], pad_id: int, batch_size: int, device, dtype, multiple: int = 1,
            cap: int | None = None) -> np.ndarray:
    """Predictions in the order of `tokens`, computed in length-sorted batches (padded as `collate` says)."""
    model.eval()
    lengths = np.array([len(t) for t in tokens])
    preds = np.empty(len(tokens), dtype=np.float32)
    for index in sorted_batches(lengths, batch_size):
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(tokens, index, pad_id, multiple, cap).items()}
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            preds[index] = model(**batch).float().cpu().numpy()
    return preds


def train_fold(
    config: Config,
    data: FoldData,
    *,
    device: torch.device | None = None,
    num_points: int | None = None,
    on_eval: Callable[[EvalPoint, Callable[[], dict]], bool | None] | None = None,
    state: dict | None = None,
) -> FoldResult:
    """Fine-tune one fold's model and return its validation predictions at the best and the last point.

    num_points: evaluation points (all folds of a trial must agree; default from the config);
    on_eval(point, snapshot): called at every point; snapshot() returns a resumable state (tensors and plain
    types only, so it loads with `torch.load(weights_only=True)`); returning True stops training;
    state: a snapshot to continue from."""
    train = config.train
    device = device or default_device()
    if device.type == "cpu":
        tame_glibc_malloc()
    seed = fold_seed(train.seed, data.fold)
    model = build_model(config.model, seed).to(device)
    groups = param_groups(model, train.lr, train.layer_decay, train.weight_decay)
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in groups],
        lr=train.lr,
        fused=device.type == "cuda",
    )
    per_epoch = steps_per_epoch(len(data.train_ids), train.batch_size)
    total_steps = train.epochs * per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, int(train.warmup_ratio * total_steps), total_steps)
    num_points = num_points or num_eval_points(train, len(data.train_ids))
    points = eval_steps(total_steps, num_points)
    dtype = autocast_dtype(train.precision, device)
    lengths = np.array([len(t) for t in data.train_tokens])
    targets = torch.tensor(data.train_targets, dtype=torch.float32)
    micro = train.micro_batch_size or train.batch_size
    pad = {"multiple": train.pad_to_multiple_of, "cap": config.model.max_length}  # each batch's width: collate

    step, curve, stop, diverged = 0, [], False, None
    best_preds = last_preds = np.full(len(data.valid_ids), np.nan, dtype=np.float32)
    torch.manual_seed(seed)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, curve = state["step"], list(state["curve"])
        best_preds, last_preds = state["best_preds"].numpy(), state["last_preds"].numpy()
        torch.set_rng_state(state["torch_rng"])

    def snapshot() -> dict:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "curve": curve,
            "best_preds": torch.from_numpy(best_preds), "last_preds": torch.from_numpy(last_preds),
            "torch_rng": torch.get_rng_state(), "fold": data.fold, "num_points": num_points,
        }

    started, seen_samples, callbacks_s = time.perf_counter(), 0, 0.0
    loss_sum, loss_rows = torch.zeros((), device=device), 0
    model.train()
    while step < total_steps:
        epoch = step // per_epoch
        # The batch order of an epoch depends only on (seed, epoch), so a resumed run skips to where it was.
        batches = bucketed_batches(lengths, train.batch_size, np.random.default_rng([seed, epoch]))
        for index in batches[step - epoch * per_epoch :]:
            optimizer.zero_grad(set_to_none=True)
            loss_sum += backward(model, data.train_tokens, targets, index, data.pad_id, micro, device, dtype, **pad)
            if train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_rows += len(index)
            seen_samples += len(index)
            if step not in points:
                continue

            preds = predict(model, data.valid_tokens, data.pad_id, train.eval_batch_size, device, dtype, **pad)
            if device.type == "cpu":
                release_free_memory()
            rmse = float(np.sqrt(np.mean((preds - data.valid_targets) ** 2)))  # nan if any prediction is
            if not curve or rmse < min(row["val_rmse"] for row in curve):
                best_preds = preds
            last_preds = preds
            train_loss = float(loss_sum) / max(loss_rows, 1)
            diverged = divergence(train_loss, preds, data.fold, len(curve) + 1, step)
            curve.append({
                "point": len(curve) + 1, "step": step, "epoch": step / per_epoch,
                "train_loss": train_loss, "val_rmse": rmse,
            })
            elapsed = time.perf_counter() - started
            point = EvalPoint(
                fold=data.fold, index=len(curve), num_points=num_points, step=step, total_steps=total_steps,
                epoch=step / per_epoch, train_loss=train_loss, val_rmse=rmse,
                best_rmse=min(row["val_rmse"] for row in curve), preds=preds, best_preds=best_preds,
                elapsed_s=elapsed, samples_per_s=seen_samples / max(elapsed, 1e-9), diverged=diverged,
            )
            point.rss_mb, point.peak_rss_mb = memory_mb()
            point.callbacks_s = callbacks_s
            called = time.perf_counter()
            stop = on_eval(point, snapshot) if on_eval is not None else False
            callbacks_s += time.perf_counter() - called
            loss_sum, loss_rows = torch.zeros((), device=device), 0
            model.train()
            if step >= total_steps or stop or diverged:
                break
        if stop or diverged:
            break

    return FoldResult(
        fold=data.fold, ids=data.valid_ids, targets=data.valid_targets,
        pred_best=best_preds, pred_last=last_preds, curve=curve, diverged=diverged,
    )


def backward(model, tokens, targets: torch.Tensor, index: np.ndarray, pad_id: int, micro: int, device,
             dtype, multiple: int = 1, cap: int | None = None) -> torch.Tensor:
    """One batch's MSE gradient, accumulated in micro-batches of `micro` rows (train.micro_batch_size): the
    same gradient as the whole batch at once, with the activation memory of a part. Returns the batch's
    summed squared error (a tensor, so the step has no host sync)."""
    total = torch.zeros((), device=device)
    for start in range(0, len(index), micro):
        part = index[start : start + micro]
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(tokens, part, pad_id, multiple, cap).items()}
        target = targets[part].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            pred = model(**batch)
        loss = torch.nn.functional.mse_loss(pred.float(), target) * (len(part) / len(index))
        loss.backward()
        total += loss.detach() * len(index)
    return total


def divergence(train_loss: float, preds: np.ndarray, fold: int, index: int, step: int) -> str | None:
    """Why this fold has diverged at this point, or None: a non-finite training loss or prediction."""
    bad = int((~np.isfinite(preds)).sum())
    if math.isfinite(train_loss) and not bad:
        return None
    what = f"train_loss {train_loss}" if not math.isfinite(train_loss) else f"{bad} non-finite predictions"
    return f"fold {fold} diverged at point {index} (step {step}): {what}"
