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


class TestRayJob:
    def test_ray_job_submit_end_to_end(self, head, tmp_path):
        # The head's agent cannot have its default port: another cluster has it.
        assert listening(RAY_AGENT_PORT)
        shard_dir = tmp_path / "shards"
        shard_dir.mkdir()
        write_good_shard(shard_dir / "a-0000.tar", 10)
        write_good_shard(shard_dir / "a-0001.tar", 7)
        write_shard(shard_dir / "d-0000.tar", defect_samples(seed=40)[0])
        out = tmp_path / "out"

        res = submit(head, "e2e", job_args(shard_dir, out))
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        assert "summary: 3/3 shards done" in res.stdout + res.stderr
        assert " failed (" not in res.stdout + res.stderr
        done = check_exactly_once(out, shard_dir)
        assert {r["attempt"] for r in done.values()} == {1}
        assert sum(r["rows"] for r in done.values()) == 10 + 7 + 14

        packages = list(head.tmp.glob("ray/session_*/runtime_resources/working_dir_files/*/"))
        assert packages, "the job ran without the uploaded working dir"
        for pkg in packages:
            assert (pkg / "jobs" / "run_tokenize.py").is_file() and (pkg / "vqpipe" / "cluster.py").is_file()
            assert not (pkg / ".venv").exists() and not (pkg / ".git").exists()

    def test_actor_metrics_are_exported(self, head):
        """The actors' Counter/Histogram reach the head's Prometheus endpoint (after the job above)."""

        def scrape():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{head.metrics_port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                return None
            lines = [line for line in text.splitlines() if "vqpipe_" in line and not line.startswith("#")]
            names = {line.split("{")[0] for line in lines}
            images = sum(float(line.rsplit(" ", 1)[1]) for line in lines if "vqpipe_images" in line)
            return (names, images) if images and any("vqpipe_shard_seconds" in n for n in names) else None

        names, images = wait_for(scrape, 60, "vqpipe metrics on the metrics port", interval=1)
        assert images == 10 + 7 + 14, names
        assert any("vqpipe_sample_errors" in n for n in names)

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


@pytest.fixture(scope="class")
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
    @pytest.mark.parametrize("failure", ["node_lost", "actor_killed"])
    def test_job_survives_losing_a_replica_mid_shard(self, two_workers, tmp_path, driver_log, failure):
        shard_dir = good_shards(tmp_path / "shards", 6, 32)
        out = tmp_path / "out"
        job = JobThread(replicas(shard_dir, out))
        job.start()

        # Each replica starts two shards at once. Take the replica writing the first shard that shows up; the shards
        # it is writing when it goes are `lost` (one may still commit in the instant before the kill lands).
        writing = wait_for(
            lambda: shards_being_written(out / "data", encoder_actors()), 120, "a replica mid-shard"
        )
        pid = writing[min(writing)]
        lost = {s for s, p in writing.items() if p == pid}
        if failure == "node_lost":
            node_id = encoder_actors()[pid]
            node = next(n for n in two_workers.worker_nodes if n.node_id == node_id)
            two_workers.remove_node(node, allow_graceful=False)
        else:
            os.kill(pid, signal.SIGKILL)

        summary = job.result(timeout=180)
        assert summary.ok and not summary.failed
        done = check_exactly_once(out, shard_dir)
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
        job = JobThread(replicas(shard_dir, out, encode={"batch_size": 8}))  # 4 two-image shards per call
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

    def test_shard_that_keeps_failing_is_retried_with_backoff_then_reported(
        self, two_workers, tmp_path, driver_log
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
        rc = main([
            "tokenize", str(shard_dir), "--output", str(out), "--config", str(config), "--model", "tiny",
            "--random-weights", "--max-attempts", "3",
        ])  # fmt: skip
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


@pytest.mark.parametrize(
    "nodes, gpus, replicas, want",
    [
        ([{"CPU": 96, "GPU": 8}], 1, 8, 12),  # each GPU's replica gets its share of the node's CPUs
        # the smallest share, so that every replica fits
        ([{"CPU": 96, "GPU": 8}, {"CPU": 16, "GPU": 4}], 1, 12, 4),
        ([{"CPU": 4}, {"CPU": 16, "GPU": 2}], 2, 1, 16),  # CPU-only nodes don't count for GPU replicas
        ([{"CPU": 8}], 1, 1, 1),  # GPU nodes not up yet (autoscaler): the old default
        ([{"CPU": 2}], 0, 1, 2),  # CPU-only, one replica: every CPU
        ([{"CPU": 8}, {"CPU": 4}], 0, 4, 3),  # the cluster's CPUs shared by the replicas
        ([{"CPU": 8}, {"CPU": 4}], 0, 1, 8),  # ... but never more than one node has
    ],
)
def test_cpus_per_replica_default_follows_the_cluster(nodes, gpus, replicas, want):
    from vqpipe.replicas import replica_cpus

    assert replica_cpus(nodes, gpus, replicas) == want
