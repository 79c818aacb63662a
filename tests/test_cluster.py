"""Fault tolerance on real Ray clusters: `ray job submit` on a real head, a killed and resubmitted driver, a lost
node, a killed actor, a speculative copy of a slow tail shard, and a shard that keeps failing.

Two clusters, each started once: a `ray start --head` (job server, dashboard, metrics) for the `ray job` tests and
a `ray.cluster_utils.Cluster` (a head without CPUs and two one-CPU worker nodes) for the failure tests. Each gets
its own short RAY_TMPDIR, so neither writes /tmp/ray/ray_current_cluster, where any `ray.init()` on this machine
would find it, and ports of its own, so other Ray clusters on the machine do not matter: the `ray job` tests run
beside a third cluster on Ray's default ports, started for that (docs/testing.md). They are stopped by killing
exactly the processes they started: `ray stop` would kill every Ray process on the machine.
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO
from shards import defect_samples, good_image_bytes, write_not_a_tar, write_shard, write_truncated_tar
from test_job import job_config, tar_keys

from vqpipe.cli import main
from vqpipe.job import tokenize
from vqpipe.plan import shard_id as url_shard_id

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
# The GCS declares a silent node dead after 3 missed 1 s health checks (the defaults take ~20 s).
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


# -- data and output checks ---------------------------------------------------------------------------------------


def write_good_shard(path: Path, n: int) -> None:
    write_shard(
        path, [{"__key__": f"{path.stem}_{i:05d}", "jpg": good_image_bytes(i), "cls": b"1"} for i in range(n)]
    )


def good_shards(shard_dir: Path, count: int, size: int, prefix: str = "s") -> Path:
    """`count` good shards of `size` images each, `<prefix>-0000.tar` on, in a new directory."""
    shard_dir.mkdir()
    for i in range(count):
        write_good_shard(shard_dir / f"{prefix}-{i:04d}.tar", size)
    return shard_dir


def check_exactly_once(out: Path, shard_dir: Path) -> dict[str, dict]:
    """Every tar key is exactly one data row or one error row of its shard; done markers == data files == the
    input shards; nothing half-written is left. Returns the done records."""
    expected = {url_shard_id(str(p)): tar_keys(p) for p in shard_dir.glob("*.tar")}
    done = {
        p.stem: json.loads(p.read_text())
        for p in (out / "_vqpipe" / "done").glob("*.json")
        if not p.name.startswith(".")
    }
    data = {p.stem for p in (out / "data").glob("*.parquet") if not p.name.startswith(".")}
    assert set(done) == data == set(expected)
    for shard_id, keys in expected.items():
        rows = pq.read_table(out / "data" / f"{shard_id}.parquet", columns=["key"]).column("key").to_pylist()
        errors = (
            pq.read_table(out / "_vqpipe" / "errors" / f"{shard_id}.pq", columns=["key"])
            .column("key")
            .to_pylist()
        )
        assert sorted(rows + errors) == keys, shard_id  # a duplicate or a missing key breaks the equality
        assert done[shard_id]["rows"] == len(rows) and done[shard_id]["errors"] == len(errors)
    assert not [p for p in out.rglob(".tmp-*")]
    return done


def done_records(out: Path) -> list[dict]:
    records = []
    for p in (out / "_vqpipe" / "done").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):  # a marker being replaced, or gone
            records.append(json.loads(p.read_text()))
    return records


def done_mtimes(out: Path) -> dict[str, int]:
    return {
        p.stem: p.stat().st_mtime_ns
        for p in (out / "_vqpipe" / "done").glob("*.json")
        if not p.name.startswith(".")
    }


def wait_for(condition, timeout: float, what: str, interval: float = 0.05, explain=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{explain()}" if explain else "")
    )


def messages(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records]


def failed_attempts(records: list[logging.LogRecord]) -> list[str]:
    return [m for m in messages(records) if ": attempt " in m and " failed (" in m]


# -- processes ----------------------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # [0] state, [1] ppid, ... [19] start time


def process_tree(root: int) -> dict[int, str]:
    """pid -> start time of `root` and all its descendants (the start time guards against reused pids)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = _stat(int(entry))
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
            starts[int(entry)] = fields[19]
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return tree


def alive(pid: int) -> bool:
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(tree: dict[int, str]) -> None:
    for pid, start in tree.items():
        try:
            if _stat(pid)[19] == start:
                os.kill(pid, signal.SIGKILL)
        except (OSError, IndexError):
            pass


def encoder_actors() -> dict[int, str]:
    """pid -> node id of this driver's live EncoderActors, from the GCS actor table (the head runs no dashboard,
    so the state API is not there)."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    return {
        a["Pid"]: a["Address"]["NodeID"]
        for a in ray._private.state.actors().values()
        if a["ActorClassName"] == "EncoderActor" and a["State"] == "ALIVE" and a["JobID"] == job and a["Pid"]
    }


def shards_being_written(data_dir: Path, pids) -> dict[str, int]:
    """shard id -> pid of the process holding that shard's temporary data file open (mid-shard)."""
    writing = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = Path(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if target.parent == data_dir and target.name.startswith(".tmp-") and ".parquet" in target.name:
                writing[target.name[len(".tmp-") :].split(".parquet")[0]] = pid
    return writing


class JobThread(threading.Thread):
    """vqpipe.job.tokenize in a thread, so the test can break things while it runs."""

    def __init__(self, cfg):
        super().__init__(daemon=True)
        self.cfg, self.summary, self.error = cfg, None, None

    def run(self):
        try:
            self.summary = tokenize(self.cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self.error = e

    def result(self, timeout: float):
        self.join(timeout)
        assert not self.is_alive(), f"the job did not finish within {timeout:.0f}s"
        if self.error:
            raise self.error
        return self.summary


# -- a real head: `ray start`, `ray job submit` -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something on this machine accepts connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# The one port every Ray node asks for unless told otherwise, even when `ray.init` starts it: its dashboard agent's
# HTTP server (the job agent `ray job submit` needs). A second node asking for it runs without it ("No available
# agent to submit job").
RAY_AGENT_PORT = 52365


# What else a `ray start --head` takes by default and a second cluster on the machine would want too: the agent's
# port, and workers' ports from one fixed range. 0: the system picks a free one (the others are given above).
OWN_PORTS = ("--dashboard-agent-listen-port", "0", "--min-worker-port", "0", "--max-worker-port", "0")


def stop_head(proc: subprocess.Popen) -> None:
    """Stop a `ray start --head --block` and every process it started, and nothing else."""
    # `ray start --block` stops its Ray processes on SIGTERM; then kill whatever of its tree is left (drivers of
    # jobs run in sessions of their own, workers are the raylet's children).
    tree = process_tree(proc.pid)
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    kill_tree(tree)


@pytest.fixture(scope="class")
def neighbour():
    """Another Ray cluster on this machine, as other people's are: Ray's default ports (GCS and client server
    aside, which a second `ray start` could not get), so it holds the dashboard agent's port. Everything the
    tests here start must work beside it."""
    tmp = Path(tempfile.mkdtemp(prefix="vqn", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(tmp)}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
        "--ray-client-server-port", str(free_port()), "--num-cpus", "0", "--include-dashboard", "false",
        "--disable-usage-stats",
    ]  # fmt: skip
    with open(tmp / "neighbour.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def agent_port_taken():  # by the neighbour, or by someone else's cluster already: not ours either way
            assert proc.poll() is None, (tmp / "neighbour.log").read_text()[-3000:]
            return listening(RAY_AGENT_PORT)

        wait_for(agent_port_taken, 120, f"a Ray agent on port {RAY_AGENT_PORT}", interval=0.5)
        yield
    finally:
        stop_head(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Head:
    url: str  # dashboard / job server
    metrics_port: int
    tmp: Path  # RAY_TMPDIR of the head's processes
    env: dict


@pytest.fixture(scope="class")
def head(neighbour):
    import ray

    ray.shutdown()  # a local Ray from earlier test modules: nothing here needs it (ray_session re-inits it)
    tmp = Path(tempfile.mkdtemp(prefix="vqh", dir="/tmp"))  # short: Ray's unix sockets live below it
    dash, metrics = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the job's `python`
        "RAY_TMPDIR": str(tmp),
        "RAY_metrics_report_interval_ms": "1000",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
        "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash), "--metrics-export-port", str(metrics), "--disable-usage-stats",
        "--ray-client-server-port", str(free_port()), *OWN_PORTS,
    ]  # fmt: skip
    with open(tmp / "head.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def job_server_up():
            assert proc.poll() is None, (tmp / "head.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(job_server_up, 120, "the head's job server", interval=0.5)
        yield Head(f"http://127.0.0.1:{dash}", metrics, tmp, env)
    finally:
        stop_head(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def job_args(shard_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "python", "jobs/run_tokenize.py", str(shard_dir), "--output", str(out), "--model", "tiny", "--random-weights",
        "--batch-size", "4", "--max-error-rate", "0.6", *extra,
    ]  # fmt: skip


def ray_job(head: Head, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", *args], env=head.env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def submit(head: Head, submission_id: str, args: list[str], wait: bool = True) -> subprocess.CompletedProcess:
    # No --runtime-env-json excludes: Ray packages --working-dir without what .gitignore lists (.venv/), and 2.60
    # also leaves out .git, .venv, venv and __pycache__ by default. test_ray_job_submit_end_to_end checks.
    opts = ["--address", head.url, "--working-dir", str(REPO), "--submission-id", submission_id]
    deadline = time.monotonic() + 120
    while True:
        res = ray_job(head, "submit", *opts, *([] if wait else ["--no-wait"]), "--", *args)
        # The head's job agent registers a while after its dashboard answers (long on a busy machine); until
        # then the server refuses the submission (HTTP 500) before creating the job, so sending it again is safe.
        if "No available agent to submit job" not in res.stdout + res.stderr or time.monotonic() > deadline:
            return res
        time.sleep(2)


def scrape(head: Head) -> dict[str, list[float]] | None:
    """The head's Prometheus endpoint: the values of each vqpipe series by name (as Prometheus shows it)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{head.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    series: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith("ray_vqpipe_"):
            series.setdefault(line.split("{")[0], []).append(float(line.rsplit(" ", 1)[1]))
    return series


DRIVER_METRICS = {
    "ray_vqpipe_shards_done_total", "ray_vqpipe_shards_failed_total", "ray_vqpipe_shard_retries_total",
    "ray_vqpipe_shards_pending", "ray_vqpipe_shards_in_flight", "ray_vqpipe_replicas_live",
    "ray_vqpipe_replicas_pending", "ray_vqpipe_images_per_second",
}  # fmt: skip


class TestRayJob:
    def test_ray_job_submit_end_to_end(self, head, tmp_path):
        from ray.job_submission import JobStatus, JobSubmissionClient

        # The head's agent cannot have its default port: another cluster has it.
        assert listening(RAY_AGENT_PORT)
        shard_dir = tmp_path / "shards"
        shard_dir.mkdir()
        write_good_shard(shard_dir / "a-0000.tar", 10)
        write_good_shard(shard_dir / "a-0001.tar", 7)
        write_shard(shard_dir / "d-0000.tar", defect_samples(seed=40)[0])
        out = tmp_path / "out"
        client = JobSubmissionClient(head.url)

        assert submit(head, "e2e", job_args(shard_dir, out), wait=False).returncode == 0

        def driver_metrics_while_running():  # the driver's, from its start (failures and retries at 0)
            series = scrape(head) or {}
            running = client.get_job_status("e2e") == JobStatus.RUNNING
            return series if running and set(series) >= DRIVER_METRICS else None

        series = wait_for(
            driver_metrics_while_running, 180, "the driver's metrics while the job runs", interval=1
        )
        assert series["ray_vqpipe_shards_failed_total"] == series["ray_vqpipe_shard_retries_total"] == [0.0]
        assert wait_for(lambda: client.get_job_status("e2e").is_terminal(), 180, "the job to end")
        logs = client.get_job_logs("e2e")
        assert client.get_job_status("e2e") == JobStatus.SUCCEEDED, logs[-4000:]
        assert "summary: 3/3 shards done" in logs
        assert " failed (" not in logs
        done = check_exactly_once(out, shard_dir)
        assert {r["attempt"] for r in done.values()} == {1}
        assert sum(r["rows"] for r in done.values()) == 10 + 7 + 14

        packages = list(head.tmp.glob("ray/session_*/runtime_resources/working_dir_files/*/"))
        assert packages, "the job ran without the uploaded working dir"
        for pkg in packages:
            assert (pkg / "jobs" / "run_tokenize.py").is_file() and (pkg / "vqpipe" / "cluster.py").is_file()
            assert not (pkg / ".venv").exists() and not (pkg / ".git").exists()

    def test_actor_metrics_are_exported(self, head):
        """The actors' Counter/Histogram reach the head's Prometheus endpoint (after the job above), under the
        names docs/operations.md gives."""

        def actor_metrics():
            series = scrape(head) or {}
            return series if sum(series.get("ray_vqpipe_images_total", [])) == 10 + 7 + 14 else None

        series = wait_for(actor_metrics, 60, "vqpipe metrics on the metrics port", interval=1)
        bad = sum(reason is not None for reason in defect_samples(seed=40)[1].values())  # d-0000's
        assert sum(series["ray_vqpipe_sample_errors_total"]) == bad
        assert sum(series["ray_vqpipe_shard_seconds_count"]) == 3

    def test_killed_driver_resubmitted_finishes_without_redoing_committed_shards(self, head, tmp_path):
        from ray.job_submission import JobStatus, JobSubmissionClient

        total = 8
        shard_dir = good_shards(tmp_path / "shards", total, 16)
        out = tmp_path / "out"
        args = job_args(shard_dir, out)
        client = JobSubmissionClient(head.url)

        def n_done():
            return len(done_mtimes(out))

        def job_logs(submission_id):
            return lambda: (
                f"{client.get_job_status(submission_id)}\n{client.get_job_logs(submission_id)[-6000:]}"
            )

        # 1. graceful: stop the job once a shard is committed (what `ray job stop` does, without the seconds the
        #    CLI takes to start, in which the job would commit most of the remaining shards)
        assert submit(head, "drv-1", args, wait=False).returncode == 0
        wait_for(lambda: n_done() >= 1, 180, "a first committed shard", explain=job_logs("drv-1"))
        assert client.stop_job("drv-1")
        assert wait_for(lambda: client.get_job_status("drv-1").is_terminal(), 60, "drv-1 to stop")
        assert client.get_job_status("drv-1") == JobStatus.STOPPED
        after_stop = done_mtimes(out)

        # 2. hard: SIGKILL the driver process once one more shard is committed
        assert submit(head, "drv-2", args, wait=False).returncode == 0
        wait_for(lambda: n_done() > len(after_stop), 180, "a shard by drv-2", explain=job_logs("drv-2"))
        info = wait_for(lambda: client.get_job_info("drv-2").driver_info, 60, "drv-2's driver info")
        os.kill(int(info.pid), signal.SIGKILL)
        assert wait_for(lambda: client.get_job_status("drv-2").is_terminal(), 60, "drv-2 to end")
        assert client.get_job_status("drv-2") == JobStatus.FAILED
        committed = done_mtimes(out)
        assert set(after_stop) < set(committed) and len(committed) < total, "each kill should land mid-run"

        # 3. the same command again finishes the job, exactly once, leaving committed shards alone
        res = submit(head, "drv-3", args)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        assert client.get_job_status("drv-3") == JobStatus.SUCCEEDED
        done = check_exactly_once(out, shard_dir)
        assert sum(r["rows"] for r in done.values()) == 16 * total
        assert {r["attempt"] for r in done.values()} == {1}  # attempts count per run; no run retried a shard
        mtimes = done_mtimes(out)
        assert {s: mtimes[s] for s in committed} == committed
        # These jobs had no sample error: their replicas export the error counter at 0 (an alert reads 0, not
        # "no data"); it used to appear only with the first error.
        errors = wait_for(
            lambda: 0.0 in (scrape(head) or {}).get("ray_vqpipe_sample_errors_total", []), 60, "errors at 0"
        )
        assert errors

    def test_a_local_cluster_starts_beside_other_clusters(self, head):
        """vqpipe's own local cluster (no --address: `cluster.connect`'s `ray.init(address="local")`) starts
        beside the neighbour and the head: its ports are picked free, but for its agent's, which it goes without
        when another cluster has it (a local job never submits to it). Jobs on such a cluster: tests/test_job.py."""
        import ray

        from vqpipe.cluster import connect

        assert listening(RAY_AGENT_PORT)  # someone else has the agent's default port
        ray.shutdown()
        connect(None, num_cpus=1)
        assert ray.get(ray.put("here")) == "here" and ray.cluster_resources()["CPU"] == 1
        ray.shutdown()


# -- a simulated multi-node cluster: node loss, actor crash, speculation, retries ------------------------------


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this process joins the test cluster instead; ray_session starts its own again on demand
    tmp = tempfile.mkdtemp(prefix="vqc", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": HEALTH_CHECKS,
            "dashboard_agent_listen_port": 0,  # every other port of a Cluster's node is picked free already
        },
    )
    try:
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def two_workers(cluster):
    """Two one-CPU worker nodes: one replica each, and no room to restart a replica whose node is lost."""
    while len(cluster.worker_nodes) < 2:
        cluster.add_node(num_cpus=1, dashboard_agent_listen_port=0)
    cluster.wait_for_nodes()
    return cluster


def replicas(shard_dir: Path, out: Path, encode: dict | None = None, **run):
    run = {"replicas": 2, "retry_backoff_s": 0.5, "max_attempts": 3, **run}
    return job_config([shard_dir], out, encode=encode or {}, run=run)


class TestFailures:
    @pytest.mark.parametrize("failure", ["node_lost", "actor_killed", "raylet_killed"])
    def test_job_survives_losing_a_replica_mid_shard(self, two_workers, tmp_path, driver_log, failure):
        shard_dir = good_shards(tmp_path / "shards", 6, 32)
        out = tmp_path / "out"
        # Speculation would copy the lost shards before the death is noticed (a hung replica's in particular,
        # before its node is declared dead), and then nothing would be retried: not here.
        job = JobThread(replicas(shard_dir, out, speculative=False))
        job.start()

        # Each replica starts two shards at once. Take the replica writing the first shard that shows up; the shards
        # it is writing when it goes are `lost` (one may still commit in the instant before the kill lands).
        writing = wait_for(
            lambda: shards_being_written(out / "data", encoder_actors()), 120, "a replica mid-shard"
        )
        pid = writing[min(writing)]
        lost = {s for s, p in writing.items() if p == pid}
        node = next(n for n in two_workers.worker_nodes if n.node_id == encoder_actors()[pid])
        if failure == "node_lost":
            two_workers.remove_node(node, allow_graceful=False)
        elif failure == "raylet_killed":
            # Only the raylet dies: its workers live on, orphaned. This one is also hung (stopped), so it cannot
            # notice by itself: the driver must kill it once it learns that the node is dead.
            os.kill(pid, signal.SIGSTOP)
            os.kill(node.all_processes["raylet"][0].process.pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)

        try:
            summary = job.result(timeout=180)
        finally:
            if failure == "raylet_killed":
                orphan_alive = alive(pid)
                if orphan_alive:
                    os.kill(pid, signal.SIGKILL)
                two_workers.remove_node(node, allow_graceful=False)  # the rest of the dead node's processes
        assert summary.ok and not summary.failed
        done = check_exactly_once(out, shard_dir)
        if failure == "raylet_killed":
            assert not orphan_alive, "the orphaned replica outlived the job"
            assert any(f"killed its process {pid}, left running on" in m for m in messages(driver_log))
            # its shards were finished elsewhere: retried once the node was declared dead, or copied by
            # speculation while it hung (whichever came first)
            assert all(done[s]["pid"] != pid for s in lost), (lost, done)
            return
        # The lost shards were retried by another process; only they were, and only because the replica died.
        retried = {s for s, r in done.items() if r["attempt"] > 1}
        assert retried & lost and all(done[s]["pid"] != pid for s in retried), (lost, done)
        assert any("died" in m and "retrying elsewhere" in m for m in messages(driver_log))
        failures = failed_attempts(driver_log)
        assert failures and all("(actor_died: " in m for m in failures), failures
        assert retried <= {m.split(":")[0] for m in failures}

    def test_small_shards_travel_in_bundles_and_a_bad_one_fails_alone(
        self, two_workers, tmp_path, driver_log
    ):
        good, bad = tmp_path / "good", tmp_path / "z-bad"  # the bad shard comes last: bundles have begun
        good.mkdir()
        bad.mkdir()
        for i in range(40):
            write_good_shard(good / f"s-{i:04d}.tar", 1)
        write_not_a_tar(bad / "x-0000.tar")
        bad_id = url_shard_id(str(bad / "x-0000.tar"))
        out = tmp_path / "out"
        summary = tokenize(job_config([good, bad], out, encode={"batch_size": 8}, run={"replicas": 2}))

        assert not summary.ok and set(summary.failed) == {bad_id}
        assert summary.failed[bad_id]["reason"] == "not_a_tar" and summary.failed[bad_id]["attempts"] == 1
        done = check_exactly_once(out, good)  # every good shard committed once, with its one row
        assert {r["attempt"] for r in done.values()} == {1}
        shapes = [m for m in messages(driver_log) if m.startswith("shards average")]
        assert shapes and shapes[-1].endswith("16 in flight per replica, 8 per call"), shapes

    def test_killing_a_replica_mid_bundle_retries_its_shards_and_loses_none(
        self, two_workers, tmp_path, driver_log
    ):
        shard_dir = good_shards(tmp_path / "shards", 60, 2)
        out = tmp_path / "out"
        # 4 two-image shards per call; no speculation: its copies of the killed replica's shards (slow after 1 s
        # beside a median of 0 s) may commit before the death is noticed, and then nothing is retried
        job = JobThread(replicas(shard_dir, out, encode={"batch_size": 8}, speculative=False))
        job.start()

        def bundling_and_mid_shard():  # bundles begin once a shard has finished
            if not any(m.endswith("4 per call") for m in messages(driver_log)):
                return None
            return shards_being_written(out / "data", encoder_actors())

        writing = wait_for(bundling_and_mid_shard, 120, "a replica mid-shard after bundles began")
        pid = writing[min(writing)]
        os.kill(pid, signal.SIGKILL)

        summary = job.result(timeout=180)
        assert summary.ok and not summary.failed
        done = check_exactly_once(out, shard_dir)  # nothing lost, nothing twice
        retried = {s for s, r in done.items() if r["attempt"] > 1}
        assert retried and all(done[s]["pid"] != pid for s in retried), done
        # Logged once per death (with the shards of the call that reported it first), not once per call.
        assert any("died" in m and "retrying elsewhere" in m for m in messages(driver_log))
        failures = failed_attempts(driver_log)
        assert failures and all("(actor_died: " in m for m in failures), failures
        assert retried <= {m.split(":")[0] for m in failures}

    def test_slow_tail_shard_gets_a_speculative_copy_and_the_frozen_original_is_not_waited_for(
        self, two_workers, tmp_path, driver_log
    ):
        shard_dir = good_shards(tmp_path / "shards", 4, 6, prefix="a")
        write_good_shard(shard_dir / "z-big.tar", 120)  # last in shard order: the tail
        out = tmp_path / "out"
        job = JobThread(replicas(shard_dir, out))
        job.start()

        # Freeze the replica that runs the big shard, as a sick node would: only a copy can finish it.
        pid = wait_for(
            lambda: shards_being_written(out / "data", encoder_actors()).get(
                url_shard_id(str(shard_dir / "z-big.tar"))
            ),
            120,
            "z-big",
        )
        os.kill(pid, signal.SIGSTOP)
        try:  # the job ends while the original is still frozen: a losing copy is not waited for
            summary = job.result(timeout=180)
        finally:
            os.kill(pid, signal.SIGCONT)

        assert summary.ok
        done = check_exactly_once(out, shard_dir)
        assert not failed_attempts(driver_log) and {r["attempt"] for r in done.values()} == {1}
        big = url_shard_id(str(shard_dir / "z-big.tar"))
        assert done[big]["pid"] != pid and done[big]["rows"] == 120
        log = messages(driver_log)
        copies = [m for m in log if m.startswith(f"{big}: slow") and "speculative copy" in m]
        assert len(copies) == 1, log  # one copy per shard, never one of a committed shard

    def test_shard_that_keeps_failing_is_retried_with_backoff_then_reported_and_not_retried_the_next_night(
        self, two_workers, tmp_path, driver_log, capsys
    ):
        shard_dir = tmp_path / "shards"
        shard_dir.mkdir()
        write_good_shard(shard_dir / "good-0000.tar", 5)
        # A tar cut short may be a copy still in progress: retried (not_a_tar would fail at once, for good)
        write_truncated_tar(
            shard_dir / "bad-0000.tar", [{"__key__": f"k{i}", "jpg": good_image_bytes(i)} for i in range(4)]
        )
        bad, good = (
            url_shard_id(str(shard_dir / "bad-0000.tar")),
            url_shard_id(str(shard_dir / "good-0000.tar")),
        )
        config = tmp_path / "job.toml"
        config.write_text("[run]\nretry_backoff_s = 1.0\n")
        out = tmp_path / "out"
        cpu = time.process_time()
        args = [
            "tokenize", str(shard_dir), "--output", str(out), "--config", str(config), "--model", "tiny",
            "--random-weights", "--max-attempts", "3",
        ]  # fmt: skip
        rc = main(args)
        cpu = time.process_time() - cpu
        assert rc == 1
        log = messages(driver_log)
        assert any(m.startswith(f"failed shard {bad}: truncated_tar") for m in log), log
        assert any(f"1 shard(s) failed: {bad}" in m for m in log), log
        failed = json.loads((out / "_vqpipe" / "failed" / f"{bad}.json").read_text())
        assert failed["reason"] == "truncated_tar" and failed["attempts"] == 3
        assert not (out / "_vqpipe" / "done" / f"{bad}.json").exists()
        assert json.loads((out / "_vqpipe" / "done" / f"{good}.json").read_text())["attempt"] == 1
        assert all(m.startswith(f"{bad}: ") for m in failed_attempts(driver_log))
        # exponential backoff: 1 s, then 2 s between the attempts
        fails = [r for r in driver_log if r.getMessage().startswith(f"{bad}: attempt")]
        assert [r.getMessage().split("retry in ")[1] for r in fails] == ["1.0s", "2.0s"]
        final = next(r for r in driver_log if r.getMessage().startswith(f"{bad}: failed after 3 attempts"))
        assert fails[1].created - fails[0].created >= 1.0 and final.created - fails[1].created >= 2.0
        # Nothing runs during the 3 s of backoff: the driver sleeps through it (it used to spin a core on
        # ray.wait([]), which returns at once).
        assert cpu < 1.0
        assert (
            failed["kind"] == "input"
            and failed["fingerprint"]["size"] == (shard_dir / "bad-0000.tar").stat().st_size
        )

        # The next night, over the same (unchanged) input: the truncated tar is not retried (it used to be, 3
        # times, every night), stays failed and listed, and the run still exits 1...
        driver_log.clear()
        assert main(args) == 1
        assert not failed_attempts(driver_log)
        log = messages(driver_log)
        assert any("input is unchanged: not retried" in m and f"{bad} (truncated_tar)" in m for m in log), log
        assert any(m.startswith(f"failed shard {bad}: truncated_tar") and "not retried" in m for m in log), (
            log
        )
        assert json.loads((out / "_vqpipe" / "failed" / f"{bad}.json").read_text()) == failed
        # ... unless that failure is allowed: exit 0, the shard still listed, in the summary and in status
        driver_log.clear()
        assert main([*args, "--max-failed-shards", "1"]) == 0
        assert f"1 shard(s) failed, within the 1 allowed: {bad}" in messages(driver_log)
        assert main(["status", str(out), "--json"]) == 1
        status = json.loads(capsys.readouterr().out)
        assert status["failed_shards"] == {bad: "truncated_tar"}
        assert status["last_run"]["result"] == "within_allowance" and status["last_run"]["exit_code"] == 0


# -- replicas that follow the cluster ------------------------------------------------------------------------------


@pytest.fixture
def add_node(two_workers):
    """Add a node to the two one-CPU workers for one test; removed after it (the failure tests count on two)."""
    added = []

    def add(**resources):
        added.append(two_workers.add_node(**resources))
        two_workers.wait_for_nodes()
        return added[-1]

    yield add
    for node in added:
        two_workers.remove_node(node, allow_graceful=False)
    two_workers.wait_for_nodes()


def started_replicas(records: list[logging.LogRecord]) -> dict[str, tuple[str, int]]:
    """replica name -> (node id prefix, pid), from the pool's "replica-N started on node ..." lines."""
    out = {}
    for m in messages(records):
        if " started on node " in m:
            name, rest = m.split(" started on node ", 1)
            out[name] = (rest.split(" ", 1)[0], int(rest.split(", pid ", 1)[1].split(",", 1)[0]))
    return out


class TestElastic:
    def test_a_cpu_node_that_joins_mid_run_gets_a_replica_that_commits_shards(
        self, two_workers, add_node, tmp_path, driver_log
    ):
        shard_dir = good_shards(tmp_path / "shards", 24, 8)
        out = tmp_path / "out"
        job = JobThread(job_config([shard_dir], out))  # replicas: auto, one per 1-CPU node
        job.start()
        wait_for(lambda: done_mtimes(out), 120, "a first commit")
        # Hold the two replicas (as a slow machine would) so that the job is not over before a replica on the
        # new node is up, 5-15 s later: the shards left wait for it.
        first = wait_for(lambda: len(a := encoder_actors()) == 2 and a, 60, "both replicas")
        for pid in first:
            os.kill(pid, signal.SIGSTOP)
        try:
            node = add_node(num_cpus=1)
            new = wait_for(
                lambda: {p for p, n in encoder_actors().items() if n == node.node_id},
                60,
                "a replica on the new node",
            )
            wait_for(lambda: {r["pid"] for r in done_records(out)} & new, 60, "a commit by the new replica")
        finally:
            for pid in first:
                os.kill(pid, signal.SIGCONT)

        summary = job.result(timeout=120)
        assert summary.ok
        check_exactly_once(out, shard_dir)
        started = started_replicas(driver_log)  # each change logged
        assert node.node_id.startswith(started["replica-2"][0]) and started["replica-2"][1] in new, started
        log = " ".join(messages(driver_log))
        assert "requesting 1 replica(s) of 1 CPU + 0 GPU (the cluster can host 3;" in log

    def test_with_room_for_one_of_two_gpu_replicas_only_the_placed_one_gets_shards(
        self, two_workers, add_node, tmp_path, driver_log
    ):
        """Ray counts a GPU that the node declares (none is there: the replica encodes on the CPU). The replica
        that cannot be placed used to be handed shards, which waited there until speculation copied them."""
        add_node(num_cpus=1, num_gpus=1)
        shard_dir = good_shards(tmp_path / "shards", 6, 8)
        out = tmp_path / "out"
        run = {"replicas": 2, "gpus_per_replica": 1, "cpus_per_replica": 1}
        summary = tokenize(job_config([shard_dir], out, model={"device": "cpu"}, run=run))

        assert summary.ok
        done = check_exactly_once(out, shard_dir)
        log = messages(driver_log)
        assert not [m for m in log if "speculative copy" in m], log
        assert len({r["pid"] for r in done.values()}) == 1 and {r["attempt"] for r in done.values()} == {1}
        assert len(started_replicas(driver_log)) == 1  # the other never started, and got no shard
        assert (
            "2 replicas of 1 CPU + 1 GPU wanted; the cluster can host 1 now: the others wait to be placed"
            in (" ".join(log))
        )

    def test_no_room_for_any_replica_exits_with_the_capacity_code_and_status_says_so(
        self, two_workers, tmp_path, driver_log, capsys
    ):
        shard_dir = good_shards(tmp_path / "shards", 1, 2)
        out = tmp_path / "out"
        (tmp_path / "c.toml").write_text("[run]\nplacement_timeout_s = 2\n")
        args = ["tokenize", str(shard_dir), "-o", str(out), "--model", "tiny", "--random-weights"]
        assert main([*args, "--gpus-per-replica", "1", "--config", str(tmp_path / "c.toml")]) == 75
        log = " ".join(messages(driver_log))
        assert "replica-0 given up: not placed in 2s; it needs 1 CPU + 1 GPU, the cluster has {" in log
        assert "no encoder replica could be placed in 2s: each needs 1 CPU + 1 GPU; the cluster has {" in log
        assert main(["status", str(out), "--json"]) == 1
        last = json.loads(capsys.readouterr().out)["last_run"]
        assert last["result"] == "no_capacity" and last["exit_code"] == 75
        assert last["detail"].startswith("no encoder replica could be placed in 2s")


def test_a_replica_exits_when_its_raylet_dies(tmp_path):
    """A stand-in raylet (the replica's parent, named by RAY_RAYLET_PID as Ray names it to its workers) is
    killed: the replica process notices and exits by itself, wherever it runs (the driver can only reach
    processes on its own host)."""
    child = (
        "import os, time; os.environ['RAY_RAYLET_PID'] = str(os.getppid()); "
        "from vqpipe.replicas import _exit_with_raylet; _exit_with_raylet('replica-0'); "
        "print(os.getpid(), flush=True); time.sleep(60)"
    )
    parent = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    )
    raylet = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, cwd=REPO)
    replica = 0
    try:
        replica = int(raylet.stdout.readline())
        assert alive(replica)
        raylet.kill()
        raylet.wait()
        wait_for(lambda: not alive(replica), 10, "the orphaned replica to exit")
    finally:
        raylet.kill()
        if replica and alive(replica):
            os.kill(replica, signal.SIGKILL)
