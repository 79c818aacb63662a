"""Shared fixtures. Ray and any server a test starts listen on 127.0.0.1 only, and are stopped at the end.

The unit layer (`pytest -m "not slow"`) runs without Ray: a test that starts Ray in any way (ray.init, a
Cluster, `ray start`, a `vqpipe tokenize` subprocess) without `@pytest.mark.slow` fails (see
`_unit_tests_start_no_ray` and `pytest_runtest_setup` below).
"""

import atexit
import contextlib
import os
import shutil
import tempfile

# Ray reads these when it is imported: every Ray listener on loopback, no usage reporting, no token auth
# between the test's `ray job` CLI calls and the head it starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# gcsfs: no gRPC "zonal bucket" probe (60 s per call against the GCS emulator); see tests/gcsserver.py
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Every Ray this session or its subprocesses start keeps its session directory under a temp dir of this pytest
# process alone (short: Ray's socket paths live under it), where the guard below counts them; concurrent test
# runs on one machine also stop sharing /tmp/ray/ray_current_cluster, which `ray.init()` would find.
RAY_TMP = tempfile.mkdtemp(prefix="vqpt", dir=os.environ.get("RAY_TMPDIR") or "/tmp")
os.environ["RAY_TMPDIR"] = RAY_TMP
atexit.register(shutil.rmtree, RAY_TMP, ignore_errors=True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_VAR = REPO.parent / "shared" / "var"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def _ray_sessions() -> set[str]:
    sessions = Path(RAY_TMP, "ray")
    return {p.name for p in sessions.glob("session_*") if not p.is_symlink()} if sessions.is_dir() else set()


_ray_sessions_seen: set[str] = set()


def pytest_runtest_setup(item):
    if "ray_session" in item.fixturenames and item.get_closest_marker("slow") is None:
        pytest.fail(
            "uses ray_session without @pytest.mark.slow: the unit layer runs without Ray", pytrace=False
        )


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request):
    """Fails a test not marked slow that leaves a new Ray session directory behind: whoever started that Ray
    (this process, a Ray `Cluster`, `ray start`, a subprocess), its session directory is under RAY_TMP."""
    slow = request.node.get_closest_marker("slow") is not None
    yield
    started = _ray_sessions() - _ray_sessions_seen
    _ray_sessions_seen.update(started)
    if started and not slow:
        pytest.fail(
            f"started Ray ({sorted(started)} under {RAY_TMP}/ray) without @pytest.mark.slow: "
            "the unit layer (-m 'not slow') runs without Ray",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _vqpipe_logger_restored():
    """A test that runs `vqpipe.cli.main` gets a stderr handler bound to its own captured stderr
    (logs.setup_logging); left in place, a later test's log lines would go to that closed stream ("--- Logging
    error ---" and a traceback on stderr). Each test starts with the `vqpipe` logger as it was."""
    import logging

    logger = logging.getLogger("vqpipe")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture(scope="session")
def _ray_shutdown_at_end():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(_ray_shutdown_at_end):
    """A local Ray instance (2 CPUs, loopback) shared by the tests that need one: started on first use and
    again only if a test that builds its own cluster (tests/test_cluster.py) shut it down."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def s3():
    """A real S3 API (moto's server) on 127.0.0.1 for the whole session; see tests/s3server.py."""
    from s3server import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP threads stall badly on a busy 2-core CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def mounted(args: list[str], mnt: Path):
    """`mount ARGS MNT` while in the block, then a lazy unmount (needs root: skips the test without)."""
    import subprocess

    mnt.mkdir(exist_ok=True)
    res = subprocess.run(["mount", *args, str(mnt)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount {' '.join(args)} here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real, nearly full filesystem: a 256 KiB tmpfs mounted under tmp_path (needs root; skipped without)."""
    with mounted(["-t", "tmpfs", "-o", "size=256k", "tmpfs"], tmp_path / "tiny-disk") as mnt:
        yield mnt


@pytest.fixture
def driver_log():
    """The driver's vqpipe log records (a handler on the `vqpipe` logger: setup_logging stops propagation)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("vqpipe")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def tiny_worker(tmp_path_factory, one_torch_thread):
    """A real ShardWorker (tiny preset, random weights, CPU, one torch thread, batches of 4) for the reader and
    accounting tests of one module, accepting any error rate. Its OUT is on tmpfs where there is one: a commit's
    fsyncs cost nothing there (half the time of the fuzz's hundreds of shards on disk)."""
    from vqpipe.config import build_config
    from vqpipe.worker import ShardWorker

    shm = Path("/dev/shm")
    on_tmpfs = shm.is_dir() and os.access(shm, os.W_OK)
    root = (
        Path(tempfile.mkdtemp(prefix="vqpt-worker-", dir=shm)) if on_tmpfs else tmp_path_factory.mktemp("w")
    )
    cfg = build_config(
        {
            "inputs": [str(root)],
            "output": str(root / "tokens"),
            "model": {"preset": "tiny", "random_weights": True, "device": "cpu"},
            "encode": {"batch_size": 4},
            "run": {"max_error_rate": 1.0},
        }
    )
    worker = ShardWorker.from_config(cfg, cpus=1)
    try:
        yield worker
    finally:
        worker.close()
        if on_tmpfs:
            shutil.rmtree(root, ignore_errors=True)
