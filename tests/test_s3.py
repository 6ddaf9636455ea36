"""Run storage in a bucket: `run.storage_path=s3://BUCKET/PREFIX` against a real S3 API on loopback (moto's
server, in this process), reached through a small TCP proxy the test can close and reopen on the same port
to take the endpoint away mid-run and bring it back with the same data.

One search is shared by the Ray tests (module scope, to keep Ray's time small): it is SIGKILLed mid-search,
resumed from the bucket while the endpoint goes away for a while, then reported and predicted from; the
tests read what it left in the bucket and the run directory. The probe tests need no Ray.

    python -m pytest tests/test_s3.py -x -q -p no:cacheprovider
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import ENDED, free_port, kill_group, run_raycv, run_state, start_raycv, wait_for

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET, PREFIX = "raycv-test-runs", "smoke"
STORAGE = f"s3://{BUCKET}/{PREFIX}"
OUTAGE_S = 10  # how long the endpoint is away during the resumed run


class Proxy:
    """A TCP proxy on a fixed loopback port in front of moto: `close()` refuses new connections and cuts open
    ones (an endpoint gone away); `open()` serves again on the same port, the data intact behind it."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self.listener: socket.socket | None = None
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        listener, self.listener = self.listener, None
        if listener:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self.connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:  # closed meanwhile
                    client.close(), upstream.close()
                    return
                self.connections |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 on loopback behind a Proxy; the environment points pyarrow (raycv, Ray) and boto3 at the
    proxy; `client` talks to moto directly, so listing the bucket works during an outage."""
    moto_port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    server.start()
    proxy = Proxy(moto_port)
    proxy.open()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("AWS_PROFILE", raising=False)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}")
        client.create_bucket(Bucket=BUCKET)
        yield {"client": client, "proxy": proxy, "env": env}
    proxy.close()
    server.stop()


def objects(client, prefix: str = PREFIX) -> dict[str, dict]:
    """Key -> {ETag, LastModified, Size} of every object under `prefix` in the bucket."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = {k: item[k] for k in ("ETag", "LastModified", "Size")}
    return found



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
    s3["client"].delete_object(Bucket=BUCKET, Key=f"{PREFIX}/outage/a.txt")


# ---------------------------------------------------------------- one search in the bucket, killed, resumed


@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory, train_csv):
    """A two-trial search (lr 3e-3 and 1e-4, 3 points each) with its storage in the bucket: SIGKILLed once a
    trial has ended and the other has a fold checkpoint in the bucket; resumed with the endpoint away for
    OUTAGE_S seconds mid-trial (resumed again if that run gave up); what each stage saw."""
    cwd = tmp_path_factory.mktemp("s3run")
    run_dir = cwd / "runs" / "smoke"
    client = s3["client"]
    args = tune_args(train_csv, STORAGE, "search.params={train.lr: {grid: [0.003, 0.0001]}}",
                     "search.num_samples=1", "train.epochs=3")

    log_path = cwd / "first.log"
    proc = start_raycv(args, cwd, log_path)

    def one_ended_one_checkpointed() -> bool:
        """A trial has ended, and Ray Train has registered a fold checkpoint of another (its uploads done)."""
        trials = run_state(run_dir)["trials"]
        running = [t["trial_id"] for t in trials if t["status"] not in ENDED]
        return len(trials) > len(running) and any("point_" in snapshot(t) for t in running)

    def snapshot(trial_id: str) -> str:  # Ray Train's record of a Train run's checkpoints
        key = f"{PREFIX}/train_{trial_id}/checkpoint_manager_snapshot.json"
        try:
            return client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
        except client.exceptions.NoSuchKey:
            return ""

    try:
        wait_for(one_ended_one_checkpointed, proc, log_path, 420, "ended trial and a checkpoint of another")
    finally:
        kill_group(proc)  # SIGKILL: the driver and its local Ray; nothing gets to clean up
        proc.wait(timeout=60)
    killed = {"objects": objects(client), "state": run_state(run_dir)}

    log_path = cwd / "resumed.log"
    proc = start_raycv([*args, "--resume"], cwd, log_path)
    running = [t["trial_id"] for t in killed["state"]["trials"] if t["status"] not in ENDED]
    curves = [f"{PREFIX}/results/{trial_id}/curve.csv" for trial_id in running]

    def a_curve_moved() -> bool:  # the resumed trial wrote a point: now the endpoint goes away
        if "| cv_rmse_last " not in log_path.read_text():  # (the killed run's workers may still have written
            return False                                      # a curve after the kill: the resumed run's own)
        now = objects(client)
        return any(key in now and now[key] != killed["objects"].get(key) for key in curves)

    try:
        wait_for(a_curve_moved, proc, log_path, 300, "new point of the resumed trial")
        s3["proxy"].close()
        time.sleep(OUTAGE_S)
        s3["proxy"].open()
        proc.wait(timeout=420)
    finally:
        kill_group(proc)
        proc.wait(timeout=60)
    resumed = {"returncode": proc.returncode, "log": log_path.read_text()}
    final = None
    if proc.returncode != 0:  # the run gave up on the storage: one line, and --resume completes it
        final = run_raycv([*args, "--resume"], cwd=cwd, timeout=420)
    return {"cwd": cwd, "run_dir": run_dir, "args": args, "killed": killed, "resumed": resumed, "final": final,
            "objects": objects(client)}



@pytest.mark.ray
@pytest.mark.timeout(900)
def test_the_resumed_run_survives_the_outage_and_finishes(s3_run):
    resumed, final = s3_run["resumed"], s3_run["final"]
    if final is not None:  # gave up: one line naming the storage, then --resume finished it
        errors = [line for line in resumed["log"].splitlines() if line.startswith("raycv: error:")]
        assert resumed["returncode"] == 2 and len(errors) == 1, resumed["log"][-4000:]
        assert f"run.storage_path: cannot write to {STORAGE}" in errors[0]
        assert final.returncode == 0, final.stdout[-4000:] + final.stderr[-4000:]
    else:
        assert resumed["returncode"] == 0, resumed["log"][-4000:]
    assert "resumes at step" in resumed["log"]  # the cut-short trial went on from its checkpoint in the bucket
    report = json.loads((s3_run["run_dir"] / "report.json").read_text())
    assert report["state"] == "finished" and not report["partial"]
    assert len(report["trials"]) == 2 and {t["status"] for t in report["trials"]} <= {"finished", "stopped"}
    for trial in report["trials"]:  # nothing lost: every point of every trial, in the bucket and the run
        oof = pd.read_csv(s3_run["run_dir"] / "oof" / f"{trial['trial_id']}.csv")
        assert len(oof) == 450 and oof[["pred_best", "pred_last"]].notna().all().all()
        curve = pd.read_csv(s3_run["run_dir"] / "curves" / f"{trial['trial_id']}.csv")
        assert curve["eval_point"].tolist() == list(range(1, trial["eval_points"] + 1))


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_trial_files_and_fold_checkpoints_are_objects_in_the_bucket(s3_run):
    killed = s3_run["killed"]["objects"]
    assert any("/point_" in key and key.endswith("/fold_0.pt") for key in killed), sorted(killed)
    assert f"{PREFIX}/tune/tuner.pkl" in s3_run["objects"]
    for trial in s3_run["killed"]["state"]["trials"]:
        if trial["status"] in ENDED:
            for name in ("oof.csv", "curve.csv", "status.json"):
                assert f"{PREFIX}/results/{trial['trial_id']}/{name}" in killed
    trials = json.loads((s3_run["run_dir"] / "report.json").read_text())["trials"]
    for trial in trials:
        for name in ("oof.csv", "curve.csv", "status.json"):
            assert f"{PREFIX}/results/{trial['trial_id']}/{name}" in s3_run["objects"]
    assert not (s3_run["run_dir"] / "ray").exists()  # nothing of Ray's storage went to the local disk


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_checkpoint_pruning_deletes_the_objects(s3_run):
    """Every trial has ended: its fold checkpoints (model + optimiser) are gone from the bucket, those the
    killed run had left for the trial it cut short included; the best trial's models were exported first."""
    before = [key for key in s3_run["killed"]["objects"] if "/point_" in key]
    assert before
    assert not [key for key in s3_run["objects"] if "/point_" in key]
    best = json.loads((s3_run["run_dir"] / "report.json").read_text())["best_trial"]
    assert sorted(p.name for p in (s3_run["run_dir"] / "models" / best).glob("fold_*.safetensors")) == [
        "fold_0.safetensors", "fold_1.safetensors", "fold_2.safetensors"]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_trials_that_had_ended_before_the_kill_are_untouched(s3_run):
    killed = s3_run["killed"]
    ended = [t["trial_id"] for t in killed["state"]["trials"] if t["status"] in ENDED]
    assert ended
    for trial_id in ended:
        keys = [key for key in killed["objects"] if f"/results/{trial_id}/" in key]
        assert keys
        for key in keys:  # same ETag and the same LastModified: not rewritten, not run again
            assert s3_run["objects"][key] == killed["objects"][key], key
    report = json.loads((s3_run["run_dir"] / "report.json").read_text())
    for trial in killed["state"]["trials"]:
        if trial["status"] in ENDED:
            assert next(t for t in report["trials"] if t["trial_id"] == trial["trial_id"])["status"] == trial["status"]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_report_and_predict_work_from_the_run(s3_run, train_csv):
    run_dir, cwd = s3_run["run_dir"], s3_run["cwd"]
    before = json.loads((run_dir / "report.json").read_text())
    (run_dir / "report.md").unlink()
    proc = run_raycv(["report", str(run_dir)], cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "report.md").is_file()
    assert json.loads((run_dir / "report.json").read_text())["trials"] == before["trials"]

    new_texts = pd.read_csv(train_csv).head(12)[["id", "excerpt"]]
    new_texts.to_csv(cwd / "new.csv", index=False)
    proc = run_raycv(["predict", str(run_dir), "--data", str(cwd / "new.csv"), "--out", str(cwd / "sub.csv")],
                     cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    submission = pd.read_csv(cwd / "sub.csv")
    assert submission["id"].tolist() == new_texts["id"].tolist() and submission["target"].notna().all()
