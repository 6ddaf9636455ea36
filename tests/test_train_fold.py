"""One fold's fine-tuning, plain PyTorch on CPU: a tiny BERT on a stratified sample of the real data."""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import root_mean_squared_error

from raycv.config import TrainConfig
from raycv.data import encode_folds
from raycv.model import load_tokenizer
from raycv.progress import fold_line
from raycv.spaces import load_config
from raycv.train_fold import eval_steps, fold_seed, num_eval_points, split_fold, steps_per_epoch, train_fold

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def encoded(space_writer, tmp_path_factory):
    """The tiny space (450 stratified rows, 3 folds, max_length 128): config and its EncodedFolds."""
    config = load_config(space_writer(tmp_path_factory.mktemp("train_fold")))
    return config, encode_folds(config, load_tokenizer(config.model))


@pytest.fixture(scope="module")
def fold0(encoded):
    return split_fold(encoded[1], 0)


@pytest.fixture(scope="module")
def trained(encoded, fold0):
    """Six epochs of the tiny BERT at lr 3e-3 on fold 0, with every evaluation point recorded."""
    config = encoded[0]
    points = []
    result = train_fold(config, fold0, device=CPU, on_eval=lambda point, snapshot: points.append(point))
    return result, points


def test_split_fold_partitions_the_table(encoded, fold0):
    table, tokens = encoded[1].table, encoded[1].tokens
    assert (len(fold0.train_ids), len(fold0.valid_ids)) == (300, 150)
    assert set(fold0.valid_ids) == set(table["id"][table["fold"] == 0])
    assert set(fold0.train_ids) | set(fold0.valid_ids) == set(table["id"])
    assert not set(fold0.train_ids) & set(fold0.valid_ids)
    position = {row_id: i for i, row_id in enumerate(table["id"])}
    for ids, toks, targets in ((fold0.train_ids, fold0.train_tokens, fold0.train_targets),
                               (fold0.valid_ids, fold0.valid_tokens, fold0.valid_targets)):
        assert all(toks[k] == tokens[position[row_id]] for k, row_id in enumerate(ids))
        assert np.allclose(targets, table["target"].to_numpy()[[position[r] for r in ids]])
        assert targets.dtype == np.float32
    assert fold0.pad_id == encoded[1].pad_id == 0 and fold0.fold == 0


def test_training_beats_predicting_the_mean(trained, fold0):
    result, _ = trained
    mean_rmse = root_mean_squared_error(fold0.valid_targets, np.full(len(fold0.valid_ids), fold0.train_targets.mean()))
    best_rmse = root_mean_squared_error(result.targets, result.pred_best)
    last_rmse = root_mean_squared_error(result.targets, result.pred_last)

    assert mean_rmse == pytest.approx(1.05, abs=0.03)
    assert best_rmse < 0.9 * mean_rmse, (best_rmse, mean_rmse)
    assert last_rmse < 0.9 * mean_rmse, (last_rmse, mean_rmse)
    # The curve's numbers are the RMSEs of the returned predictions.
    assert result.best_rmse == pytest.approx(best_rmse, abs=1e-6)
    assert result.last_rmse == pytest.approx(last_rmse, abs=1e-6)
    assert best_rmse <= last_rmse


def test_evaluation_points_and_curve(trained, fold0):
    result, points = trained
    # 300 training rows, batch 16: 19 steps per epoch, 6 epochs, one evaluation per epoch.
    assert [row["step"] for row in result.curve] == [19, 38, 57, 76, 95, 114]
    assert [row["point"] for row in result.curve] == [1, 2, 3, 4, 5, 6]
    assert [row["epoch"] for row in result.curve] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert all(set(row) == {"point", "step", "epoch", "train_loss", "val_rmse"} for row in result.curve)
    assert all(np.isfinite(row["train_loss"]) and row["train_loss"] > 0 for row in result.curve)
    assert result.curve[-1]["train_loss"] < result.curve[0]["train_loss"]

    assert [p.index for p in points] == [1, 2, 3, 4, 5, 6]
    assert {(p.fold, p.num_points, p.total_steps) for p in points} == {(0, 6, 114)}
    assert [p.val_rmse for p in points] == [row["val_rmse"] for row in result.curve]
    assert [p.best_rmse for p in points] == list(np.minimum.accumulate([p.val_rmse for p in points]))
    for p in points:
        assert p.val_rmse == pytest.approx(root_mean_squared_error(fold0.valid_targets, p.preds), abs=1e-6)
    best = min(points, key=lambda p: p.val_rmse)
    assert np.array_equal(result.pred_best, best.preds)
    assert np.array_equal(result.pred_last, points[-1].preds)
    assert result.ids == fold0.valid_ids and np.array_equal(result.targets, fold0.valid_targets)

    predictions = result.predictions()
    assert list(predictions.columns) == ["id", "fold", "target", "pred_best", "pred_last"]
    assert len(predictions) == 150 and (predictions["fold"] == 0).all()


def test_progress_lines_have_a_fixed_format(trained):
    _, points = trained
    line = fold_line(points[2])
    pattern = (r"fold 0 \| point 3/6 \| step 57/114 \| epoch 3\.00 \| train_loss \d+\.\d{4} \| val_rmse \d\.\d{4} \| "
               r"best \d\.\d{4} \| \d+\.\d samples/s \| \d+ s")
    assert re.fullmatch(pattern, line), line
    assert fold_line(points[2], trial="7").startswith("trial 7 | fold 0 | point 3/6 |")


# ---------------------------------------------------------------- determinism and resuming


@pytest.fixture(scope="module")
def short_config(encoded):
    """Three epochs, two evaluations per epoch, dropout on: the RNG state matters when resuming."""
    return encoded[0].with_overrides({"train.epochs": 3, "train.evals_per_epoch": 2, "model.dropout": 0.1})


@pytest.fixture(scope="module")
def uninterrupted(short_config, fold0):
    return train_fold(short_config, fold0, device=CPU)


def same_result(a, b) -> bool:
    return (np.array_equal(a.pred_best, b.pred_best) and np.array_equal(a.pred_last, b.pred_last)
            and a.curve == b.curve and a.ids == b.ids)


def test_the_same_seed_gives_identical_predictions(short_config, fold0, uninterrupted):
    again = train_fold(short_config, fold0, device=CPU)
    assert [row["step"] for row in uninterrupted.curve] == [10, 19, 28, 38, 48, 57]
    assert same_result(uninterrupted, again)


def test_another_seed_gives_other_predictions_and_num_points_is_honoured(short_config, fold0, uninterrupted):
    other = train_fold(short_config.with_overrides({"train.seed": 7}), fold0, device=CPU, num_points=4)
    assert [row["step"] for row in other.curve] == eval_steps(57, 4) == [14, 28, 43, 57]
    assert not np.allclose(other.pred_last, uninterrupted.pred_last)


def test_a_run_resumed_from_a_snapshot_ends_like_an_uninterrupted_one(short_config, fold0, uninterrupted):
    class Stop(Exception):
        pass

    saved = {}

    def stop_after_point_3(point, snapshot):
        if point.index == 3:
            buffer = io.BytesIO()  # through bytes, as a checkpoint on disk would be
            torch.save(snapshot(), buffer)
            saved["state"] = buffer.getvalue()
            raise Stop

    with pytest.raises(Stop):
        train_fold(short_config, fold0, device=CPU, on_eval=stop_after_point_3)
    # weights_only: a fold state is tensors and plain types, so it loads without unpickling code.
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)
    assert state["step"] == 28 and len(state["curve"]) == 3  # mid-epoch: 19 steps per epoch
    assert state["curve"] == uninterrupted.curve[:3]

    seen = []
    resumed = train_fold(short_config, fold0, device=CPU, state=state, on_eval=lambda p, _: seen.append(p.index))

    assert seen == [4, 5, 6]
    assert same_result(resumed, uninterrupted)


def test_a_fold_that_diverges_stops_and_says_why(short_config, fold0):
    """Targets far beyond float32 make the loss infinite at once: the first point reports the reason and
    training stops there instead of running on NaN weights."""
    exploding = dataclasses.replace(fold0, train_targets=fold0.train_targets * np.float32(1e30))
    seen = []
    result = train_fold(short_config, exploding, device=CPU, on_eval=lambda point, _: seen.append(point))
    assert [point.index for point in seen] == [1] and len(result.curve) == 1
    assert seen[0].diverged == result.diverged
    assert result.diverged.startswith("fold 0 diverged at point 1 (step 10): train_loss ")


def test_micro_batches_give_the_same_gradient(encoded, fold0):
    """train.micro_batch_size accumulates a batch's gradient in parts: the same gradient and loss as the
    whole batch at once (dropout off, so both see the same network), with a part's activation memory."""
    from raycv.model import build_model
    from raycv.train_fold import backward

    config = encoded[0]
    index = np.arange(16)
    targets = torch.tensor(fold0.train_targets)
    grads, losses = [], []
    for micro in (16, 5):
        model = build_model(config.model, seed=3).eval()
        losses.append(backward(model, fold0.train_tokens, targets, index, fold0.pad_id, micro, CPU, None))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)


def test_on_eval_returning_true_stops_training(short_config, fold0):
    result = train_fold(short_config, fold0, device=CPU, on_eval=lambda point, _: point.index == 2)
    assert len(result.curve) == 2 and result.diverged is None


# ---------------------------------------------------------------- the schedule of evaluation points


@pytest.mark.parametrize("total, points", [(114, 6), (57, 6), (10, 3), (5, 5), (851, 24), (1000, 7), (3, 1)])
def test_eval_steps_are_evenly_spaced_and_end_at_the_last_step(total, points):
    steps = eval_steps(total, points)
    assert len(steps) == points and steps[-1] == total and steps[0] >= 1
    gaps = np.diff([0] + steps)
    assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1


def test_eval_steps_exact():
    assert eval_steps(114, 6) == [19, 38, 57, 76, 95, 114]
    assert eval_steps(10, 3) == [3, 7, 10]
    assert eval_steps(5, 5) == [1, 2, 3, 4, 5]


def test_num_eval_points_agree_for_folds_one_row_apart():
    # 2,834 rows in 5 folds train on 2,267 or 2,268 rows; sizes one row apart can also straddle a batch.
    for batch_size in (8, 16, 32):
        for evals_per_epoch in (1, 4, 8):
            train = TrainConfig(epochs=3, batch_size=batch_size, evals_per_epoch=evals_per_epoch)
            for rows in (2264, 2267, 300, 299):
                assert num_eval_points(train, rows) == num_eval_points(train, rows + 1) == 3 * evals_per_epoch
    train = TrainConfig(epochs=3, batch_size=8)  # default: 4 evaluations per epoch
    assert steps_per_epoch(2264, 8) != steps_per_epoch(2265, 8)
    assert num_eval_points(train, 2264) == num_eval_points(train, 2265) == 12


def test_num_eval_points_by_steps_and_its_cap():
    train = TrainConfig(epochs=2, batch_size=10, eval_every_n_steps=7)
    assert num_eval_points(train, 100) == 3  # 20 steps, one point every 7: ceil(20 / 7)
    tiny = TrainConfig(epochs=1, batch_size=16, evals_per_epoch=8)
    assert num_eval_points(tiny, 40) == 3  # never more points than steps


def test_fold_seeds_depend_on_the_seed_and_the_fold():
    seeds = {fold_seed(seed, fold) for seed in (0, 1, 42) for fold in range(5)}
    assert len(seeds) == 15
    assert fold_seed(42, 3) == fold_seed(42, 3)
