"""Where a run keeps its files: the run directory (local) and Ray's storage (a local path or s3://...).

Two places, one layout, named here once:

    <run.output_dir>/                 the run directory: what `raycv report` reads, no Ray needed
        resolved_config.yaml folds.csv baselines.json run.json
        oof/<trial>.csv curves/<trial>.csv report.json report.md trials.csv *.png
    <run.storage_path>/               Ray's storage (default <run.output_dir>/ray), local or a bucket
        tune/<trial>/                 Tune's own trial folder (result.json, TensorBoard events)
        train_<trial>/point_NNNN/     the trial's Ray Train run: fold checkpoints fold_K.pt
        results/<trial>/oof.csv       rank 0's pooled predictions and curve, rewritten at every point
        results/<trial>/curve.csv
        results/<trial>/status.json   how the trial ended (diverged or failed: why, in one line)

Ray's storage is reached through pyarrow's filesystems, the layer Ray itself uses for `storage_path`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.fs

from raycv import RaycvError

# ---------------------------------------------------------------- names in the layout

RUN_FILES = ("run.json", "folds.csv", "baselines.json", "resolved_config.yaml")  # what a report needs
FOLD_STATE = "fold_{}.pt"  # one fold's checkpoint inside a point_NNNN folder
CHECKPOINT_PREFIX = "point_"


def train_run_name(trial_id: str) -> str:
    """A trial's Ray Train run: its folder in the storage and its name in the dashboard's Train state."""
    return f"train_{trial_id}"


def checkpoint_dir_name(eval_point: int) -> str:
    return f"{CHECKPOINT_PREFIX}{eval_point:04d}"


def trial_files(trial_id: str) -> dict[str, str]:
    """Where rank 0 keeps a trial's pooled results in the storage (paths relative to it)."""
    return {"oof": f"results/{trial_id}/oof.csv", "curve": f"results/{trial_id}/curve.csv",
            "status": f"results/{trial_id}/status.json"}  # written when the trial ends


def run_oof_path(run_dir: Path, trial_id: str) -> Path:
    return Path(run_dir) / "oof" / f"{trial_id}.csv"


def run_curve_path(run_dir: Path, trial_id: str) -> Path:
    return Path(run_dir) / "curves" / f"{trial_id}.csv"


# ---------------------------------------------------------------- the run directory (local)


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` and rename the result onto `path`, so a failure leaves nothing half-written.
    A path that cannot be written (a directory, under a file, a read-only place) is a RaycvError."""
    path = Path(path)
    if path.is_dir():  # a rename onto a directory fails only after the whole file was written
        raise RaycvError(f"{path} is a directory; name a file to write")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        tmp.replace(path)
    except OSError as exc:
        raise RaycvError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():  # False under a file or in a place that refused it: never created
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------- Ray's storage (local or a bucket)


def filesystem(storage_path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(pyarrow filesystem, base path on it) for a local path or a URI such as s3://bucket/prefix."""
    if "://" in storage_path:
        return pyarrow.fs.FileSystem.from_uri(storage_path)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage_path).resolve())


def _join(base: str, relative: str) -> str:
    return f"{base.rstrip('/')}/{relative}" if relative else base


def write_text(storage_path: str, relative: str, text: str) -> None:
    """Write a file in the storage; readers see the old file or the new one, never half of it."""
    fs, base = filesystem(storage_path)
    target = _join(base, relative)
    fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
    tmp = target + ".tmp"
    with fs.open_output_stream(tmp) as stream:
        stream.write(text.encode())
    fs.move(tmp, target)


def read_text(storage_path: str, relative: str) -> str | None:
    """A file's text, or None where there is no such file."""
    fs, base = filesystem(storage_path)
    target = _join(base, relative)
    if fs.get_file_info(target).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(target) as stream:
        return stream.read().decode()


def list_dirs(storage_path: str, relative: str) -> list[str]:
    """Names of the folders directly under `relative` (none if it does not exist)."""
    fs, base = filesystem(storage_path)
    selector = pyarrow.fs.FileSelector(_join(base, relative), allow_not_found=True)
    return sorted(info.base_name for info in fs.get_file_info(selector) if info.type == pyarrow.fs.FileType.Directory)


def delete_dir(storage_path: str, relative: str) -> str:
    """Delete a folder and what it holds; returns its full path."""
    fs, base = filesystem(storage_path)
    target = _join(base, relative)
    fs.delete_dir(target)
    return target


def delete_fold_checkpoints(storage_path: str, trial_id: str) -> list[str]:
    """Delete every fold checkpoint (model + optimiser) of one trial's Train run; returns what went."""
    run = train_run_name(trial_id)
    return [delete_dir(storage_path, f"{run}/{name}")
            for name in list_dirs(storage_path, run) if name.startswith(CHECKPOINT_PREFIX)]
