"""The real CommonLit CSV -> checked rows -> the fork's folds -> token ids -> length-bucketed batches."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.model_selection import StratifiedKFold

from raycv import RaycvError
from raycv.config import DataConfig, ModelConfig
from raycv.data import (
    DataError,
    assign_folds,
    bucketed_batches,
    collate,
    encode_folds,
    load_folds,
    padded_width,
    read_rows,
    sample_rows,
    sorted_batches,
    tokenize,
    useful_token_fraction,
)
from raycv.model import load_tokenizer
from raycv.spaces import load_config

from helpers import SPACES_DIR

NUM_ROWS = 2834


@pytest.fixture(scope="module")
def rows(train_csv) -> pd.DataFrame:
    return read_rows(DataConfig(path=str(train_csv)))


@pytest.fixture(scope="module")
def folds(rows) -> pd.DataFrame:
    return assign_folds(rows, num_folds=5, seed=1000)


def overall_bins(target: pd.Series) -> np.ndarray:
    """The fork's bins, computed here from scratch: pd.cut into floor(1 + log2 N) equal-width bins."""
    return pd.cut(target, bins=int(math.floor(1 + math.log2(len(target)))), labels=False).to_numpy()


# ---------------------------------------------------------------- reading


def test_read_rows_gives_id_text_target(rows, train_csv):
    raw = pd.read_csv(train_csv)
    assert list(rows.columns) == ["id", "text", "target"]
    assert len(rows) == NUM_ROWS
    assert rows["id"].tolist() == raw["id"].tolist()
    assert rows["text"].tolist() == raw["excerpt"].tolist()
    assert np.array_equal(rows["target"].to_numpy(), raw["target"].to_numpy())
    assert rows["target"].mean() == pytest.approx(-0.959, abs=5e-4)
    assert rows["target"].std() == pytest.approx(1.034, abs=5e-4)


# ---------------------------------------------------------------- folds


def test_fold_sizes_are_the_forks(folds):
    assert folds["fold"].value_counts().sort_index().tolist() == [567, 567, 567, 567, 566]


def test_every_row_is_in_exactly_one_fold(folds, rows):
    assert len(folds) == NUM_ROWS
    assert folds["id"].is_unique
    assert set(folds["id"]) == set(rows["id"])
    assert set(folds["fold"]) == {0, 1, 2, 3, 4}
    # Each id keeps its own text and target through the shuffle.
    merged = folds.merge(rows, on="id", suffixes=("", "_orig"))
    assert (merged["text"] == merged["text_orig"]).all() and (merged["target"] == merged["target_orig"]).all()


def test_folds_follow_the_forks_recipe_exactly(folds, rows):
    shuffled = rows.sample(frac=1, random_state=1000).reset_index(drop=True)
    bins = overall_bins(shuffled["target"])
    assert bins.max() + 1 == 12  # floor(1 + log2 2834)
    expected = np.full(len(shuffled), -1)
    for fold, (_, valid) in enumerate(StratifiedKFold(n_splits=5).split(shuffled, bins)):
        expected[valid] = fold
    assert folds["id"].tolist() == shuffled["id"].tolist()  # in the shuffled order
    assert folds["fold"].tolist() == expected.tolist()


def test_folds_are_stratified_on_the_target(folds):
    bins = overall_bins(folds["target"])
    overall = np.bincount(bins, minlength=12)
    for fold in range(5):
        in_fold = np.bincount(bins[folds["fold"].to_numpy() == fold], minlength=12)
        assert np.abs(in_fold - overall / 5).max() <= 1, (fold, in_fold, overall / 5)
    means = folds.groupby("fold")["target"].mean()
    assert (means - folds["target"].mean()).abs().max() < 0.05


def test_different_seeds_give_different_folds(rows, folds):
    other = assign_folds(rows, num_folds=5, seed=42).set_index("id")["fold"]
    same = (folds.set_index("id")["fold"] == other.loc[folds["id"]]).mean()
    assert same < 0.5  # about 1/5 by chance
    again = assign_folds(rows, num_folds=5, seed=1000)
    assert again.equals(folds)


def test_num_bins_can_be_set(rows):
    table = assign_folds(rows, num_folds=4, seed=7, num_bins=3)
    bins = pd.cut(table["target"], bins=3, labels=False).to_numpy()
    overall = np.bincount(bins)
    for fold in range(4):
        assert np.abs(np.bincount(bins[table["fold"].to_numpy() == fold], minlength=3) - overall / 4).max() <= 1


def test_max_rows_gives_a_stratified_deterministic_sample(train_csv, rows):
    data = DataConfig(path=str(train_csv), num_folds=3, fold_seed=1000, max_rows=450)

    table = load_folds(data)

    assert len(table) == 450 and table["id"].is_unique
    assert set(table["id"]) <= set(rows["id"])
    assert table["fold"].value_counts().sort_index().tolist() == [150, 150, 150]
    assert table["target"].mean() == pytest.approx(rows["target"].mean(), abs=0.03)
    assert table["target"].std() == pytest.approx(rows["target"].std(), abs=0.03)
    # Stratified on the full data's bins: each bin holds its share of the sample, within one row.
    bins = overall_bins(rows["target"])
    in_sample = np.bincount(bins[rows["id"].isin(table["id"]).to_numpy()], minlength=12)
    assert np.abs(in_sample - np.bincount(bins) * 450 / NUM_ROWS).max() < 1
    # Not the first rows, and the same every time; another seed draws another sample.
    assert set(table["id"]) != set(rows["id"][:450])
    assert load_folds(data).equals(table)
    other = load_folds(data.model_copy(update={"fold_seed": 1}))
    assert len(other) == 450 and set(other["id"]) != set(table["id"])


def test_sample_rows_is_a_no_op_when_max_rows_covers_the_data(rows):
    assert sample_rows(rows, NUM_ROWS, seed=0) is rows
    assert len(sample_rows(rows, 100, seed=0)) == 100


# ---------------------------------------------------------------- refusing bad CSVs


@pytest.fixture(scope="module")
def small_csv(train_csv):
    """write(path, edit) -> DataConfig for the first 30 real rows after edit(df)."""
    head = pd.read_csv(train_csv, nrows=30)

    def write(path, edit=lambda df: df, **data):
        df = edit(head.copy())
        df.to_csv(path, index=False)
        return DataConfig(path=str(path), **data), df

    return write


def refusal(data: DataConfig) -> str:
    with pytest.raises(RaycvError) as info:
        load_folds(data)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{data.path}: ")
    return message


def test_a_clean_small_csv_loads(small_csv, tmp_path):
    data, df = small_csv(tmp_path / "ok.csv", num_folds=3, num_bins=2)
    table = load_folds(data)
    assert sorted(table["id"]) == sorted(df["id"])
    assert table["fold"].value_counts().tolist() == [10, 10, 10]


def test_a_missing_column_is_refused(small_csv, tmp_path):
    data, _ = small_csv(tmp_path / "a.csv", lambda df: df.drop(columns=["target"]))
    message = refusal(data)
    assert (
        "missing column(s) target (data.target_column); found id, url_legal, license, excerpt, standard_error"
        in message
    )


def test_renamed_columns_are_read_through_the_config(small_csv, tmp_path):
    data, df = small_csv(tmp_path / "b.csv", lambda df: df.rename(columns={"excerpt": "passage", "target": "score"}),
                         text_column="passage", target_column="score", num_folds=3)
    rows = read_rows(data)
    assert rows["text"].tolist() == df["passage"].tolist() and rows["target"].tolist() == df["score"].tolist()


def set_cell(column, row, value):
    def edit(df):
        df[column] = df[column].astype(object)
        df.loc[row, column] = value
        return df

    return edit


@pytest.mark.parametrize(
    "column, value, what",
    [
        ("excerpt", "", "an empty or non-text excerpt"),
        ("excerpt", "   ", "an empty or non-text excerpt"),
        ("target", np.nan, "a missing, non-numeric or non-finite target"),
        ("target", "hard", "a missing, non-numeric or non-finite target"),
        ("target", "inf", "a missing, non-numeric or non-finite target"),
        ("target", "9" * 400, "a missing, non-numeric or non-finite target"),  # pandas raised OverflowError
        ("target", 10**400, "a missing, non-numeric or non-finite target"),
        ("target", "True", "a missing, non-numeric or non-finite target"),
        # training's targets are 32-bit floats: 1e300 became inf (a "diverged" fold), ±1e308 a traceback in pd.cut
        ("target", "1e300", "a target beyond +/-3.4e+38, more than training's 32-bit floats hold (scale the column "
                            "down)"),
        ("target", "-1.7e308", "a target beyond +/-3.4e+38, more than training's 32-bit floats hold (scale the "
                               "column down)"),
    ],
)
def test_bad_cells_are_refused_naming_the_row(small_csv, tmp_path, column, value, what):
    data, df = small_csv(tmp_path / "c.csv", set_cell(column, 7, value))
    assert refusal(data) == f"{data.path}: 1 row(s) with {what}: {df['id'][7]}"


def test_a_target_column_of_booleans_is_refused_not_read_as_ones_and_zeros(small_csv, tmp_path):
    """pandas reads a column of True/False as booleans, and to_numeric made them 1.0 and 0.0: trained on."""
    data, df = small_csv(tmp_path / "b.csv", lambda df: df.assign(target=[True, False] * (len(df) // 2) + [True] *
                                                                   (len(df) % 2)))
    assert refusal(data).startswith(f"{data.path}: {len(df)} row(s) with a missing, non-numeric or non-finite target: ")


def test_targets_whose_range_overflows_are_refused_not_a_traceback(small_csv, tmp_path):
    """±1e308 are finite, but their range is not: pd.cut's bins raised "Bin edges must be unique"."""
    data, df = small_csv(tmp_path / "h.csv", lambda df: df.assign(target=[1e308, -1e308] * (len(df) // 2) + [0.0] *
                                                                   (len(df) % 2)))
    assert "row(s) with a target beyond +/-3.4e+38" in refusal(data)


def test_duplicate_ids_are_refused_naming_them(small_csv, tmp_path):
    data, df = small_csv(tmp_path / "d.csv", lambda df: df.assign(id=df["id"].where(df.index != 12, df["id"][3])))
    assert refusal(data) == f"{data.path}: 2 row(s) with a duplicate id: {df['id'][3]}, {df['id'][3]}"


def test_an_empty_id_is_refused_naming_the_line(small_csv, tmp_path):
    data, _ = small_csv(tmp_path / "e.csv", set_cell("id", 4, np.nan))
    assert refusal(data) == f"{data.path}: 1 row(s) with an empty id: line 6"  # header is line 1


def test_many_bad_rows_are_counted_not_all_listed(small_csv, tmp_path):
    data, df = small_csv(tmp_path / "f.csv", lambda df: df.assign(target=["x"] * 8 + list(df["target"][8:])))
    assert refusal(data) == (
        f"{data.path}: 8 row(s) with a missing, non-numeric or non-finite target: " + ", ".join(df["id"][:5])
        + " and 3 more"
    )


def test_too_few_rows_for_the_folds_are_refused(small_csv, tmp_path):
    data, _ = small_csv(tmp_path / "g.csv", lambda df: df.head(9), num_folds=5)
    assert refusal(data) == (f"{data.path}: data.num_folds: 5 folds need at least 10 rows, the data has 9; "
                             "lower data.num_folds or raise data.max_rows")


@pytest.mark.parametrize("settings, expected", [
    # Issue 16: each of these was a scikit-learn traceback, raised while the rows were being cut.
    ({"num_bins": 5000, "max_rows": 450},
     ["data.max_rows: a sample of 450 rows cannot hold one row of each of the 650 target bins it is stratified on; "
      "raise data.max_rows to 650 or more, or lower data.num_bins",
      "data.num_bins: 5000 target bins for 450 rows in 5 folds leave fewer rows per bin than folds; use at most 90 "
      "(or leave it out: floor(1 + log2 N) = 9)"]),
    ({"max_rows": 2830},
     ["data.max_rows: 2830 of the data's 2834 rows leaves 4 out, fewer than the 12 target bins the sample is "
      "stratified on; use every row (data.max_rows=null) or at most 2822"]),
    ({"max_rows": 20, "num_bins": 12, "num_folds": 3},
     ["data.num_bins: 12 target bins for 20 rows in 3 folds leave fewer rows per bin than folds; use at most 6 "
      "(or leave it out: floor(1 + log2 N) = 5)"]),
    ({"num_bins": 3000},
     ["data.num_bins: 3000 target bins for 2834 rows in 5 folds leave fewer rows per bin than folds; use at most "
      "566 (or leave it out: floor(1 + log2 N) = 12)"]),
], ids=["bins-beyond-the-sample", "max-rows-leaves-too-few-out", "bins-beyond-rows-per-fold", "bins-beyond-rows"])
def test_data_dependent_settings_are_checked_against_the_data_before_cutting(train_csv, settings, expected):
    data = DataConfig(path=str(train_csv), **settings)
    with pytest.raises(DataError) as info:
        load_folds(data)
    assert info.value.lines() == [f"{train_csv}: {line}" for line in expected]


def test_a_stratified_split_with_a_bin_smaller_than_the_folds_is_silent(train_csv, recwarn):
    """Kaggle's rows in the fork's 12 equal-width bins: the extreme bins hold fewer rows than folds, as in the
    fork; scikit-learn's warning about it is expected and not shown."""
    table = load_folds(DataConfig(path=str(train_csv), num_folds=5))
    assert table["fold"].value_counts().tolist() == [567, 567, 567, 567, 566]
    assert not [w for w in recwarn if "least populated" in str(w.message)]


def test_every_kind_of_bad_row_at_once(small_csv, tmp_path):
    data, df = small_csv(tmp_path / "k.csv", lambda df: df.assign(id=[""] + list(df["id"][1:29]) + [df["id"][1]],
                                                                  excerpt=["  "] * 2 + list(df["excerpt"][2:])))
    with pytest.raises(DataError) as info:
        load_folds(data)
    assert info.value.problems == [
        "1 row(s) with an empty id: line 2",
        f"2 row(s) with a duplicate id: {df['id'][1]}, {df['id'][1]}",
        f"2 row(s) with an empty or non-text excerpt: line 2, {df['id'][1]}",
    ]


@pytest.mark.parametrize("head, fix", [
    (b"\x1f\x8b\x08\x00", "it is gzip-compressed; decompress it (gunzip) or name it .csv.gz"),
    (b"PK\x03\x04\x14\x00", "it is a zip archive (an Excel .xlsx workbook is one); save or extract it as a CSV file"),
    ("id,excerpt,target\n".encode("utf-16"), "it is UTF-16 text; save it as UTF-8"),
    (b"id,excerpt,target\nx,caf\xe9,1\n", "not UTF-8 text ('utf-8' codec can't decode byte 0xe9 in position 3: "
                                         "unexpected end of data); save it as UTF-8"),
])
def test_a_csv_that_is_no_text_says_what_it_is_and_the_fix(tmp_path, head, fix):
    """A gzip'd train.csv or an .xlsx said only "'utf-8' codec can't decode byte 0x8b in position 1"."""
    path = tmp_path / "train.csv"
    path.write_bytes(head + (bytes(range(128, 256)) * 4 if fix.startswith("it is") else b""))
    assert refusal(DataConfig(path=str(path))) == f"{path}: cannot read as CSV: {fix}"


def test_a_file_that_is_not_csv_is_refused(tmp_path):
    path = tmp_path / "h.csv"
    path.write_bytes(b"")
    assert refusal(DataConfig(path=str(path))).startswith(f"{path}: cannot read as CSV")


# ---------------------------------------------------------------- tokens and batches


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())  # the packaged MiniLM-L6: uncased BERT WordPiece


@pytest.fixture(scope="module")
def lengths(rows, tokenizer) -> np.ndarray:
    ids = tokenize(rows["text"].tolist(), tokenizer, max_length=256)
    return np.array([len(row) for row in ids])


def test_tokenize_truncates_and_does_not_pad(rows, tokenizer, lengths):
    ids = tokenize(rows["text"][:50].tolist(), tokenizer, max_length=256)
    assert all(row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id for row in ids)
    assert all(tokenizer.pad_token_id not in row for row in ids)
    assert lengths.max() == 256 and lengths.min() > 100
    assert lengths.mean() == pytest.approx(216.7, abs=0.5)  # NOTES.md: 217 on average, 6.3% over 256 before truncation
    full = np.array([len(row) for row in tokenizer(rows["text"].tolist())["input_ids"]])
    assert (full > 256).mean() == pytest.approx(0.063, abs=0.001)
    assert np.array_equal(lengths, np.minimum(full, 256))


def test_bucketed_batches_cover_every_row_once_with_little_padding(lengths):
    batches = bucketed_batches(lengths, batch_size=8, rng=np.random.default_rng(0))

    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(NUM_ROWS))
    # 2,834 = 354 x 8 + 2; buckets of 800 rows split evenly, so one short batch.
    assert Counter(len(b) for b in batches) == {8: 354, 2: 1}
    bucketed = useful_token_fraction(lengths, batches)
    fixed = lengths.sum() / (NUM_ROWS * 256)
    assert bucketed > 0.99
    assert fixed == pytest.approx(0.847, abs=0.001)
    # Random batches with dynamic padding sit in between.
    order = np.random.default_rng(0).permutation(NUM_ROWS)
    random = useful_token_fraction(lengths, [order[i : i + 8] for i in range(0, NUM_ROWS, 8)])
    assert fixed < random < 0.9 < bucketed


def test_bucketed_batches_are_shuffled_but_reproducible(lengths):
    first = bucketed_batches(lengths, 16, np.random.default_rng(5))
    again = bucketed_batches(lengths, 16, np.random.default_rng(5))
    other = bucketed_batches(lengths, 16, np.random.default_rng(6))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=False)) and len(first) == len(again)
    assert [b.tolist() for b in first] != [b.tolist() for b in other]
    # Not simply sorted by length: batch lengths go up and down.
    longest = np.array([lengths[b].max() for b in first])
    assert (np.diff(longest) > 0).any() and (np.diff(longest) < 0).any()


def test_bucketed_batches_with_small_buckets(lengths):
    batches = bucketed_batches(lengths[:100], batch_size=8, rng=np.random.default_rng(1), bucket_batches=2)
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(100))
    assert Counter(len(b) for b in batches) == {8: 12, 4: 1}  # buckets of 16 rows: 6 full + a last bucket of 4


def test_sorted_batches_cover_all_rows_in_length_order(lengths):
    batches = sorted_batches(lengths, 32)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(NUM_ROWS))
    assert (np.diff(lengths[flat]) >= 0).all()
    assert [len(b) for b in batches] == [32] * 88 + [18]
    assert useful_token_fraction(lengths, batches) > 0.99


def test_useful_token_fraction_by_hand():
    lengths = np.array([1, 2, 3, 4])
    assert useful_token_fraction(lengths, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(10 / 12)
    assert useful_token_fraction(lengths, [np.array([0, 3]), np.array([1, 2])]) == pytest.approx(10 / 14)


def test_collate_pads_with_the_pad_id_and_masks_the_real_tokens():
    tokens = [[101, 5, 6, 102], [101, 102], [101, 7, 8, 9, 10, 102], [101, 11, 102]]
    for pad_id in (0, 99):
        batch = collate(tokens, np.array([3, 0, 1]), pad_id)
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
        assert batch["input_ids"].tolist() == [
            [101, 11, 102, pad_id], [101, 5, 6, 102], [101, 102, pad_id, pad_id],
        ]
        assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
        assert batch["token_type_ids"].tolist() == [[0] * 4] * 3
        assert all(t.dtype == torch.long for t in batch.values())


def test_padded_width_rounds_up_but_not_past_max_length():
    assert [padded_width(n, 8) for n in (1, 8, 9, 250)] == [8, 8, 16, 256]
    assert padded_width(250, 8, cap=252) == 252  # rounded to 256, capped at max_length
    assert padded_width(253, 8, cap=253) == 253  # a row of max_length tokens is never cut
    assert [padded_width(n, 1) for n in (1, 9, 250)] == [1, 9, 250]


def test_collate_rounds_the_width_up_and_masks_only_the_real_tokens():
    tokens = [[101, 5, 6, 102], [101, 102], [101, 7, 8, 9, 10, 102]]
    batch = collate(tokens, np.array([0, 1]), 0, multiple=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 2 + [0] * 6]
    assert collate(tokens, np.array([2]), 0, multiple=8, cap=6)["input_ids"].shape == (1, 6)
    lengths = np.array([1, 2, 3, 4])
    assert useful_token_fraction(lengths, [np.array([0, 1]), np.array([2, 3])], multiple=4) == pytest.approx(10 / 16)


def test_collate_on_real_batches(rows, tokenizer):
    ids = tokenize(rows["text"][:40].tolist(), tokenizer, max_length=128)
    lengths = np.array([len(t) for t in ids])
    for index in bucketed_batches(lengths, 8, np.random.default_rng(0)):
        batch = collate(ids, index, tokenizer.pad_token_id)
        assert batch["input_ids"].shape == (len(index), lengths[index].max())
        assert batch["attention_mask"].sum(1).tolist() == lengths[index].tolist()
        for row, i in enumerate(index):
            assert batch["input_ids"][row, : lengths[i]].tolist() == ids[i]
            assert (batch["input_ids"][row, lengths[i] :] == tokenizer.pad_token_id).all()


def test_encode_folds_keeps_tokens_in_table_order(train_csv):
    config = load_config(
        SPACES_DIR / "smoke.yaml", [f"data.path={train_csv}", "data.max_rows=450", "model.max_length=128"]
    )

    tokenizer = load_tokenizer(config.model)
    encoded = encode_folds(config, tokenizer)
    table, tokens = encoded.table, encoded.tokens

    assert len(table) == len(tokens) == 450
    assert encoded.pad_id == 0
    assert list(encoded.for_workers().table.columns) == ["id", "target", "fold"]  # no texts shipped to workers
    for i in (0, 17, 449):
        assert tokens[i] == tokenizer(table["text"][i], truncation=True, max_length=128)["input_ids"]
    assert max(len(t) for t in tokens) == 128
