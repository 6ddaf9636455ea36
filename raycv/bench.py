"""`raycv bench`: how raycv compares with what a user would run instead, on this machine, in one sitting.

    raycv bench --quick --data ../shared/data/commonlit/train.csv   # every key, roughly, in a minute or two
    raycv bench --data ../shared/data/commonlit/train.csv           # the full run: about 17 minutes on 2 cores
    raycv bench --gpu                                       # on a GPU: BERT-large tokens/s and MFU, 5 folds on 1 GPU

Every figure is a ratio of runs made side by side in this invocation (A and B alternated, repeated, the
median taken), because absolute times on a shared machine drift; first_result_s and the memory figures are
measured quantities. It prints a markdown table (key | value | target | what it compares) and writes every
key to bench.json; a key whose measurement cannot run here (an optional extra missing) is written as null
with the reason. Nothing here is a test: no timing is asserted anywhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from raycv import RaycvError, attempt
from raycv.config import Config
from raycv.data import bucketed_batches, encode_folds, useful_token_fraction
from raycv.model import autocast_dtype, build_model, load_tokenizer, param_groups
from raycv.spaces import ConfigError, load_config
from raycv.storage import write_text_atomic
from raycv.train_fold import FoldData, fold_seed, tame_glibc_malloc, train_fold

# key: (target, what it compares). The table's rows, in this order; bench.json holds every one.
KEYS = {
    "loop_vs_bare_throughput": (">= 0.95", "samples/s of raycv's train_fold loop over a bare PyTorch loop in "
                                "bench.py: same model, batches, optimiser, scheduler, clipping"),
    "useful_token_fraction": (">= 0.98", "real tokens over padded tokens of raycv's length-bucketed batches "
                              "(all rows, batch 16, max_length 256)"),
    "bucketed_vs_fixed_padding_time": ("<= 0.85", "one training pass with raycv's batches over the same rows "
                                       "in random batches padded to max_length (the StructBERT fork)"),
    "first_result_s": ("<= 20", "seconds from `raycv tune` (smoke space, subprocess) to its first pooled "
                       "cv_rmse line"),
    "report_overhead_fraction": ("<= 0.05", "share of a trial's wall time outside training and evaluation, "
                                 "EXTRAPOLATED from the measured costs to 8 points one minute apart"),
    "report_overhead_fraction_measured": ("-", "the same share as measured on the smoke trials themselves"),
    "report_fixed_cost_s": ("-", "per-trial seconds outside the folds' training/evaluation (worker start, "
                            "teardown, scheduling), measured"),
    "report_per_point_cost_s": ("-", "seconds per evaluation point in pooling, reporting, checkpointing"),
    "fold_epoch_vs_hf_tune": ("<= 0.7", "wall time per fold-epoch of `raycv tune` (5 folds per trial) over HF "
                              "Trainer.hyperparameter_search(backend='ray') on one split"),
    "asha_epoch_fraction": ("<= 0.35", "epochs an ASHA search consumed over the same trials run without "
                            "early stopping"),
    "asha_best_rmse_delta": ("<= 0.01", "best pooled last-point RMSE with ASHA minus without"),
    "peak_rss_mb_per_fold_worker": ("<= 2048", "the largest fold worker's peak resident memory over the run (MB)"),
    "rss_mb_first_point": ("-", "the largest fold worker's resident memory at the first evaluation point (MB)"),
    "rss_mb_last_point": ("-", "... and at the last (flat: about the same)"),
}
GPU_KEYS = {
    "gpu_tokens_per_s_b8": ("-", "BERT-large (StructBERT shapes, random), length 256, batch 8, bf16 autocast, "
                            "fused AdamW, SDPA: training tokens/s"),
    "gpu_mfu_b8": (">= 0.40", "model FLOPs utilisation at batch 8: (6 x non-embedding params + attention) x "
                   "tokens/s over the GPU's dense bf16 peak"),
    "gpu_tokens_per_s_b32": ("-", "the same at batch 32"),
    "gpu_mfu_b32": (">= 0.40", "the same at batch 32"),
    "gpu_tune_5fold_wall_s": ("-", "`raycv tune` of the smoke space with 5 folds on one GPU "
                              "(resources.gpus_per_fold=0.2), end to end"),
    "gpu_tune_first_result_s": ("-", "... its first pooled cv_rmse line"),
}
# Dense bf16 tensor-core peak (TFLOPs, no sparsity), from NVIDIA's data sheets; the longest matching name wins.
PEAK_BF16_TFLOPS = {
    "B200": 2250, "H200": 989, "H100": 989, "H100 PCIe": 756, "H800": 989, "GH200": 989, "A100": 312,
    "A800": 312, "L40S": 362, "L40": 181, "A10G": 70, "A10": 125, "L4": 121, "A6000": 155, "RTX 4090": 165,
}
STRUCTBERT_LARGE = {"vocab_size": 30522, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                    "intermediate_size": 4096, "max_position_embeddings": 512, "type_vocab_size": 2}
EXTRA_INSTALL = "pip install -e '.[bench]'"


# ---------------------------------------------------------------- pure helpers (unit-tested)


def alternate(run_a: Callable[[], float], run_b: Callable[[], float], repeats: int) -> list[tuple[float, float]]:
    """(a, b) measurement pairs, run side by side: A B, then B A, then A B ..., so neither side always
    goes first (warm caches, drifting load)."""
    pairs = []
    for repeat in range(repeats):
        if repeat % 2 == 0:
            a = run_a()
            b = run_b()
        else:
            b = run_b()
            a = run_a()
        pairs.append((a, b))
    return pairs


def median_ratio(pairs: list[tuple[float, float]]) -> float:
    """The median of a / b over the pairs."""
    return float(statistics.median(a / b for a, b in pairs))


def attention_flops_per_token(num_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of the attention matmuls (Q K^T and scores x V): 2 x 2 x seq x hidden per
    layer forward, x3 for forward and backward."""
    return 12.0 * num_layers * hidden * seq_len


def training_flops(params: int, tokens: int, num_layers: int, hidden: int, seq_len: int) -> float:
    """Model FLOPs of training on `tokens` tokens: 6 x params x tokens (forward 2, backward 4) plus the
    attention matmuls. `params`: the parameters in matmuls (embeddings excluded: a lookup is no FLOPs)."""
    return tokens * (6.0 * params + attention_flops_per_token(num_layers, hidden, seq_len))


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (torch.cuda.get_device_name), or None if not in the table."""
    found = [name for name in PEAK_BF16_TFLOPS if name.lower() in device_name.lower()]
    return float(PEAK_BF16_TFLOPS[max(found, key=len)]) if found else None


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    return flops / seconds / (peak_tflops * 1e12)


# ---------------------------------------------------------------- results


@dataclass
class Results:
    keys: dict  # key -> (target, compares)
    values: dict = field(default_factory=dict)
    used: dict = field(default_factory=dict)  # key -> what the measurement ran on
    reasons: dict = field(default_factory=dict)  # key -> why it is null

    def set(self, key: str, value, used: str = "") -> None:
        self.values[key] = None if value is None or (isinstance(value, float) and not math.isfinite(value)) \
            else value
        self.used[key] = used

    def skip(self, key: str, reason: str) -> None:
        self.values[key], self.reasons[key] = None, reason

    def table(self) -> str:
        lines = ["| key | value | target | what it compares |", "|---|---|---|---|"]
        for key, (target, compares) in self.keys.items():
            value = self.values.get(key)
            shown = f"{value:.3g}" if isinstance(value, float) else str(value)
            if value is None:
                shown = f"null ({self.reasons.get(key, 'not measured')})"
            used = f"; {self.used[key]}" if self.used.get(key) else ""
            lines.append(f"| `{key}` | {shown} | {target} | {compares}{used} |")
        return "\n".join(lines)

    def to_json(self, mode: str) -> dict:
        return {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": mode, "machine": machine(),
            "values": {key: self.values.get(key) for key in self.keys},
            "details": {key: {"target": target, "compares": compares, "used": self.used.get(key, ""),
                              "reason": self.reasons.get(key)} for key, (target, compares) in self.keys.items()},
        }


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def say(text: str) -> None:
    print(f"bench: {text}", flush=True)


# ---------------------------------------------------------------- sizes: --quick and the full run


@dataclass
class Sizes:
    """What each measurement runs on. Full: 988 s on 2 idle cores (the ASHA pair about 11 minutes); quick: ~70 s."""

    quick: bool
    model_space: str  # the model of the in-process loops and of the HF comparison
    loop_steps: int
    repeats: int
    pad_rows: int
    smoke_lrs: list  # the trials of the ASHA / no-ASHA pair (and of the overhead measurement)
    smoke_overrides: list
    hf_rows: int
    hf_overrides: list  # of the model space, for both sides of the HF comparison

    @classmethod
    def make(cls, quick: bool) -> Sizes:
        if quick:
            return cls(
                quick=True, model_space="smoke.yaml", loop_steps=10, repeats=1, pad_rows=64,
                smoke_lrs=[3e-3],  # one trial: the ASHA pair and the HF comparison run only in the full bench
                smoke_overrides=["data.max_rows=150", "data.num_folds=3", "train.epochs=2",
                                 "resources.cpus_per_fold=0.25"],
                hf_rows=150, hf_overrides=[],
            )
        return cls(
            quick=False, model_space="minilm_cpu.yaml", loop_steps=8, repeats=2, pad_rows=128,
            smoke_lrs=[3e-4, 1e-5, 3e-3, 3e-5, 1e-3, 1e-4],
            smoke_overrides=["train.epochs=6"],
            hf_rows=200, hf_overrides=["train.epochs=1", "train.evals_per_epoch=2"],
        )


# ---------------------------------------------------------------- in-process loops: raycv versus bare


def fold_data(encoded, rows: np.ndarray, valid_rows: int = 4) -> FoldData:
    """A FoldData over `rows` of the encoded table, with a few validation rows so evaluation costs ~nothing."""
    table, tokens = encoded.table, encoded.tokens
    train, valid = rows[valid_rows:], rows[:valid_rows]
    return FoldData(
        fold=0, train_ids=table["id"].iloc[train].tolist(), train_tokens=[tokens[i] for i in train],
        train_targets=table["target"].iloc[train].to_numpy(np.float32),
        valid_ids=table["id"].iloc[valid].tolist(), valid_tokens=[tokens[i] for i in valid],
        valid_targets=table["target"].iloc[valid].to_numpy(np.float32), pad_id=encoded.pad_id,
    )


def bare_loop(model, optimizer, scheduler, tokens, targets, batches, pad_id, dtype, width=None,
              max_grad_norm=1.0, multiple=1) -> float:
    """A plain PyTorch training pass, as one writes it without raycv: pad, forward, MSE, backward, clip,
    step. `width`: pad every batch to it (the fork's fixed padding); else to its longest row rounded up to
    `multiple`, as raycv pads. Returns samples per second."""
    model.train()
    started, seen = time.perf_counter(), 0
    for index in batches:
        rows = [torch.tensor(tokens[i]) for i in index]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)
        target_width = width if width is not None else -(-ids.shape[1] // multiple) * multiple
        if ids.shape[1] < target_width:
            ids = torch.nn.functional.pad(ids, (0, target_width - ids.shape[1]), value=pad_id)
        mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            pred = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        loss = torch.nn.functional.mse_loss(pred.float(), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        scheduler.step()
        seen += len(index)
    return seen / (time.perf_counter() - started)


def optimiser_for(model, config: Config, total_steps: int):
    """AdamW with raycv's layer-wise groups and the linear warmup/decay, as train_fold builds them."""
    from transformers import get_linear_schedule_with_warmup

    train = config.train
    groups = param_groups(model, train.lr, train.layer_decay, train.weight_decay)
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in groups], lr=train.lr
    )
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(train.warmup_ratio * total_steps), total_steps)


def measure_loops(results: Results, sizes: Sizes, data_path: str) -> None:
    """loop_vs_bare_throughput, useful_token_fraction, bucketed_vs_fixed_padding_time."""
    overrides = [f"data.path={data_path}", "data.max_rows=null", "model.max_length=256", "train.batch_size=16",
                 "train.micro_batch_size=null", "train.precision=fp32", "model.dropout=0.0"]
    config = load_config(sizes.model_space, overrides)
    encoded = encode_folds(config, load_tokenizer(config.model))
    lengths = np.array([len(t) for t in encoded.tokens])
    batch = config.train.batch_size
    rng = np.random.default_rng(0)
    multiple = config.train.pad_to_multiple_of
    bucketed = bucketed_batches(lengths, batch, np.random.default_rng(0))
    useful = useful_token_fraction(lengths, bucketed, multiple, config.model.max_length)
    exact = useful_token_fraction(lengths, bucketed)
    fixed_useful = float(lengths.sum() / (len(lengths) * config.model.max_length))
    results.set("useful_token_fraction", useful,
                f"{len(lengths)} rows, widths rounded up to a multiple of {multiple} (train.pad_to_multiple_of; "
                f"{exact:.3f} without rounding); fixed padding to 256: {fixed_useful:.3f}")
    model_name = config.model.backbone.type + ("" if sizes.quick else " MiniLM-L6")
    tame_glibc_malloc()  # train_fold sets these allocator options on CPU; the bare loop runs under the same

    # raycv's loop versus the bare loop: same rows, model init, first-epoch batches, optimiser, fp32.
    rows = rng.permutation(len(lengths))[: 4 + sizes.loop_steps * batch]
    data = fold_data(encoded, rows)
    seed = fold_seed(config.train.seed, data.fold)
    one_epoch = config.with_overrides({"train.epochs": 1, "train.evals_per_epoch": 1})
    train_lengths = np.array([len(t) for t in data.train_tokens])
    targets = torch.tensor(data.train_targets)

    def raycv_loop() -> float:
        seen = {}
        train_fold(one_epoch, data, device=torch.device("cpu"), num_points=1,
                   on_eval=lambda point, _: seen.update(rate=point.samples_per_s))
        return seen["rate"]

    def bare() -> float:
        model = build_model(one_epoch.model, seed)
        batches = bucketed_batches(train_lengths, batch, np.random.default_rng([seed, 0]))
        optimizer, scheduler = optimiser_for(model, one_epoch, len(batches))
        torch.manual_seed(seed)
        return bare_loop(model, optimizer, scheduler, data.train_tokens, targets, batches, data.pad_id,
                         autocast_dtype(one_epoch.train.precision, torch.device("cpu")),
                         max_grad_norm=one_epoch.train.max_grad_norm, multiple=multiple)

    say(f"loop_vs_bare_throughput: {model_name}, {sizes.loop_steps} steps of {batch} x {sizes.repeats} repeats")
    pairs = alternate(raycv_loop, bare, sizes.repeats)
    results.set("loop_vs_bare_throughput", median_ratio(pairs),
                f"{model_name}, batch {batch}, {sizes.loop_steps} steps, fp32, {torch.get_num_threads()} threads, "
                f"median of {len(pairs)}: " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in pairs) + " samples/s")

    # The same training pass over the same rows: raycv's batches against random batches padded to 256.
    pad_rows = rng.permutation(len(lengths))[: sizes.pad_rows]
    pad_targets = torch.tensor(encoded.table["target"].to_numpy(np.float32))

    def one_pass(fixed: bool) -> float:
        model = build_model(config.model, 0)
        if fixed:
            order = np.random.default_rng(1).permutation(pad_rows)
            batches = [order[i : i + batch] for i in range(0, len(order), batch)]
        else:
            chosen = bucketed_batches(lengths[pad_rows], batch, np.random.default_rng(1))
            batches = [pad_rows[b] for b in chosen]
        optimizer, scheduler = optimiser_for(model, config, len(batches))
        rate = bare_loop(model, optimizer, scheduler, encoded.tokens, pad_targets, batches, encoded.pad_id, None,
                         width=config.model.max_length if fixed else None, multiple=multiple)
        return len(pad_rows) / rate  # seconds for the pass

    say(f"bucketed_vs_fixed_padding_time: {model_name}, {sizes.pad_rows} rows x {sizes.repeats} repeats")
    pairs = alternate(lambda: one_pass(False), lambda: one_pass(True), sizes.repeats)
    results.set("bucketed_vs_fixed_padding_time", median_ratio(pairs),
                f"{model_name}, {sizes.pad_rows} rows, batch {batch}, max_length 256, median of {len(pairs)}: "
                + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in pairs) + " s")


# ---------------------------------------------------------------- subprocess runs: raycv tune and HF


@dataclass
class Run:
    returncode: int
    wall_s: float
    lines: list  # (seconds since start, line)
    cwd: Path

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, needle: str) -> float | None:
        return next((at for at, line in self.lines if needle in line), None)


def run_command(args: list[str], cwd: Path, timeout: float) -> Run:
    """`args` in its own process group, every output line timed as it arrives; past `timeout` the group (the
    command and the local Ray it started) is killed."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, bufsize=1)
    lines: list = []

    def read():
        for line in proc.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wall = time.perf_counter() - started
    reader.join(timeout=10)
    return Run(proc.returncode, wall, lines, cwd)


def raycv_tune(space: str, overrides: list[str], cwd: Path, timeout: float) -> Run:
    say(f"raycv tune {space} {shlex.join(overrides)}")
    run = run_command([sys.executable, "-m", "raycv.cli", "tune", space, *overrides], cwd, timeout)
    if run.returncode != 0:
        tail = "\n".join(line for _, line in run.lines[-15:])
        raise RaycvError(f"raycv tune {space} exited {run.returncode} during the benchmark:\n{tail}")
    return run


def trial_results(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Tune's result rows of every trial (result.json under the run's storage), by trial id."""
    out = {}
    for path in sorted((run_dir / "ray" / "tune").glob("*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[path.parent.name] = pd.DataFrame(rows)
    return out


def report_overhead(results: Results, run: Run, run_dir: Path, breakdown: str = "") -> None:
    """Per trial: wall time = from its start to the next trial's start (trials run one at a time), its
    folds' busy time = rank 0's training + evaluation seconds; the rest is overhead, split into a cost per
    evaluation point (time in on_eval) and a fixed cost per trial."""
    trials = trial_results(run_dir)
    starts = sorted((rows["reported_at"].iloc[0] - rows["time_total_s"].iloc[0], trial)
                    for trial, rows in trials.items())
    if len(starts) == 1:  # one trial: its end is its last report (teardown not seen)
        only = trials[starts[0][1]]
        starts.append((starts[0][0] + float(only["time_total_s"].iloc[-1]), None))
    walls, busy, fixed, per_point = [], [], [], []
    for (start, trial), (next_start, _) in zip(starts, starts[1:], strict=False):
        last = trials[trial].iloc[-1]
        points = int(last["eval_point"])
        wall = next_start - start
        point_cost = float(last["fold_callbacks_s"]) / max(points - 1, 1)
        walls.append(wall)
        busy.append(float(last["fold_busy_s"]))
        per_point.append(point_cost)
        fixed.append(wall - float(last["fold_busy_s"]) - points * point_cost)
    if not walls:
        for key in ("report_overhead_fraction", "report_overhead_fraction_measured", "report_fixed_cost_s",
                    "report_per_point_cost_s"):
            results.skip(key, "no trial reported")
        return
    measured = statistics.median((w - b) / w for w, b in zip(walls, busy, strict=True))
    fixed_s, point_s = statistics.median(fixed), statistics.median(per_point)
    points, interval = 8, 60.0
    extrapolated = (fixed_s + points * point_s) / (fixed_s + points * point_s + points * interval)
    used = f"{len(walls)} consecutive smoke trials, trial wall time median {statistics.median(walls):.1f} s"
    results.set("report_overhead_fraction", extrapolated,
                f"extrapolated: (fixed + 8 x per-point) / (that + 8 x 60 s); {used}")
    results.set("report_overhead_fraction_measured", measured, used)
    results.set("report_fixed_cost_s", fixed_s, f"{used}; {breakdown}" if breakdown else used)
    results.set("report_per_point_cost_s", point_s, used)


def rss_from_curves(results: Results, run_dir: Path, used: str) -> None:
    curves = [pd.read_csv(path) for path in sorted((run_dir / "curves").glob("*.csv"))]
    curves = [c for c in curves if "max_fold_rss_mb" in c.columns]
    if not curves:
        results.skip("peak_rss_mb_per_fold_worker", "the run's curves hold no max_fold_rss_mb column")
        return
    results.set("peak_rss_mb_per_fold_worker", float(max(c["max_fold_peak_rss_mb"].max() for c in curves)), used)
    results.set("rss_mb_first_point", float(max(c["max_fold_rss_mb"].iloc[0] for c in curves)), used)
    results.set("rss_mb_last_point", float(max(c["max_fold_rss_mb"].iloc[-1] for c in curves)),
                used + f"; {max(len(c) for c in curves)} points")


def epochs_and_best(run_dir: Path) -> tuple[float, float]:
    """(epochs the trials consumed, best finished trial's pooled last-point RMSE) of a run."""
    report = json.loads((run_dir / "report.json").read_text())
    epochs = sum(t["eval_points"] for t in report["trials"])  # one evaluation point per epoch here
    best = next(t for t in report["trials"] if t["trial_id"] == report["best_trial"])
    return float(epochs), float(best["cv_rmse_last"])


def timed_parts(run: Run, marks: list[tuple[str, str]], start: float) -> list[str]:
    """"NAME x.x s" for each (name, needle) in order: the seconds from the previous mark (or `start`) to the
    first line containing the needle; up to the first needle that never appeared."""
    parts, before = [], start
    for name, needle in marks:
        at = run.first(needle)
        if at is None:
            break
        parts.append(f"{name} {at - before:.1f} s")
        before = at
    return parts


def first_result_breakdown(run: Run) -> str:
    """Where the seconds to the first pooled line went, from the times the run's own lines appeared."""
    marks = [("checks and Ray start", "started a local Ray"), ("trial driver start", " started with configuration"),
             ("Train controller and fold workers start", "fold worker started"),
             ("model build, first training and evaluation, pooling", "| cv_rmse_last ")]
    parts = timed_parts(run, marks, 0.0)
    return "breakdown: " + ", ".join(parts) if parts else "no breakdown (a line was missing)"


def later_trial_breakdown(run: Run) -> str:
    """Where a later trial's wall time went (the second of a run whose trials run one at a time: what each of
    a long search's trials pays), from the times the run's own lines appeared."""
    started = [line.split()[1] for _, line in run.lines if line.startswith("Trial ") and " started with" in line]
    if len(started) < 2:
        return "no later trial to break down"
    previous, trial = started[0], started[1]
    previous_end = run.first(f"Trial {previous} completed")
    if previous_end is None:
        return "no later trial to break down (its predecessor's end was not printed)"
    marks = [("previous trial's end to this trial's driver ready (report refresh, driver process and imports)",
              f"Trial {trial} started with"),
             ("Train controller and fold workers start (processes, imports, torch.distributed)",
              f"{trial} | fold 0 | fold worker started"),
             ("model build, first training and evaluation, pooling", f"{trial} | point 1/"),
             ("the other points", f"Trial {trial} completed")]
    return f"trial {trial}: " + ", ".join(timed_parts(run, marks, previous_end))


def lr_grid(lrs: list) -> str:
    # 3.0e-04, not 3e-04: YAML reads a number without a dot in its mantissa as a string
    return "search.params={train.lr: {grid: [" + ", ".join(f"{lr:.1e}" for lr in lrs) + "]}}"


def measure_tune(results: Results, sizes: Sizes, data_path: str, work: Path) -> Run:
    """first_result_s, report overhead, ASHA against no early stopping; in --quick also the raycv side of
    the HF comparison and the memory figures (tiny model)."""
    common = [f"data.path={data_path}", "search.num_samples=1", lr_grid(sizes.smoke_lrs), "train.evals_per_epoch=1",
              "run.max_concurrent_trials=1", *sizes.smoke_overrides]
    model = "tiny random BERT of smoke.yaml (hidden 32, 2 layers) trained on real CommonLit rows"
    runs = {}
    for scheduler in ("none",) if sizes.quick else ("none", "asha"):
        cwd = work / f"smoke_{scheduler}"
        cwd.mkdir()
        extra = ["scheduler.type=asha", "scheduler.grace_period=1", "scheduler.reduction_factor=3"] \
            if scheduler == "asha" else ["scheduler.type=none"]
        runs[scheduler] = raycv_tune("spaces/smoke.yaml", [*common, *extra, f"run.name=smoke_{scheduler}"],
                                     cwd, timeout=900)
    full = runs["none"]
    full_dir = full.cwd / "runs" / "smoke_none"
    results.set("first_result_s", full.first("| cv_rmse_last "),
                "smoke.yaml (overridden as below), subprocess start to the first pooled line; "
                + first_result_breakdown(full))
    report_overhead(results, full, full_dir, later_trial_breakdown(full))
    if sizes.quick:  # two more whole searches: minutes on 2 cores, too long for the test suite's --quick
        for key in ("asha_epoch_fraction", "asha_best_rmse_delta"):
            results.skip(key, "measured by the full bench only (an ASHA search and the same trials without it)")
        return full
    asha = runs["asha"]
    asha_dir = asha.cwd / "runs" / "smoke_asha"
    (full_epochs, full_best), (asha_epochs, asha_best) = epochs_and_best(full_dir), epochs_and_best(asha_dir)
    used = (f"{model}; {len(sizes.smoke_lrs)} trials (lr grid in this order: {sizes.smoke_lrs}), one at a time, "
            f"ASHA grace 1, reduction 3; {' '.join(sizes.smoke_overrides)}")
    results.set("asha_epoch_fraction", asha_epochs / full_epochs, f"{asha_epochs:g}/{full_epochs:g} epochs; {used}")
    results.set("asha_best_rmse_delta", asha_best - full_best, f"{asha_best:.4f} - {full_best:.4f}; {used}")
    return full


def hf_available() -> str | None:
    """None if the HF Trainer route can run here, else why not."""
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed: {EXTRA_INSTALL}"
    return None


def hf_search_main(spec: dict) -> None:
    """The HF route, run in a subprocess of its own (`python -m raycv.bench hf SPEC`): the rows, batch,
    length and model of the raycv side, one split (fold 0 for evaluation), one trial per learning rate."""
    import ray
    from ray import tune
    from transformers import (
        AutoModelForSequenceClassification,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from raycv.model import name_or_dir, tiny_config

    config = load_config(spec["space"], spec["overrides"])
    tokenizer = load_tokenizer(config.model)
    encoded = encode_folds(config, tokenizer)
    table = encoded.table

    def rows(mask):
        return [{"input_ids": encoded.tokens[i], "attention_mask": [1] * len(encoded.tokens[i]),
                 "labels": float(table["target"].iloc[i])} for i in np.flatnonzero(mask)]

    train_rows, eval_rows = rows(table["fold"].to_numpy() != 0), rows(table["fold"].to_numpy() == 0)

    def model_init(trial=None):
        if config.model.backbone.type == "tiny":
            backbone = tiny_config(config.model)
            backbone.num_labels = 1
            return BertForSequenceClassification(backbone)
        source, local_only = name_or_dir(config.model.backbone.path)
        dropout = {} if config.model.attention_dropout is None else {
            "attention_probs_dropout_prob": config.model.attention_dropout}
        return AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, local_files_only=local_only,
                                                                  **dropout)

    micro = config.train.micro_batch_size or config.train.batch_size  # raycv's micro-batches: HF's accumulation
    args = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=micro,
        gradient_accumulation_steps=config.train.batch_size // micro, bf16=config.train.precision == "bf16",
        per_device_eval_batch_size=config.train.eval_batch_size, num_train_epochs=config.train.epochs,
        weight_decay=config.train.weight_decay, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=not torch.cuda.is_available(), seed=config.train.seed,
    )
    trainer = Trainer(model_init=model_init, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                      data_collator=DataCollatorWithPadding(tokenizer))
    ray.init(address="local", include_dashboard=False)
    trainer.hyperparameter_search(
        direction="minimize", backend="ray", n_trials=1,
        hp_space=lambda _: {"learning_rate": tune.grid_search(spec["lrs"])},
        resources_per_trial={"cpu": spec["cpus"]}, max_concurrent_trials=1,
        storage_path=spec["output_dir"], name="hf",
    )
    print(f"hf search done: {len(spec['lrs'])} trials, {len(train_rows)} training rows", flush=True)


def measure_hf(results: Results, sizes: Sizes, data_path: str, work: Path, quick_run: Run | None) -> None:
    """fold_epoch_vs_hf_tune (and, in the full run, the memory figures from its raycv side)."""
    lrs = sizes.smoke_lrs if sizes.quick else [8e-5]
    if sizes.quick:  # the no-ASHA smoke run is the raycv side
        overrides = [f"data.path={data_path}", *sizes.smoke_overrides]
        space, raycv_run = "smoke.yaml", quick_run
    else:
        space = sizes.model_space
        # minilm_cpu.yaml's own settings (batch 16 in micro-batches of 8, bf16 autocast, no attention dropout),
        # which the HF side is given too: the memory figures below are the shipped space's
        overrides = [f"data.path={data_path}", f"data.max_rows={sizes.hf_rows}", *sizes.hf_overrides]
        raycv_run = None
    config = load_config(space, overrides)
    epochs, folds = config.train.epochs, config.data.num_folds
    micro = config.train.micro_batch_size or config.train.batch_size
    used = (f"{config.model.backbone.type} backbone, {config.data.max_rows or 'all'} rows, batch "
            f"{config.train.batch_size} (micro-batches of {micro}), max_length {config.model.max_length}, "
            f"{epochs} epoch(s), {len(lrs)} trial(s) each side, {config.train.precision} on CPU, attention dropout "
            f"{'the backbone default' if config.model.attention_dropout is None else config.model.attention_dropout}")
    missing = hf_available()
    if raycv_run is None:
        cwd = work / "raycv_minilm"
        cwd.mkdir()
        raycv_run = raycv_tune(f"spaces/{space}", [*overrides, "scheduler.type=none", "search.num_samples=1",
                                                   lr_grid(lrs), "run.name=bench_minilm"], cwd, timeout=900)
    run_dir = raycv_run.cwd / "runs" / ("smoke_none" if sizes.quick else "bench_minilm")
    rss_used = f"{config.model.backbone.type} backbone, batch {config.train.batch_size} (micro-batches of " \
               f"{micro}), max_length {config.model.max_length}, " \
               f"CPU, {folds} fold workers"
    rss_from_curves(results, run_dir, rss_used)
    if sizes.quick:  # a whole Hugging Face search: minutes on 2 cores, too long for the test suite's --quick
        results.skip("fold_epoch_vs_hf_tune", "measured by the full bench only (a Hugging Face search beside raycv's)")
        return
    if missing:
        results.skip("fold_epoch_vs_hf_tune", missing)
        return
    cwd = work / "hf"
    cwd.mkdir()
    spec = {"space": space, "overrides": overrides, "lrs": lrs, "cpus": os.cpu_count(), "output_dir": str(cwd)}
    say(f"HF Trainer.hyperparameter_search(backend='ray'): {used}")
    hf = run_command([sys.executable, "-m", "raycv.bench", "hf", json.dumps(spec)], cwd, timeout=900)
    if hf.returncode != 0:
        tail = "\n".join(line for _, line in hf.lines[-15:])
        results.skip("fold_epoch_vs_hf_tune", f"the HF route exited {hf.returncode}")
        say(f"the HF route failed:\n{tail}")
        return
    raycv_per = raycv_run.wall_s / (len(lrs) * folds * epochs)
    hf_per = hf.wall_s / (len(lrs) * epochs)
    results.set("fold_epoch_vs_hf_tune", raycv_per / hf_per,
                f"{raycv_per:.1f} s / {hf_per:.1f} s per fold-epoch (whole commands, Ray start included); {used}")


# ---------------------------------------------------------------- the GPU section


def gpu_step_rate(batch: int, seq_len: int, steps: int, warmup: int = 3) -> tuple[float, int, float]:
    """(tokens/s, non-embedding parameters, seconds) of BERT-large training steps: bf16 autocast, fused
    AdamW, SDPA attention, random weights and tokens."""
    from transformers import BertConfig, BertModel

    from raycv.model import Regressor

    device = torch.device("cuda")
    with device:  # drawn on the GPU: a 335M-parameter init on the CPU would take longer than the timing
        backbone = BertModel(BertConfig(**STRUCTBERT_LARGE, attn_implementation="sdpa"), add_pooling_layer=True)
        model = Regressor(backbone, "cls", 0.1)
    embedding = sum(p.numel() for p in backbone.embeddings.parameters())
    params = sum(p.numel() for p in model.parameters()) - embedding
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
    ids = torch.randint(1000, 30000, (batch, seq_len), device=device)
    mask, types, target = torch.ones_like(ids), torch.zeros_like(ids), torch.randn(batch, device=device)
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del model, optimizer
    torch.cuda.empty_cache()
    return batch * seq_len * steps / seconds, params, seconds


def run_gpu(results: Results, data_path: str, work: Path, peak_override: float | None) -> None:
    name = torch.cuda.get_device_name()
    peak = peak_override or peak_bf16_tflops(name)
    seq_len = 256
    cfg = STRUCTBERT_LARGE
    for batch in (8, 32):
        say(f"BERT-large on {name}: batch {batch}, length {seq_len}")
        rate, params, seconds = gpu_step_rate(batch, seq_len, steps=20)
        used = f"{name}, {params / 1e6:.0f}M non-embedding parameters, 20 timed steps in {seconds:.1f} s"
        results.set(f"gpu_tokens_per_s_b{batch}", rate, used)
        if peak is None:
            results.skip(f"gpu_mfu_b{batch}", f"{name} is not in the peak table; pass --peak-tflops")
        else:
            flops = training_flops(params, 1, cfg["num_hidden_layers"], cfg["hidden_size"], seq_len) * rate
            results.set(f"gpu_mfu_b{batch}", flops / (peak * 1e12), f"{used}; peak {peak:g} bf16 TFLOPs")
    cwd = work / "gpu_tune"
    cwd.mkdir()
    run = raycv_tune("spaces/smoke.yaml", [
        f"data.path={data_path}", "data.num_folds=5", "resources.gpus_per_fold=0.2", "resources.cpus_per_fold=0.5",
        "search.num_samples=1", "search.params={}", "scheduler.type=none", "run.name=gpu_tune"], cwd, timeout=240)
    used = "smoke.yaml, 5 folds sharing one GPU (gpus_per_fold 0.2), one trial"
    results.set("gpu_tune_5fold_wall_s", run.wall_s, used)
    results.set("gpu_tune_first_result_s", run.first("| cv_rmse_last "), used)


# ---------------------------------------------------------------- the command


def check_arguments(quick: bool, gpu: bool, out: str, data: str | None,
                    peak_tflops: float | None) -> tuple[list[str], Config | None]:
    """Every problem with bench's command line, one line each, before minutes of measuring; and the config of
    the space it measures (None where that is one of the problems: bad data is one line, exit 2)."""
    from raycv.preflight import output_problems, replaces_an_input

    problems = []
    if gpu and not torch.cuda.is_available():
        problems.append("--gpu: no CUDA GPU is visible to torch on this machine; run it on a GPU machine "
                        "(or drop --gpu for the CPU benchmark)")
    if peak_tflops is not None and not (math.isfinite(peak_tflops) and peak_tflops > 0):
        problems.append(f"--peak-tflops: expected the GPU's dense bf16 peak in TFLOP/s, a positive number, found "
                        f"{peak_tflops:g}; e.g. --peak-tflops 989 (an H100)")
    problems += output_problems("--out", out, example="bench.json")
    space = "smoke.yaml" if (quick or gpu) else "minilm_cpu.yaml"
    config = attempt(problems, lambda: load_config(space, [f"data.path={data}"] if data else []))
    problems += replaces_an_input("--out", Path(out), {"--data": config.data.path}) if config else []
    return problems, config


def bench(quick: bool = False, gpu: bool = False, out: str = "bench.json", data: str | None = None,
          peak_tflops: float | None = None) -> int:
    """Every argument checked first (one line per problem, exit 2), then the measurements."""
    problems, config = check_arguments(quick, gpu, out, data, peak_tflops)
    if problems:
        raise ConfigError(None, problems)
    data_path = str(Path(config.data.path).resolve())
    results = Results(GPU_KEYS if gpu else KEYS)
    started = time.perf_counter()
    mode = "gpu" if gpu else "quick" if quick else "full"
    say(f"{mode} run on {os.cpu_count()} CPU(s){', ' + torch.cuda.get_device_name() if gpu else ''}; "
        f"data {data_path}")
    with tempfile.TemporaryDirectory(prefix="raycv-bench-") as tmp:
        work = Path(tmp)
        if gpu:
            run_gpu(results, data_path, work, peak_tflops)
        else:
            sizes = Sizes.make(quick)
            measure_loops(results, sizes, data_path)
            smoke = measure_tune(results, sizes, data_path, work)
            measure_hf(results, sizes, data_path, work, smoke)
    say(f"done in {time.perf_counter() - started:.0f} s")
    print(results.table())
    write_text_atomic(Path(out), json.dumps(results.to_json(mode), indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # the HF side's own process: python -m raycv.bench hf SPEC_JSON
    if sys.argv[1:2] == ["hf"]:
        hf_search_main(json.loads(sys.argv[2]))
