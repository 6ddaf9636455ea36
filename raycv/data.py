"""CommonLit CSV -> checked rows -> CV folds -> token ids -> length-bucketed batches.

    raycv folds search_spaces/base.yaml --out folds.csv

Folds follow the StructBERT CommonLit fork's recipe exactly: shuffle with `DataFrame.sample(frac=1,
random_state=seed)`, bin the target with `pd.cut` into floor(1 + log2 N) bins, `StratifiedKFold(k)`
without shuffle on the bins. With seed 1000 and k 5 on Kaggle's 2,834 rows: 567/567/567/567/566.
"""

from __future__ import annotations

import lzma
import tarfile
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from raycv import RaycvError, first_line
from raycv.config import DataConfig, default_num_bins

REQUIRED = ("id_column", "text_column", "target_column")


class DataError(RaycvError):
    """Every problem found in one data file (bad rows, settings the rows cannot take): one line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(" | ".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.source}: {problem}" for problem in self.problems]


def read_rows(data: DataConfig) -> pd.DataFrame:
    """The CSV as columns `id`, `text`, `target`; refuses bad rows, naming their ids."""
    return _read_csv(data, with_target=True)


def read_texts(data: DataConfig) -> pd.DataFrame:
    """New texts to score (Kaggle's test.csv): columns `id`, `text`; refuses bad rows, naming their ids."""
    return _read_csv(data, with_target=False)


def _read_csv(data: DataConfig, with_target: bool) -> pd.DataFrame:
    try:
        raw = pd.read_csv(data.path, dtype={data.id_column: str}, keep_default_na=True)
    except UnicodeDecodeError as exc:
        raise RaycvError(f"{data.path}: cannot read as CSV: {not_text(data.path, exc)}") from None
    except (OSError, EOFError, ValueError, ImportError, zipfile.BadZipFile, tarfile.TarError, lzma.LZMAError) as exc:
        # pandas' parser errors are ValueErrors; a name ending .gz, .zip, .tar, .xz, .zst is decompressed as
        # it is read, and a truncated, corrupt or many-file archive (or zstandard not installed) raised these
        raise RaycvError(f"{data.path}: cannot read as CSV ({first_line(exc)})") from None
    wanted = {getattr(data, key): key for key in (REQUIRED if with_target else REQUIRED[:2])}
    missing = [f"{name} (data.{key})" for name, key in wanted.items() if name not in raw.columns]
    if missing:
        raise RaycvError(
            f"{data.path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, raw.columns))}"
        )
    rows = pd.DataFrame(
        {
            "id": raw[data.id_column].astype("string"),
            "text": raw[data.text_column],
        }
    )
    if with_target:
        rows["target"] = numbers(raw[data.target_column])
    row_names = rows["id"].fillna("").where(
        rows["id"].notna() & (rows["id"] != ""), "line " + (raw.index + 2).astype(str)
    )

    problems = []  # every kind of bad row at once, one line each

    def refuse(mask: pd.Series, what: str):
        if mask.any():
            names = row_names[mask].tolist()
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{mask.sum()} row(s) with {what}: {shown}")

    empty_id = rows["id"].isna() | (rows["id"].str.strip() == "")
    refuse(empty_id, f"an empty {data.id_column}")
    refuse(rows["id"].duplicated(keep=False) & ~empty_id, f"a duplicate {data.id_column}")
    is_text = rows["text"].map(lambda value: isinstance(value, str) and value.strip() != "")
    refuse(~is_text, f"an empty or non-text {data.text_column}")
    rows["id"] = rows["id"].astype(str)
    if with_target:
        target = rows["target"].to_numpy(dtype=float, na_value=np.nan)
        refuse(~np.isfinite(target), f"a missing, non-numeric or non-finite {data.target_column}")
        with np.errstate(invalid="ignore"):
            refuse(np.isfinite(target) & (np.abs(target) > TARGET_MAX),
                   f"a {data.target_column} beyond +/-{TARGET_MAX:.3g}, more than training's 32-bit floats hold "
                   "(scale the column down)")
        rows["target"] = rows["target"].astype(float)
    if problems:
        raise DataError(str(data.path), problems)
    if rows.empty:  # a header alone: nothing to score or to train on
        raise RaycvError(f"{data.path}: no rows under the header; nothing to {'train on' if with_target else 'score'}")
    return rows


# The largest target a fold trains on: its targets are 32-bit floats (and the loss their squares). A target of
# 1e300 became inf in training (a "diverged" fold and a numpy warning); ±1e308 overflowed the target bins' range
# and ended `raycv folds` in pandas' traceback.
TARGET_MAX = float(np.finfo(np.float32).max)


def numbers(column: pd.Series) -> pd.Series:
    """A CSV column as floats, NaN where a cell is no number: True/False (pandas reads a column of them as
    booleans, which to_numeric takes for 1 and 0) and an integer of hundreds of digits (to_numeric raised
    OverflowError) included."""
    if pd.api.types.is_bool_dtype(column):
        return pd.Series(np.nan, index=column.index, dtype=float)
    try:
        return pd.to_numeric(column, errors="coerce").astype(float)
    except (OverflowError, TypeError, ValueError):
        return column.map(_number).astype(float)


def _number(value) -> float:
    if isinstance(value, bool):
        return np.nan
    try:
        return float(value)
    except (OverflowError, TypeError, ValueError):
        return np.nan


# What a file that is no UTF-8 text starts with, by its first bytes, and what to do with it.
NOT_TEXT = {
    b"\x1f\x8b": "it is gzip-compressed; decompress it (gunzip) or name it .csv.gz",
    b"PK\x03\x04": "it is a zip archive (an Excel .xlsx workbook is one); save or extract it as a CSV file",
    b"BZh": "it is bzip2-compressed; decompress it (bunzip2) or name it .csv.bz2",
    b"\xfd7zXZ\x00": "it is xz-compressed; decompress it (unxz) or name it .csv.xz",
    b"\x28\xb5\x2f\xfd": "it is zstd-compressed; decompress it (unzstd) or name it .csv.zst",
    b"\xff\xfe": "it is UTF-16 text; save it as UTF-8",
    b"\xfe\xff": "it is UTF-16 text; save it as UTF-8",
    b"\xd0\xcf\x11\xe0": "it is an old Excel (.xls) or other Office file; save it as a CSV file",
}


def not_text(path, exc: UnicodeDecodeError) -> str:
    """Why a CSV pandas could not decode is no text, and the fix: a compressed file or a workbook by its
    first bytes (a gzip'd file named .csv said only "'utf-8' codec can't decode byte 0x8b in position 1"),
    else the first byte that is no UTF-8."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        head = b""
    known = next((fix for magic, fix in NOT_TEXT.items() if head.startswith(magic)), None)
    return known or f"not UTF-8 text ({first_line(exc)}); save it as UTF-8"


def check_fold_settings(rows: pd.DataFrame, data: DataConfig) -> list[str]:
    """data.max_rows, data.num_folds and data.num_bins against the rows read, before anything is cut: the
    stratified sample needs a row of every target bin in it and out of it, and each fold about a row of
    every bin (so at most rows / num_folds bins)."""
    problems, total = [], len(rows)
    kept = total if data.max_rows is None else min(data.max_rows, total)
    if data.max_rows is not None and data.max_rows < total:
        bins = len(np.unique(sample_bins(rows["target"], data.num_bins)))
        if data.max_rows < bins:
            problems.append(f"data.max_rows: a sample of {data.max_rows} rows cannot hold one row of each of the "
                            f"{bins} target bins it is stratified on; raise data.max_rows to {bins} or more, or "
                            "lower data.num_bins")
        elif total - data.max_rows < bins:
            problems.append(f"data.max_rows: {data.max_rows} of the data's {total} rows leaves {total - data.max_rows} "
                            f"out, fewer than the {bins} target bins the sample is stratified on; use every row "
                            f"(data.max_rows=null) or at most {total - bins}")
    if kept < 2 * data.num_folds:
        problems.append(f"data.num_folds: {data.num_folds} folds need at least {2 * data.num_folds} rows, the data "
                        f"has {kept}; lower data.num_folds or raise data.max_rows")
    elif data.num_bins is not None and data.num_bins > kept // data.num_folds:
        problems.append(f"data.num_bins: {data.num_bins} target bins for {kept} rows in {data.num_folds} folds "
                        f"leave fewer rows per bin than folds; use at most {kept // data.num_folds} (or leave it "
                        f"out: floor(1 + log2 N) = {default_num_bins(kept)})")
    elif kept == total:
        counts = np.bincount(target_bins(rows["target"], data.num_bins))
        if counts.max() < data.num_folds:
            problems.append(f"data.num_folds: {data.num_folds} stratified folds need a target bin of at least "
                            f"{data.num_folds} rows; the largest of the {len(counts)} bins holds {counts.max()}; "
                            "lower data.num_folds or data.num_bins")
    return problems


def target_bins(target: pd.Series, num_bins: int | None) -> np.ndarray:
    return pd.cut(target, bins=num_bins or default_num_bins(len(target)), labels=False).to_numpy()


def sample_bins(target: pd.Series, num_bins: int | None) -> np.ndarray:
    """The target bins a stratified sample keeps the shares of: bins too small to split (one row) are
    merged into the largest, so stratification stays possible."""
    bins = target_bins(target, num_bins)
    counts = np.bincount(bins)
    return np.where(counts[bins] < 2, np.argmax(counts), bins)


def sample_rows(rows: pd.DataFrame, max_rows: int, seed: int, num_bins: int | None = None) -> pd.DataFrame:
    """A stratified sample (on target bins) of `max_rows` rows, for quick runs; not the first N rows."""
    if max_rows >= len(rows):
        return rows
    bins = sample_bins(rows["target"], num_bins)
    from sklearn.model_selection import train_test_split  # here, not at the top: see assign_folds

    sample, _ = train_test_split(rows, train_size=max_rows, stratify=bins, random_state=seed)
    return sample.sort_index()


def assign_folds(rows: pd.DataFrame, num_folds: int, seed: int, num_bins: int | None = None) -> pd.DataFrame:
    """The fork's recipe: shuffled rows with a `fold` column (0..k-1), in the shuffled order."""
    shuffled = rows.sample(frac=1, random_state=seed).reset_index(drop=True)
    bins = target_bins(shuffled["target"], num_bins)
    shuffled["fold"] = -1
    # Imported here: fold workers import this module for its batching and never cut folds, and scikit-learn
    # (with SciPy) costs each of them about a second of CPU and 60 MB at start-up, five folds per trial.
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=num_folds)
    with warnings.catch_warnings():
        # The fork's bins are equal-width: the extreme ones hold a row or two, fewer than the folds (Kaggle's
        # data with its 12 default bins too). StratifiedKFold says so and spreads them as it can; expected.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            for fold, (_, valid_idx) in enumerate(splitter.split(X=shuffled, y=bins)):
                shuffled.loc[valid_idx, "fold"] = fold
        except ValueError as exc:  # scikit-learn: no target bin holds num_folds rows (check_fold_settings)
            raise RaycvError(f"data.num_folds: {num_folds} stratified folds cannot be cut from these target "
                             f"bins ({exc}); lower data.num_folds or data.num_bins") from None
    return shuffled


def load_folds(data: DataConfig) -> pd.DataFrame:
    """Read, optionally sample, and assign folds: the one table every fold and trial shares."""
    rows = read_rows(data)
    problems = check_fold_settings(rows, data)
    if problems:
        raise DataError(str(data.path), problems)
    if data.max_rows is not None:
        rows = sample_rows(rows, data.max_rows, data.fold_seed, data.num_bins)
    return assign_folds(rows, data.num_folds, data.fold_seed, data.num_bins)


# ---------------------------------------------------------------- tokens and batches


def tokenize(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, unpadded: padding happens per batch."""
    if not getattr(tokenizer, "is_fast", False):
        raise RaycvError(f"{type(tokenizer).__name__} is not a fast tokenizer; raycv needs one (tokenizer.json)")
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]


def bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket_batches: int = 100):
    """Shuffled batches of similar lengths: shuffle, cut into buckets of `bucket_batches` batches, sort each
    bucket by length, slice it into batches, shuffle the batches. Every row appears exactly once."""
    order = rng.permutation(len(lengths))
    bucket = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), bucket):
        chunk = order[start : start + bucket]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(lengths: np.ndarray, batch_size: int):
    """Evaluation batches: rows sorted by length, so padding is minimal; order does not matter."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded_width(longest: int, multiple: int = 1, cap: int | None = None) -> int:
    """A batch's width: its longest row rounded up to a multiple of `multiple` (train.pad_to_multiple_of),
    but not past `cap` (model.max_length, which no row exceeds)."""
    width = -(-longest // multiple) * multiple
    return max(longest, min(width, cap)) if cap else width


def collate(input_ids: list[list[int]], index: np.ndarray, pad_id: int, multiple: int = 1,
            cap: int | None = None) -> dict[str, torch.Tensor]:
    """Pad one batch to its longest row (rounded up: `padded_width`)."""
    width = padded_width(max(len(input_ids[i]) for i in index), multiple, cap)
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        ids[row, : len(input_ids[i])] = torch.tensor(input_ids[i])
        mask[row, : len(input_ids[i])] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def useful_token_fraction(lengths: np.ndarray, batches, multiple: int = 1, cap: int | None = None) -> float:
    """Real tokens over padded tokens across batches (1.0 means no padding at all)."""
    padded = sum(len(b) * padded_width(int(lengths[b].max()), multiple, cap) for b in batches)
    return float(lengths.sum() / padded)


@dataclass
class EncodedFolds:
    """Everything the fold workers need, computed once on the driver and handed to every trial."""

    table: pd.DataFrame  # one row per excerpt: id, target, fold (and text, until `for_workers`)
    tokens: list[list[int]]  # token ids of each row of `table`, same order, truncated, unpadded
    pad_id: int  # the tokenizer's padding id, for per-batch padding

    def for_workers(self) -> EncodedFolds:
        """Without the texts: the workers train on token ids, and Ray ships this to every trial."""
        return EncodedFolds(self.table[["id", "target", "fold"]].copy(), self.tokens, self.pad_id)


def encode_folds(config, tokenizer) -> EncodedFolds:
    """The fold table (id, text, target, fold) and its token ids in the same order."""
    table = load_folds(config.data)
    tokens = tokenize(table["text"].tolist(), tokenizer, config.model.max_length)
    return EncodedFolds(table, tokens, tokenizer.pad_token_id)
