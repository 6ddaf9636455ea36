"""Benchmark: training throughput of raycv's length-bucketed batches against fixed and dynamic padding.

    python tests/benchmarks/bench_batches.py [--csv ../shared/data/commonlit/train.csv] [--model minilm-l6] [--steps 12]

All three run on this machine in this run, on the same model, rows and batch size; the output is each
one's samples per second and its ratio to the baseline (fixed padding to max_length, what the StructBERT
fork does). Not a test: no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from raycv.data import bucketed_batches, collate, encode_folds, useful_token_fraction
from raycv.model import build_model, load_tokenizer, param_groups
from raycv.spaces import load_config

REPO = Path(__file__).resolve().parents[2]


def fixed_collate(tokens, index, pad_id, width):
    batch = collate(tokens, index, pad_id)
    pad = width - batch["input_ids"].shape[1]
    return {k: torch.nn.functional.pad(v, (0, pad), value=pad_id if k == "input_ids" else 0) for k, v in batch.items()}


def samples_per_second(model, optimizer, tokens, targets, batches, pad_id, width=None, steps=12) -> float:
    model.train()
    started, seen = None, 0
    for i, index in enumerate(batches[: steps + 2]):
        if i == 2:  # two warm-up steps
            started, seen = time.perf_counter(), 0
        batch = fixed_collate(tokens, index, pad_id, width) if width else collate(tokens, index, pad_id)
        loss = torch.nn.functional.mse_loss(model(**batch), targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(index)
    return seen / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(REPO.parent / "shared/data/commonlit/train.csv"))
    parser.add_argument("--model", default="minilm-l6", help="minilm-l6, or tiny for a quick look")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    space = "smoke.yaml" if args.model == "tiny" else "minilm_cpu.yaml"
    backbone = [] if args.model == "tiny" else [f"model.backbone.path={args.model}"]
    config = load_config(REPO / "search_spaces" / space, [f"data.path={args.csv}", "data.max_rows=null",
                                                          "model.max_length=256", *backbone])
    encoded = encode_folds(config, load_tokenizer(config.model))
    table, tokens, pad_id = encoded.table, encoded.tokens, encoded.pad_id
    targets = torch.tensor(table["target"].to_numpy(), dtype=torch.float32)
    lengths = np.array([len(t) for t in tokens])
    rng = np.random.default_rng(0)
    random_batches = [
        rng.permutation(len(tokens))[i : i + args.batch_size] for i in range(0, len(tokens), args.batch_size)
    ]
    schemes = {
        "fixed padding to 256 (baseline)": (random_batches, config.model.max_length),
        "dynamic padding, random batches": (random_batches, None),
        "length-bucketed batches (raycv)": (bucketed_batches(lengths, args.batch_size, np.random.default_rng(0)), None),
    }
    print(f"{args.model}, batch {args.batch_size}, {args.steps} timed steps each, {torch.get_num_threads()} threads")
    baseline = None
    for name, (batches, width) in schemes.items():
        model = build_model(config.model, seed=0)
        optimizer = torch.optim.AdamW(
            [{"params": g["params"], "lr": g["lr"]} for g in param_groups(model, 1e-5, 1.0, 0.0)]
        )
        rate = samples_per_second(model, optimizer, tokens, targets, batches, pad_id, width, args.steps)
        useful = lengths.sum() / (len(lengths) * width) if width else useful_token_fraction(lengths, batches)
        baseline = baseline or rate
        print(f"{name:34s} {rate:7.2f} samples/s  x{rate / baseline:4.2f}  useful tokens {useful:.3f}")


if __name__ == "__main__":
    main()
