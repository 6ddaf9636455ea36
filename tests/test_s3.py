"""Run storage in a bucket, before Ray starts: `run.storage_path=s3://BUCKET/PREFIX` against a real S3 API on
loopback (conftest.py's `s3`: moto's server behind a proxy the test can close). A bucket that does not
exist, an endpoint that is down or silent: refused in seconds, one line, before Ray; raycv's own storage
reads and writes ride out an outage, then fail in one line. No Ray here: the search that runs in the
bucket, is killed, resumed through an outage, reported and predicted from is tests/test_resume.py's.

    python -m pytest tests/test_s3.py -x -q -p no:cacheprovider
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import S3_BUCKET, free_port, run_raycv

PREFIX = "probe"
STORAGE = f"s3://{S3_BUCKET}/{PREFIX}"


# ---------------------------------------------------------------- before Ray: the probe (no Ray, seconds)


def tune_args(train_csv: Path, storage: str, *more: str) -> list[str]:
    return ["tune", "spaces/smoke.yaml", f"data.path={train_csv}", f"run.storage_path={storage}", *more]


def assert_refused_before_ray(proc: subprocess.CompletedProcess, cwd: Path, *words: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "run.storage_path" in proc.stderr, proc.stderr
    assert all(word in proc.stderr for word in words), proc.stderr
    assert "Traceback" not in proc.stderr and "local Ray" not in proc.stdout
    assert not (cwd / "runs").exists()  # nothing created


def test_a_bucket_that_does_not_exist_is_refused_before_ray(s3, tmp_path, train_csv):
    proc = run_raycv(tune_args(train_csv, f"s3://no-such-bucket-here/{PREFIX}"), cwd=tmp_path, timeout=120)
    assert_refused_before_ray(proc, tmp_path, "bucket no-such-bucket-here does not exist", "create it")


def test_an_endpoint_that_is_down_or_silent_is_refused_in_seconds(s3, tmp_path, train_csv, monkeypatch):
    from raycv import storage

    down = free_port()  # nobody listens: connection refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{down}")
    args = tune_args(train_csv, STORAGE)
    args[0] = "validate"
    proc = run_raycv(args, cwd=tmp_path, timeout=120)
    assert_refused_before_ray(proc, tmp_path, f"cannot reach http://127.0.0.1:{down}", "AWS_ENDPOINT_URL")

    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        problem = storage.probe(STORAGE)
        assert time.monotonic() - started < 30  # the probe's own timeouts (3 s connect, 10 s request)
    assert problem.startswith(f"run.storage_path: cannot write to {STORAGE}: cannot reach") and "\n" not in problem


def test_a_gcs_storage_that_cannot_be_written_is_refused_in_seconds():
    """Ray takes gs:// too. Google's client retries for 15 minutes by default: `raycv validate` with a gs://
    storage and no credentials (or no way to Google) sat there for minutes; the probe gives it a few seconds."""
    from raycv import storage

    started = time.monotonic()
    problem = storage.probe("gs://raycv-no-such-bucket/runs")
    assert time.monotonic() - started < 60
    assert problem and problem.startswith("run.storage_path: cannot write to gs://raycv-no-such-bucket/runs: ")
    assert "\n" not in problem


@pytest.mark.parametrize("uri", ["s3://", "s3:///runs", "gs://", "gs:///runs/x"])
def test_a_storage_uri_without_a_bucket_is_named_as_such(uri, tmp_path):
    """pyarrow's "Path cannot start with a separator ('/.raycv-probe-...')" named neither the bucket nor the
    fix; a local path given as file:///... is no bucket URI and is written as usual."""
    from raycv import storage

    scheme = uri.split("://")[0]
    assert storage.probe(uri) == (f"run.storage_path: {uri} names no bucket; give {scheme}://BUCKET or "
                                  f"{scheme}://BUCKET/PREFIX")
    assert storage.probe(f"file://{tmp_path}/runs") is None


def test_storage_writes_ride_out_an_outage_and_then_fail_in_one_line(s3, monkeypatch):
    """raycv's own reads and writes retry an endpoint that went away; past their patience, one line."""
    from raycv import storage

    proxy = s3["proxy"]
    proxy.close()
    threading.Timer(3, proxy.open).start()
    started = time.monotonic()
    storage.write_text(STORAGE, "outage/a.txt", "written through an outage")
    assert time.monotonic() - started >= 2.5
    assert storage.read_text(STORAGE, "outage/a.txt") == "written through an outage"
    monkeypatch.setattr(storage, "RETRY_FOR_S", 3)
    proxy.close()
    try:
        with pytest.raises(storage.StorageError) as failure:
            storage.read_text(STORAGE, "outage/a.txt")
    finally:
        proxy.open()
    message = str(failure.value)
    assert "\n" not in message and message.startswith(f"run.storage_path: cannot write to {STORAGE}: cannot reach")
    s3["client"].delete_object(Bucket=S3_BUCKET, Key=f"{PREFIX}/outage/a.txt")
