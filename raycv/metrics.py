"""raycv's own metrics, exported through Ray's metrics API to each node's Prometheus endpoint.

Ray prefixes application metrics with `ray_`, so Prometheus (and the dashboard's Metrics view, with
Grafana) shows them as `ray_raycv_cv_rmse{run=...,trial=...}` and so on. Each fold worker records its own
fold's numbers; rank 0 also records the pooled ones. Names carry units where there are any. With
search.seeds_per_trial > 1 a fold has one worker per seed, and the `fold` tag names both: "2 seed 1".
"""

from __future__ import annotations

import torch


class FoldMetrics:
    """The gauges one fold worker sets at every evaluation point."""

    def __init__(self, run: str, trial: str, fold: int, seed: int | None = None):
        from ray.util.metrics import Gauge

        self.tags = {"run": run, "trial": trial, "fold": str(fold) if seed is None else f"{fold} seed {seed}"}
        trial_keys, fold_keys = ("run", "trial"), ("run", "trial", "fold")
        self.cv_rmse = Gauge(
            "raycv_cv_rmse", "pooled out-of-fold RMSE of all folds at the latest evaluation point", trial_keys
        )
        self.cv_rmse_best = Gauge(
            "raycv_cv_rmse_best", "pooled RMSE of every fold's best-so-far predictions", trial_keys
        )
        self.fold_rmse = Gauge(
            "raycv_fold_rmse", "validation RMSE of one fold at the latest evaluation point", fold_keys
        )
        self.samples_per_s = Gauge(
            "raycv_train_samples_per_second", "training samples per second of one fold", fold_keys
        )
        self.eval_points = Gauge("raycv_eval_points", "evaluation points done by one fold", fold_keys)
        self.rss = Gauge("raycv_fold_rss_bytes", "resident memory of one fold's process", fold_keys)
        self.gpu_memory = Gauge("raycv_gpu_memory_bytes", "peak GPU memory allocated by one fold's process", fold_keys)

    def record_fold(self, val_rmse: float, samples_per_s: float, eval_points: int, device: torch.device,
                    rss_mb: float) -> None:
        self.fold_rmse.set(val_rmse, tags=self.tags)
        self.rss.set(rss_mb * 2**20, tags=self.tags)
        self.samples_per_s.set(samples_per_s, tags=self.tags)
        self.eval_points.set(eval_points, tags=self.tags)
        if device.type == "cuda":
            self.gpu_memory.set(torch.cuda.max_memory_allocated(device), tags=self.tags)

    def record_pooled(self, cv_rmse: float, cv_rmse_best: float) -> None:
        tags = {"run": self.tags["run"], "trial": self.tags["trial"]}
        self.cv_rmse.set(cv_rmse, tags=tags)
        self.cv_rmse_best.set(cv_rmse_best, tags=tags)
