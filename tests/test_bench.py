"""`raycv bench`: the quick run prints and writes every key (values are never asserted: they are timings);
the pure parts (the alternating median, the FLOPs arithmetic, the GPU peak table) checked by hand."""

import json
import math

import pytest
import torch

from raycv.bench import (
    GPU_KEYS,
    KEYS,
    alternate,
    attention_flops_per_token,
    median_ratio,
    mfu,
    peak_bf16_tflops,
    training_flops,
)
from raycv.cli import main

from helpers import run_raycv

QUICK_LIMIT_S = 600
QUICK_SKIPS = {"asha_epoch_fraction", "asha_best_rmse_delta", "fold_epoch_vs_hf_tune"}


def test_alternate_swaps_the_order_each_repeat_and_pairs_each_side():
    calls = []

    def side(name, value):
        def run():
            calls.append(name)
            return value
        return run

    pairs = alternate(side("a", 3.0), side("b", 2.0), repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert pairs == [(3.0, 2.0)] * 3


def test_median_ratio_is_the_median_of_the_pairs_ratios():
    assert median_ratio([(1.0, 2.0), (9.0, 3.0), (2.0, 2.0)]) == 1.0
    assert median_ratio([(1.0, 4.0), (3.0, 4.0)]) == pytest.approx(0.5)


def test_training_flops_of_bert_large():
    # 6 FLOPs per parameter per token (forward 2, backward 4) plus 12 x layers x hidden x seq for attention.
    params, layers, hidden, seq = 302_000_000, 24, 1024, 256
    assert attention_flops_per_token(layers, hidden, seq) == 12 * 24 * 1024 * 256 == 75_497_472
    assert training_flops(params, 1000, layers, hidden, seq) == 1000 * (6 * 302_000_000 + 75_497_472)
    # one second of 100k tokens/s on a 989-TFLOPs GPU
    assert mfu(training_flops(params, 100_000, layers, hidden, seq), 1.0, 989) == pytest.approx(
        100_000 * (1_812_000_000 + 75_497_472) / 989e12)


def test_peak_table_matches_device_names():
    assert peak_bf16_tflops("NVIDIA H200") == 989
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756  # the longest matching name wins
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert peak_bf16_tflops("NVIDIA L4") == 121
    assert peak_bf16_tflops("NVIDIA L40S") == 362
    assert peak_bf16_tflops("Some Unknown GPU") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_without_a_gpu_exits_2_with_one_line(capsys, tmp_path, train_csv):
    assert main(["bench", "--gpu", "--out", str(tmp_path / "bench.json"), "--data", str(train_csv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raycv: error: --gpu: no CUDA GPU") and err.count("\n") == 1
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.parametrize("peak", ["nan", "-1", "0", "inf"])
def test_bad_bench_arguments_are_all_refused_before_measuring(peak, capsys, tmp_path):
    """A full bench measures for 17 minutes before it writes --out: a bad --out, --peak-tflops or data is
    refused first, every problem on its own line."""
    argv = ["bench", "--out", str(tmp_path), "--peak-tflops", peak, "--data", str(tmp_path / "none.csv")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("raycv: error: --peak-tflops: expected the GPU's dense bf16 peak in TFLOP/s")
    assert lines[1] == (f"raycv: error: --out: {tmp_path} is a directory; name a file in it, "
                        f"e.g. --out {tmp_path / 'bench.json'}")  # bench writes JSON
    assert "data.path: file not found" in lines[2]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ray
@pytest.mark.timeout(QUICK_LIMIT_S + 60)
def test_quick_bench_prints_and_writes_every_key(tmp_path, train_csv):
    proc = run_raycv(["bench", "--quick", "--data", str(train_csv), "--out", "bench.json"], cwd=tmp_path,
                     timeout=QUICK_LIMIT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    table = [line for line in proc.stdout.splitlines() if line.startswith("| `")]
    assert [line.split("`")[1] for line in table] == list(KEYS)
    assert "| key | value | target | what it compares |" in proc.stdout
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["mode"] == "quick"
    assert list(written["values"]) == list(KEYS) and list(written["details"]) == list(KEYS)
    values = written["values"]
    # --quick leaves exactly these to the full bench (two more whole searches), each null with its reason
    skipped = {key for key, value in values.items() if value is None}
    assert skipped == QUICK_SKIPS, skipped
    assert all("full bench only" in written["details"][key]["reason"] for key in skipped)
    for key in set(KEYS) - QUICK_SKIPS:
        assert isinstance(values[key], (int, float)) and math.isfinite(values[key]), key
    # What each figure is, its sanity (never its speed: timings vary with the machine and its load)
    for key in ("useful_token_fraction", "report_overhead_fraction", "report_overhead_fraction_measured"):
        assert 0 < values[key] <= 1, key
    for key in ("loop_vs_bare_throughput", "bucketed_vs_fixed_padding_time", "first_result_s", "report_fixed_cost_s",
                "peak_rss_mb_per_fold_worker", "rss_mb_first_point", "rss_mb_last_point"):
        assert values[key] > 0, key
    assert values["report_per_point_cost_s"] >= 0
    assert values["rss_mb_first_point"] <= values["peak_rss_mb_per_fold_worker"]
    assert values["rss_mb_last_point"] <= values["peak_rss_mb_per_fold_worker"]
    assert not set(GPU_KEYS) & set(values)
