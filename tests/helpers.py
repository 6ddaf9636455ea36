"""What the tests share that is not a fixture: paths, the tiny search space, tiny StructBERT checkpoints in
AliceMind's layout, and a runner for `raycv` in its own process group with a hard time limit.

Test modules import these (`from helpers import ...`); conftest.py holds only fixtures.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import requests
import torch

REPO_DIR = Path(__file__).resolve().parents[1]
SPACES_DIR = REPO_DIR / "search_spaces"

# A tiny model on a stratified sample of the real data, as search_spaces/smoke.yaml runs it.
TINY_SPACE = {
    "data": {"num_folds": 3, "fold_seed": 1000, "max_rows": 450},
    "model": {
        "backbone": {"type": "tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
        "max_length": 128,
        "dropout": 0.0,
        "pooling": "cls",
    },
    "train": {
        "epochs": 6, "batch_size": 16, "lr": 3e-3, "layer_decay": 0.9, "weight_decay": 0.01,
        "warmup_ratio": 0.1, "evals_per_epoch": 1, "seed": 42,
    },
    "scheduler": {"type": "none"},
    "resources": {"gpus_per_fold": 0, "cpus_per_fold": 0.5},
}

# AliceMind's large_bert_config.json keys, at a tiny size; the vocab is MiniLM's (the same uncased BERT vocab).
TINY_STRUCTBERT_CONFIG = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
}
LAYOUT_PREFIXES = {"bare": "", "bert": "bert.", "module": "module.bert."}
PRETRAINING_HEADS = {  # tensors of AliceMind's pretraining heads: a BertModel does not use them
    "cls.predictions.bias": (30522,),
    "cls.predictions.transform.dense.weight": (32, 32),
    "cls.predictions.transform.dense.bias": (32,),
    "cls.predictions.transform.LayerNorm.gamma": (32,),
    "cls.predictions.transform.LayerNorm.beta": (32,),
    "cls.seq_relationship.weight": (2, 32),
    "cls.seq_relationship.bias": (2,),
}


def merge(base: dict, updates: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in updates.items():
        # A backbone of another type replaces the tiny one instead of merging into it.
        other_type = isinstance(value, dict) and "type" in value and value["type"] != (out.get(key) or {}).get("type")
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not other_type:
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def alicemind_state(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A BertModel's state dict renamed as AliceMind saves it: LayerNorm gamma/beta, `prefix` on every key,
    and pretraining-head tensors (`cls.`, under `module.` when the layout has it)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".LayerNorm." in name:
            name = name.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(".LayerNorm.bias", ".LayerNorm.beta")
        state[prefix + name] = tensor.clone()
    head_prefix = "module." if prefix.startswith("module.") else ""
    generator = torch.Generator().manual_seed(1)
    for name, shape in PRETRAINING_HEADS.items():
        state[head_prefix + name] = torch.randn(shape, generator=generator)
    return state


def tiny_bert(seed: int = 0):
    """A tiny BertModel whose every tensor (LayerNorm included) is random, so a mix-up of names shows."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(**TINY_STRUCTBERT_CONFIG), add_pooling_layer=True)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()




def pooled_rmse(frame: pd.DataFrame, column: str) -> float:
    """RMSE of `column` against `target`, by hand (no sklearn), to check raycv's own scoring."""
    return float(np.sqrt(np.mean((frame[column].to_numpy() - frame["target"].to_numpy()) ** 2)))


# The statuses of a trial that never runs again, written out here as the tests expect them (raycv.collect.ENDED).
ENDED = frozenset(("finished", "stopped", "diverged", "error"))


def run_state(run_dir: Path) -> dict:
    """A run's run.json, or no trials where it is not there yet (or being replaced)."""
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {"trials": []}


def raycv_env() -> dict[str, str]:
    """The environment for a raycv subprocess that must start its own local Ray (never join another)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def die_with_pytest() -> None:
    """preexec_fn: the child gets SIGTERM when the test process dies, even by SIGKILL or an outer timeout
    that leaves no time for fixtures' clean-up (Linux's PR_SET_PDEATHSIG), so a head or a driver a test
    started never outlives the test run."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


CURRENT_TEST: list = [None]  # the pytest item being set up or run (conftest.py keeps it)


def marked_ray(what: str) -> None:
    """Fail the current test if it starts a Ray cluster (`what`) without the `ray` mark: `pytest -m "not ray"`
    would run it, and the time limit and the Ray tests' selection would not apply. Called where Ray starts."""
    item = CURRENT_TEST[0]
    if item is not None and item.get_closest_marker("ray") is None:
        pytest.fail(f"{item.nodeid} starts Ray ({what}) but is not marked ray: add @pytest.mark.ray", pytrace=False)


def run_raycv(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python -m raycv.cli ARGS` in its own process group; past `timeout` the whole group (the driver and
    the local Ray it started, which shares its fate) is killed and the test fails instead of hanging."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "raycv.cli", *args], cwd=cwd, env=raycv_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, preexec_fn=die_with_pytest,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"raycv {' '.join(args)} ran past {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    if args[0] in ("tune", "bench") and proc.returncode == 0:  # it ran a search: a local Ray started
        marked_ray(f"raycv {args[0]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_raycv(args: list[str], cwd: Path, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """`python -m raycv.cli ARGS` in the background, in its own process group, its output in `log_path`;
    the test ends it (kill_group). `env`: default, that of a run which starts its own local Ray."""
    marked_ray(f"raycv {args[0]}")
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "raycv.cli", *args], cwd=cwd, env=env or raycv_env(), text=True,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die_with_pytest)


def wait_for(condition, proc: subprocess.Popen, log_path: Path, limit_s: float, what: str):
    """Poll `condition` until it returns something true (returned), while `proc` runs and within `limit_s`."""
    deadline = time.monotonic() + limit_s
    while not (found := condition()):
        assert proc.poll() is None, f"raycv exited before {what}:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {limit_s} s:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.3)
    return found


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads (it was started with start_new_session=True): a raycv driver
    with the local Ray it started (GCS, raylet), or a `ray start --block` head. Ray gives each worker a
    process group of its own, but a worker exits when its raylet dies, so ending the group ends them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def free_port() -> int:
    """A TCP port nobody listens on now, on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def ray_head(home: Path, extra_args: list[str] = (), extra_env: dict | None = None, gcs_port: int | None = None):
    """`ray start --head --block` with token authentication and a token file of its own, in a process group
    of its own and a temp dir of its own (short: Ray's socket paths must fit 107 bytes; and it keeps the
    head's "current cluster" address out of /tmp/ray, where a later ray.init() would look). On exit the
    group is ended -- the head and every process it started -- and nothing else."""
    marked_ray("ray start --head")
    token_path = Path(home) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token = token_path.read_text().strip()
    temp_dir = Path(tempfile.mkdtemp(prefix="raycv-head-"))
    ports = {"gcs": gcs_port or free_port(), "dashboard": free_port(), "metrics": free_port()}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path), **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={ports['gcs']}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
         f"--metrics-export-port={ports['metrics']}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         *extra_args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=die_with_pytest,
    )
    try:
        deadline = time.monotonic() + 180
        while not _dashboard_answers(dashboard, token):
            assert proc.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the head's dashboard did not answer within 180 s"
            time.sleep(1)
        yield {"ports": ports, "token": token, "token_path": token_path, "env": env,
               "address": f"127.0.0.1:{ports['gcs']}", "dashboard": dashboard, "temp_dir": temp_dir}
    finally:
        end_cluster(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    """The processes of the Ray cluster whose temp dir is `temp_dir` (a cluster the test started with a temp
    dir of its own): Ray's own processes name their session directory, under it, on their command line; its
    workers (retitled `ray::...`) and agents are their children."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(str(temp_dir) in arg for arg in process.cmdline()):
                found.update({p.pid: p for p in [process, *process.children(recursive=True)]})
    return list(found.values())


def end_cluster(proc: subprocess.Popen, temp_dir: Path, grace_s: float = 15) -> None:
    """End a Ray cluster the test started (`ray start ... --block` leading a process group of its own):
    SIGKILL to the group (its GCS, raylet, dashboard, agents: nothing there needs a clean shutdown, the
    temp dir is the test's), then the cluster's Ray workers, which have process groups of their own and
    exit once their raylet is gone, are waited for (SIGKILL past `grace_s`). About a second, where a
    graceful `ray stop` of the same head takes eight and more once it has run jobs."""
    kill_group(proc)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(cluster_processes(temp_dir), timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _dashboard_answers(url: str, token: str) -> bool:
    try:
        return requests.get(f"{url}/api/version", timeout=5, headers={"Authorization": f"Bearer {token}"}).ok
    except requests.RequestException:
        return False


def list_actors(dashboard_url: str, class_name: str, env: dict | None = None) -> list[dict]:
    """Actors of `class_name` (alive and dead) through the cluster's state API, asked from a fresh process:
    Ray reads its authentication mode once per process, and this one may have loaded Ray without it."""
    code = (
        "import json, sys; from ray.util.state import list_actors; "
        f"actors = list_actors(address={dashboard_url!r}, filters=[('class_name', '=', {class_name!r})], "
        "detail=True, limit=10000); "
        "print(json.dumps([{'pid': a.pid, 'state': a.state, 'required_resources': a.required_resources, "
        "'node_id': a.node_id} "
        "for a in actors]))"
    )
    env = {**(env or os.environ), "RAY_AUTH_MODE": "token"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- S3 on loopback (moto), behind a proxy

S3_BUCKET = "raycv-test-runs"


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


def bucket_objects(client, prefix: str) -> dict[str, dict]:
    """Key -> {ETag, LastModified, Size} of every object under `prefix` in the test bucket."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = {k: item[k] for k in ("ETag", "LastModified", "Size")}
    return found


def bucket_text(client, key: str) -> str | None:
    """The object `key` of the test bucket as text, or None where there is none (yet)."""
    try:
        return client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read().decode()
    except client.exceptions.NoSuchKey:
        return None
