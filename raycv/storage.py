"""Where a run keeps its files: the run directory (local) and Ray's storage (a local path or s3://...).

Two places, one layout, named here once:

    <run.output_dir>/                 the run directory: what `raycv report` reads, no Ray needed
        resolved_config.yaml folds.csv baselines.json run.json
        oof/<trial>.csv curves/<trial>.csv report.json report.md trials.csv *.png
    <run.storage_path>/               Ray's storage (default <run.output_dir>/ray), local or a bucket
        tune/<trial>/                 Tune's own trial folder (result.json, TensorBoard events)
        train_<trial>/point_NNNN/     the trial's Ray Train run: fold checkpoints fold_K.pt (with
                                      search.seeds_per_trial > 1: fold_K_seedS.pt, one per fold and seed)
        results/<trial>/oof.csv       rank 0's pooled predictions and curve, rewritten at every point
        results/<trial>/curve.csv
        results/<trial>/status.json   how the trial ended (diverged or failed: why, in one line)
        results/<trial>/restarts.json each resume from fold checkpoints: from which point, points redone

Ray's storage is reached through pyarrow's filesystems, the layer Ray itself uses for `storage_path`.
"""

from __future__ import annotations

import datetime
import logging
import os
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow
import pyarrow.fs

from raycv import RaycvError, first_line

log = logging.getLogger(__name__)
T = TypeVar("T")

# ---------------------------------------------------------------- names in the layout

RUN_FILES = ("run.json", "folds.csv", "baselines.json", "resolved_config.yaml")  # what a report needs
REPORT_FILES = ("report.md", "report.json", "trials.csv")  # what `raycv report` writes beside them, with plots


def is_run_file(run_dir: Path, path: Path) -> bool:
    """Whether `path` is one of the files a run keeps in `run_dir` (its state, report, plots, and anything in
    its folders: OOF predictions, curves, fold models, Ray's storage); a file of the user's beside them is not."""
    try:
        relative = path.resolve().relative_to(run_dir.resolve())
    except ValueError:
        return False
    return len(relative.parts) > 1 or relative.name in RUN_FILES + REPORT_FILES or relative.suffix == ".png"
FOLD_STATE = "fold_{}.pt"  # one fold's checkpoint inside a point_NNNN folder
CHECKPOINT_PREFIX = "point_"


def fold_state_name(fold: int, seed_index: int = 0, seeds_per_trial: int = 1, suffix: str = ".pt") -> str:
    """One worker's file: fold_K.pt with one seed per trial (as ever); with several, fold_K_seedS.pt for
    every seed, so no two workers of a trial write the same name. `suffix` .safetensors: its exported model."""
    stem = f"fold_{fold}" if seeds_per_trial == 1 else f"fold_{fold}_seed{seed_index}"
    return stem + suffix


def train_run_name(trial_id: str) -> str:
    """A trial's Ray Train run: its folder in the storage and its name in the dashboard's Train state."""
    return f"train_{trial_id}"


def checkpoint_dir_name(eval_point: int) -> str:
    return f"{CHECKPOINT_PREFIX}{eval_point:04d}"


def trial_files(trial_id: str) -> dict[str, str]:
    """Where rank 0 keeps a trial's pooled results in the storage (paths relative to it)."""
    return {"oof": f"results/{trial_id}/oof.csv", "curve": f"results/{trial_id}/curve.csv",
            "status": f"results/{trial_id}/status.json",  # written when the trial ends
            "restarts": f"results/{trial_id}/restarts.json"}  # one entry per resume from a fold checkpoint


def run_oof_path(run_dir: Path, trial_id: str) -> Path:
    return Path(run_dir) / "oof" / f"{trial_id}.csv"


def run_curve_path(run_dir: Path, trial_id: str) -> Path:
    return Path(run_dir) / "curves" / f"{trial_id}.csv"


# ---------------------------------------------------------------- the run directory (local)


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)` and rename the result onto `path`, so a failure leaves nothing half-written.
    A path that cannot be written (a directory, under a file, a read-only place) is a RaycvError."""
    path = Path(path)
    problem = not_a_file_to_replace(path)
    if problem:
        raise RaycvError(f"{path} {problem}; name a file to write")
    if path.is_symlink():  # the rename replaces what it lands on: write the link's file, keep the link
        path = Path(os.path.realpath(path))
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


def what_is_at(path: str | Path) -> str | None:
    """What is at `path` (links followed, as opening it does), as an error line names it: "a file", "a directory"
    or "a device, pipe or socket"; None where nothing is. A name the system refuses (a part longer than 255
    bytes, a NUL in it) raises OSError or ValueError."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return "a file" if stat.S_ISREG(mode) else "a directory" if stat.S_ISDIR(mode) else "a device, pipe or socket"


def path_refusal(exc: Exception) -> str:
    """The reason the system gives for refusing a path, for a line that names the path itself: its strerror
    ("File name too long", "Permission denied", "Too many levels of symbolic links"), without the errno and
    the repeated path of str(exc); for a name no system call can take (a NUL in it: ValueError, or an OSError
    without a strerror), the error's first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return first_line(exc)


def not_a_file_to_replace(path: Path) -> str | None:
    """Why a finished file cannot be renamed onto `path`, or None. The rename replaces whatever is there:
    a device, a pipe or /dev/stdout (as root, in /dev itself) would be swapped for a regular file."""
    parts = Path(os.path.abspath(path)).parts
    if parts[1:2] in (("dev",), ("proc",), ("sys",)) and parts[1:3] != ("dev", "shm"):  # /dev/shm: a tmpfs
        return "is a device or a process's file, not a file raycv can replace"
    if path.exists() and not path.is_file() and not path.is_dir():
        return "is not a regular file (a device or a pipe)"
    return None


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


class PlacesError(RaycvError):
    """Places that a set of files cannot be written to (write_all), one line each, as the CLI prints them."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(" | ".join(problems))

    def lines(self) -> list[str]:
        return self.problems


def write_all(run_dir: str | Path, contents: dict[str, bytes]) -> None:
    """Each file of `contents` (name -> bytes) in `run_dir`, or none of them: every place is checked first
    (a directory, a pipe or a device there is one line each), each file is written beside its place, and only
    once all are written are they renamed onto their places. Files half old and half new (a report, a fold's
    predictions beside another run's curve) contradict each other."""
    places, problems = {}, []
    for name in contents:
        path = Path(run_dir) / name
        place = Path(os.path.realpath(path)) if path.is_symlink() else path  # write the link's file, keep the link
        problem = not_a_file_to_replace(path) or ("is a directory" if place.is_dir() else None)
        if problem:
            problems.append(f"{place} {problem}; name a file to write")
        places[name] = place
    if problems:
        raise PlacesError(problems)
    written: dict[str, Path] = {}
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        for name, data in contents.items():
            handle, tmp = tempfile.mkstemp(prefix=f".{places[name].name}.", suffix=".tmp", dir=places[name].parent)
            written[name] = Path(tmp)
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
        for name, tmp in written.items():
            tmp.replace(places[name])
    except OSError as exc:
        raise RaycvError(f"cannot write {exc.filename or run_dir}: {path_refusal(exc)}") from None
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)  # renamed already, or left by a failure


# ---------------------------------------------------------------- Ray's storage (local or a bucket)

# How long raycv's own reads and writes in the storage keep retrying an endpoint that does not answer (a
# bucket's endpoint restarting, a network blip) before they give up with one line naming the storage.
RETRY_FOR_S = 120.0
# The probe before a search: a bucket that cannot be reached must fail in seconds, before Ray starts.
PROBE_TIMEOUTS = {"connect_timeout": 3.0, "request_timeout": 10.0}
# Errors that say the endpoint did not answer (worth retrying), as pyarrow's S3 layer words them.
TRANSIENT = ("NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "Timeout was reached",
             "SERVICE_UNAVAILABLE", "SLOW_DOWN", "INTERNAL_FAILURE", "REQUEST_TIMEOUT", "THROTTLING",
             "Connection reset", "Connection refused", "Broken pipe")


class StorageError(RaycvError):
    """The run's storage could not be reached or written; the message is one line naming it."""


def is_remote(storage_path: str) -> bool:
    return "://" in storage_path


def filesystem(storage_path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """(pyarrow filesystem, base path on it) for a local path or a URI such as s3://bucket/prefix."""
    if is_remote(storage_path):
        return pyarrow.fs.FileSystem.from_uri(storage_path)
    return pyarrow.fs.LocalFileSystem(), str(Path(storage_path).resolve())


def _join(base: str, relative: str) -> str:
    return f"{base.rstrip('/')}/{relative}" if relative else base


def is_transient(error: BaseException) -> bool:
    """An error of an endpoint that did not answer (retry it), not of a missing file, bucket or permission."""
    return isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and mentions_outage(str(error))


def mentions_outage(text: str) -> bool:
    """Whether an error's text (a Ray failure holds its workers' tracebacks) says the storage did not answer."""
    return isinstance(text, str) and any(marker in text for marker in TRANSIENT)


def describe_storage_error(storage_path: str, error: BaseException) -> str:
    """One line: which storage, what went wrong, what to do about it."""
    text = " ".join(str(error).split())
    if "NO_SUCH_BUCKET" in text or "bucket does not exist" in text:
        bucket = urlparse(storage_path).netloc
        what, fix = f"bucket {bucket} does not exist", f"create it (aws s3 mb s3://{bucket}) or choose another bucket"
    elif is_transient(error):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "its endpoint"
        what = f"cannot reach {endpoint} ({_detail(text)})"
        fix = "check the network and AWS_ENDPOINT_URL, or use a local run.storage_path"
    elif any(code in text for code in ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT",
                                       "credentials", "FORBIDDEN", "403")):
        what = f"not allowed to write ({_detail(text)})"
        fix = ("check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the "
               "bucket's policy")
    else:
        what, fix = _detail(text), "check the path and the credentials, or use a local run.storage_path"
    return f"run.storage_path: cannot write to {storage_path}: {what}; {fix}"


def _detail(text: str) -> str:
    """The informative end of pyarrow's message (after 'AWS Error ...'), shortened to fit one line."""
    start = text.find("AWS Error ")
    return (text[start + len("AWS Error "):] if start >= 0 else text)[:200]


def retrying(storage_path: str, action: Callable[[], T], retry_for_s: float | None = None) -> T:
    """`action()`, retried with back-off while the storage's endpoint does not answer, for up to
    `retry_for_s` seconds (RETRY_FOR_S); then StorageError, one line naming the storage."""
    deadline = time.monotonic() + (RETRY_FOR_S if retry_for_s is None else retry_for_s)
    wait = 1.0
    while True:
        try:
            return action()
        except OSError as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() + wait > deadline:
                raise StorageError(describe_storage_error(storage_path, exc)) from exc
            log.warning("storage %s did not answer (%s); retrying in %.0f s", storage_path, _detail(str(exc)), wait)
            time.sleep(wait)
            wait = min(wait * 2, 15.0)


def probe(storage_path: str) -> str | None:
    """Write and delete a small object under the storage, with short timeouts and no retries: None where
    that works, else one line naming run.storage_path, what went wrong and the fix."""
    uri = urlparse(storage_path)
    if is_remote(storage_path) and uri.scheme != "file" and not uri.netloc:  # pyarrow said only "Path cannot
        # start with a separator ('/.raycv-probe-...')"
        return f"run.storage_path: {storage_path} names no bucket; give {uri.scheme}://BUCKET or {uri.scheme}://BUCKET/PREFIX"
    try:
        _write_probe(storage_path)
    except (OSError, ValueError, pyarrow.ArrowException) as exc:
        return describe_storage_error(storage_path, exc)
    return None


def wait_until_writable(storage_path: str) -> None:
    """Return once the storage takes a probe object again; StorageError after RETRY_FOR_S seconds."""
    retrying(storage_path, lambda: _write_probe(storage_path))


def _write_probe(storage_path: str) -> None:
    fs, base = _probe_filesystem(storage_path)
    target = _join(base, f".raycv-probe-{uuid.uuid4().hex}")
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        fs.create_dir(base, recursive=True)
    with fs.open_output_stream(target) as stream:
        stream.write(b"raycv checks it can write here\n")
    fs.delete_file(target)


def _probe_filesystem(storage_path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """`filesystem`, but an S3 one with short timeouts and a single attempt, so an endpoint that is down or
    silent fails the probe in seconds. Every other setting (endpoint, region, credentials) is the one pyarrow
    resolves for Ray from the URI and the environment."""
    fs, base = filesystem(storage_path)
    if isinstance(fs, pyarrow.fs.GcsFileSystem):  # Google's client retries for 15 minutes by default
        settings = fs.__reduce__()[1][0]
        settings["retry_time_limit"] = datetime.timedelta(seconds=PROBE_TIMEOUTS["request_timeout"] / 2)
        return pyarrow.fs.GcsFileSystem(**settings), base
    if not isinstance(fs, pyarrow.fs.S3FileSystem):
        return fs, base
    settings = fs.__reduce__()[1][0]  # the filesystem's settings, as pickling rebuilds it
    settings.update(PROBE_TIMEOUTS, retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1))
    return pyarrow.fs.S3FileSystem(**settings), base


def write_text(storage_path: str, relative: str, text: str) -> None:
    """Write a file in the storage; readers see the old file or the new one, never half of it (an object
    store's PUT is whole already; a local file is written aside and renamed)."""

    def write() -> None:
        fs, base = filesystem(storage_path)
        target = _join(base, relative)
        if not isinstance(fs, pyarrow.fs.LocalFileSystem):
            with fs.open_output_stream(target) as stream:
                stream.write(text.encode())
            return
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        tmp = target + ".tmp"
        with fs.open_output_stream(tmp) as stream:
            stream.write(text.encode())
        fs.move(tmp, target)

    retrying(storage_path, write)


def shown_path(storage_path: str, relative: str) -> str:
    """A file in the storage as an error line names it: the storage as the config gives it, then the file."""
    return _join(storage_path, relative)


def read_text(storage_path: str, relative: str) -> str | None:
    """A file's text, or None where there is no such file."""
    data = read_bytes(storage_path, relative)
    return None if data is None else data.decode()


def read_bytes(storage_path: str, relative: str) -> bytes | None:
    """A file's bytes, or None where there is no such file. Anything else there (a directory, or in a local
    storage a FIFO, device or socket, which pyarrow calls Unknown) is one line naming it, before it is opened:
    opening a FIFO waits for a writer for ever. An object store holds files and prefixes only."""

    def read() -> bytes | None:
        fs, base = filesystem(storage_path)
        target = _join(base, relative)
        kind = fs.get_file_info(target).type
        if kind == pyarrow.fs.FileType.NotFound:
            return None
        if kind != pyarrow.fs.FileType.File:
            what = "a directory" if kind == pyarrow.fs.FileType.Directory else "a device, pipe or socket"
            raise RaycvError(f"{shown_path(storage_path, relative)} is {what}, not a file raycv wrote; remove it")
        with fs.open_input_stream(target) as stream:
            return stream.read()

    return retrying(storage_path, read)


def list_dirs(storage_path: str, relative: str) -> list[str]:
    """Names of the folders directly under `relative` (none if it does not exist)."""

    def listing() -> list[str]:
        fs, base = filesystem(storage_path)
        selector = pyarrow.fs.FileSelector(_join(base, relative), allow_not_found=True)
        return sorted(info.base_name for info in fs.get_file_info(selector)
                      if info.type == pyarrow.fs.FileType.Directory)

    return retrying(storage_path, listing)


def delete_dir(storage_path: str, relative: str) -> str:
    """Delete a folder and what it holds; returns its full path."""
    fs, base = filesystem(storage_path)
    target = _join(base, relative)
    retrying(storage_path, lambda: fs.delete_dir(target))
    return target


def delete_fold_checkpoints(storage_path: str, trial_id: str) -> list[str]:
    """Delete every fold checkpoint (model + optimiser) of one trial's Train run; returns what went."""
    run = train_run_name(trial_id)
    return [delete_dir(storage_path, f"{run}/{name}")
            for name in list_dirs(storage_path, run) if name.startswith(CHECKPOINT_PREFIX)]
