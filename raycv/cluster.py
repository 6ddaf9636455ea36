"""Where a search runs: start a local Ray or join a cluster, and size the trials to what it holds.

    raycv tune search_spaces/base.yaml --address auto      # on the head of `ray up cluster.yaml`
                                                            # (or cluster-onprem.yaml)

Token authentication stays on (Ray 2.60's default for a local Ray); the token file raycv relies on is
kept readable by its owner only.
"""

from __future__ import annotations

import math
import os
import re
import socket
import stat
import threading
import time
from pathlib import Path

from raycv import RaycvError, first_line, shown
from raycv.config import Config

TRIAL_DRIVER_CPU = 0.25  # the Tune trial's own actor; the fold workers reserve their own resources
# cluster.yaml and cluster-onprem.yaml start the head with this custom resource, so trial drivers run there
# and a lost GPU node (spot) takes down only fold workers, whose trial then retries from their checkpoints.
DRIVER_RESOURCE = "raycv_driver"
DRIVER_RESOURCE_SHARE = 0.01
# On a local Ray that raycv started for the run, nothing drains the one node: Ray Train's preemption watcher
# (an actor per trial, polling the node's drain state, ~1.5 s of CPU to start) has nothing to see there. On a
# cluster it stays on: a spot node's drain notice is what it is for.
LOCAL_ONLY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# `ray job stop` sends SIGTERM to a job's entrypoint and SIGKILLs it RAY_JOB_STOP_WAIT_TIME_S later (Ray's
# default: 3 s). Ending a search as `interrupted` (Tune stops the trials and saves its state, the collector
# and the report, the summary) took about 6 s for one trial on 2 idle cores, more for a big run with its
# storage in a bucket: a job submitted as docs/cluster.md says gets JOB_STOP_WAIT_S.
JOB_STOP_WAIT_S = 120
JOB_STOP_WAIT_ENOUGH_S = 60


def use_token_auth(address: str | None) -> None:
    """Token authentication stays on: Ray 2.60 enables it for a new local Ray and for address="auto" when a
    token exists; for an explicit address we do the same (RAY_AUTH_MODE=token when a token is available).
    Call it before Ray is imported: Ray reads RAY_AUTH_MODE when it loads."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and "RAY_AUTH_MODE" not in os.environ and _token_available():
        os.environ["RAY_AUTH_MODE"] = "token"


ADDRESS_FORMS = "auto, HOST:6379 (the head's GCS) or ray://HOST:10001 (Ray Client)"


def address_problem(address: str, where: str = "--address") -> str | None:
    """Why `address` (--address, or RAY_ADDRESS as `where`) is no address Ray can join, or None: "auto",
    HOST:PORT or ray://HOST:PORT. A dashboard's http:// address (what `ray job submit` takes, and Ray's docs
    have users export as RAY_ADDRESS) ended in ray.init's many-line error; a malformed one in a traceback."""
    if address in ("auto", "local"):
        return None
    scheme, sep, rest = address.partition("://")
    if sep and scheme in ("http", "https"):
        return (f"{where} {address} is a dashboard address (the Jobs API's, for `ray job submit`); raycv tune "
                f"joins a cluster at {ADDRESS_FORMS}")
    if sep and scheme != "ray":
        return f"{where} {address}: unknown scheme {scheme}://; give {ADDRESS_FORMS}"
    host, colon, port = _host_port(address)
    bracketed = address.partition("://")[2 if "://" in address else 0].rpartition(":")[0]
    if not colon or not host or any(c.isspace() or c in "/?#@[]" for c in host) or not port.isdigit() \
            or not 0 < int(port) < 65536 or (":" in host) != (bracketed.startswith("[") and bracketed.endswith("]")):
        return f"{where} {address} is not HOST:PORT; give {ADDRESS_FORMS}"
    return None


# Ray's driver compiles these as it is imported: one that is not a regular expression ended `import ray` (and
# raycv) in a traceback.
RAY_REGEX_VARIABLES = ("RAY_DEDUP_LOGS_ALLOW_REGEX", "RAY_DEDUP_LOGS_SKIP_REGEX")


def ray_environment_problems() -> list[str]:
    """Variables of the environment that Ray reads at import and would fail on, one line each."""
    problems = []
    for name in RAY_REGEX_VARIABLES:
        value = os.environ.get(name)
        try:
            re.compile(value or "")
        except re.error as exc:
            problems.append(f"{name}={shown(value)} is not a regular expression ({exc}); fix it or unset it")
    value = os.environ.get(GCS_RECONNECT_TIMEOUT_ENV)
    if value and not (value.strip().isascii() and value.strip().isdigit() and 0 < int(value) < 2**32):
        problems.append(f"{GCS_RECONNECT_TIMEOUT_ENV}={shown(value)} is not a whole number of seconds from 1 to "
                        f"{2**32 - 1} (Ray's own config, which raycv's cluster watch reads too); fix it or unset it "
                        "(60 s)")
    return problems


def _host_port(address: str) -> tuple[str, str, str]:
    """(host, ":" or "", port) of HOST:PORT or SCHEME://HOST:PORT; an IPv6 host without its brackets."""
    host, colon, port = address.partition("://")[2 if "://" in address else 0].rpartition(":")
    return host.removeprefix("[").removesuffix("]"), colon, port


def start_ray(address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS); else start a local Ray. True if we started it.

    Every process of the job (trial drivers, Ray Train's controller and its helpers, fold workers) is told
    the cluster's address (RAY_ADDRESS in the job's runtime environment). Without it, Ray Train's
    PlacementGroupCleaner and TrainStateActor find "their" cluster by looking for GCS processes on the
    machine, and with another Ray instance there (a notebook's ray.init(), a colleague's `ray start`) they
    die with "Found multiple active Ray instances", leaving a finished trial's placement group in place
    and the next trial's workers waiting forever."""
    use_token_auth(address)
    where = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "local":  # as for ray.init: a new local Ray
        address = None
    import ray

    if address:
        _check_reachable(address, where)
        try:
            context = ray.init(address=address, runtime_env=_job_env(_bootstrap_address(address)))
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RaycvError(f"cannot join the Ray cluster at {address}: {str(exc).strip().splitlines()[-1]}") from None
        print(f"joined the Ray cluster at {address}; dashboard: {_url(context.dashboard_url)}", flush=True)
        if note := job_stop_note():
            print(note, flush=True)
        return False
    # "local": always a new Ray of our own, never one a `ray start` left on this machine (which ray.init()
    # would otherwise join, or wait on for minutes if it has died). Its GCS port is chosen here, so that
    # the job's processes can be told it before they start.
    port = _free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the local Ray's start-up (ray._private.node)
    try:
        context = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                           runtime_env=_job_env(f"127.0.0.1:{port}", LOCAL_ONLY_ENV))
    except Exception as exc:  # Ray raises a bare Exception when its processes do not come up in time
        raise RaycvError(f"could not start a local Ray: {first_line(exc)} (is the machine "
                         "overloaded or out of memory? `ray status` shows a Ray already running)") from None
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    if secure_token_file(token_path()):
        print(f"made {token_path()} readable by its owner only (it is the cluster's password)")
    print(f"started a local Ray for this run; dashboard: {_url(context.dashboard_url)} "
          f"(token authentication: the token is in ~/.ray/auth_token)", flush=True)
    return True


def job_stop_note(env=os.environ) -> str | None:
    """As a Ray job's entrypoint (`ray job submit`), a line saying that `ray job stop` would SIGKILL this run
    before it has ended as `interrupted`, and how to submit it so that it does not; else None."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    if RAY_JOB_CONFIG_JSON_ENV_VAR not in env:
        return None
    try:
        wait = float(env.get("RAY_JOB_STOP_WAIT_TIME_S", "3"))  # Ray's JobSupervisor and its default
    except ValueError:
        wait = 3.0
    if wait >= JOB_STOP_WAIT_ENOUGH_S:
        return None
    return (f"note: `ray job stop` gives this run {wait:g} s (RAY_JOB_STOP_WAIT_TIME_S) before SIGKILL, too "
            "little to end it as interrupted with its state saved; submit it with --runtime-env-json "
            f"'{{\"env_vars\": {{\"RAY_JOB_STOP_WAIT_TIME_S\": \"{JOB_STOP_WAIT_S}\"}}}}' (docs/cluster.md)")


def _bootstrap_address(address: str) -> str | None:
    """host:port of the cluster's GCS for `address` ("auto", host:port), as Ray resolves it; None for a Ray
    Client address (ray://), whose job processes run where the cluster's own address is known."""
    if "://" in address:
        return None
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise RaycvError(f"cannot join the Ray cluster at {address}: {str(exc).strip().splitlines()[-1]}") from None


def _job_env(gcs_address: str | None, extra: dict | None = None) -> dict | None:
    env_vars = {**({"RAY_ADDRESS": gcs_address} if gcs_address else {}), **(extra or {})}
    return {"env_vars": env_vars} if env_vars else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_reachable(address: str, where: str = "--address") -> None:
    """Fail fast on a host:port nobody listens on: ray.init would retry it for minutes (a Ray Client address
    for as long as its connection timeout)."""
    host, sep, port = _host_port(address)
    if "://" in address.removeprefix("ray://") or not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise RaycvError(f"cannot join the Ray cluster at {address}: nothing answers there ({exc.strerror or exc}); "
                         f"start it with `ray start --head` or check {where}") from None


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or token_path().is_file()


def secure_token_file(path: Path) -> bool:
    """Make the token file readable and writable by its owner only; True if it had to be changed."""
    if not path.is_file():
        return False
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return False
    path.chmod(0o600)
    return True


def _url(dashboard_url: str | None) -> str:
    if not dashboard_url:
        return "(no dashboard)"
    return dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"


def plan_resources(config: Config, cluster: dict[str, float], joined: bool) -> tuple[float, int | None]:
    """GPUs per fold (resolving auto) and the most trials at a time (None: as many as Tune can place).

    `cluster` is what the cluster holds now (`ray.cluster_resources()`). On a launcher's cluster
    (cluster.yaml's or cluster-onprem.yaml's, known by the head-only driver resource; on-prem workers also
    join some seconds after the head) concurrency is not capped by the nodes up now, and gpus_per_fold auto
    means 1 (a CPU-only cluster sets resources.gpus_per_fold=0):
    Tune queues the trials and their placement groups make the autoscaler add GPU nodes up to its limit,
    within run.max_concurrent_trials. On a fixed machine (a local Ray), as many trials as fit now."""
    workers, resources = config.workers_per_trial, config.resources  # every fold under every seed
    autoscaling = joined and bool(cluster.get(DRIVER_RESOURCE))  # its GPU nodes may all be down right now
    gpus = resources.gpus_per_fold
    gpus = (1.0 if cluster.get("GPU", 0) > 0 or autoscaling else 0.0) if gpus == "auto" else float(gpus)
    need = {"CPU": workers * resources.cpus_per_fold + TRIAL_DRIVER_CPU, "GPU": workers * gpus,
            **{name: workers * amount for name, amount in resources.custom_per_fold.items()}}
    short = [f"{amount:g} {name}, the cluster has {cluster.get(name, 0):g}"
             for name, amount in need.items() if amount > cluster.get(name, 0)]
    if short and not joined:
        raise RaycvError(
            f"one trial ({describe_workers(config)} x resources.*_per_fold, + {TRIAL_DRIVER_CPU} CPU for its driver) "
            f"needs {'; and '.join(short)}; lower resources.cpus_per_fold / gpus_per_fold or join a cluster with "
            "--address"
        )
    if short:
        print(f"waiting for the autoscaler: one trial needs {'; '.join(short)}", flush=True)
    if autoscaling:
        return gpus, config.run.max_concurrent_trials
    fits = [math.floor(cluster.get(name, 0) / amount) for name, amount in need.items() if amount > 0]
    return gpus, config.run.max_concurrent_trials or max(1, min(fits))


def describe_workers(config: Config) -> str:
    """A trial's fold workers in words: "3 fold workers", or "6 fold workers (3 folds x 2 seeds)"."""
    seeds = config.search.seeds_per_trial
    return f"{config.workers_per_trial} fold workers" + (
        f" ({config.data.num_folds} folds x {seeds} seeds)" if seeds > 1 else "")


def trial_driver_resources(cluster: dict[str, float]) -> dict[str, float]:
    """What one trial's driver (its Tune actor) reserves: a little CPU, and on a cluster that offers it
    (the head of cluster.yaml or cluster-onprem.yaml), a share of the head-only resource that keeps drivers
    off the GPU nodes."""
    resources = {"CPU": TRIAL_DRIVER_CPU}
    if cluster.get(DRIVER_RESOURCE):
        resources[DRIVER_RESOURCE] = DRIVER_RESOURCE_SHARE
    return resources


# ---------------------------------------------------------------- the cluster going away under a run

# Ray's own patience with a GCS that stopped answering (its config gcs_rpc_server_reconnect_timeout_s, 60 s by
# default): past it, the driver's Ray core ends the process with one log line and nothing else.
GCS_RECONNECT_TIMEOUT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"


class ClusterWatch:
    """Watches the cluster's GCS port from the driver, in a thread. A head that went away (its machine lost,
    the local Ray killed) leaves Ray's core retrying for gcs_rpc_server_reconnect_timeout_s
    and then ending the driver with its own log line; a GCS that comes back within that time (GCS fault
    tolerance) is reconnected to. Shortly before Ray's patience runs out (5/6 of it, at least 5 s before),
    `on_lost(seconds)` runs once: what raycv says and saves before Ray ends the process. A listening port is
    the kernel's answer, so a busy GCS still counts as there. (Ray stopped in order on the driver's own node
    is not seen here: Ray's core ends the driver at once when its object store goes; driver_guard says it.)"""

    def __init__(self, gcs_address: str, on_lost, poll_s: float = 2.0):
        host, _, port = gcs_address.rpartition(":")
        self.host, self.port, self.poll_s, self.on_lost = host, int(port), poll_s, on_lost
        patience = float(os.environ.get(GCS_RECONNECT_TIMEOUT_ENV) or 60)
        self.give_up_s = max(min(patience * 5 / 6, patience - 5), 1.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raycv-cluster-watch", daemon=True)

    def start(self) -> ClusterWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def answers(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=self.poll_s).close()
            return True
        except OSError:
            return False

    def _run(self) -> None:
        silent_since = None
        while not self._stop.wait(self.poll_s):
            if self.answers():
                silent_since = None
                continue
            silent_since = silent_since or time.monotonic()
            silent_for = time.monotonic() - silent_since
            if silent_for >= self.give_up_s and not self._stop.is_set():
                self.on_lost(silent_for)
                return
