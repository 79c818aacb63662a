"""Shared fixtures. Ray and any server a test starts listen on 127.0.0.1 only, and are stopped at the end."""

import os

# Ray reads these when it is imported: every Ray listener on loopback, no usage reporting, no token auth
# between the test's `ray job` CLI calls and the head it starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# gcsfs: no gRPC "zonal bucket" probe (60 s per call against the GCS emulator); see tests/gcsserver.py
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

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


@pytest.fixture
def tiny_disk(tmp_path):
    """A real, nearly full filesystem: a 256 KiB tmpfs mounted under tmp_path (needs root; skipped without)."""
    import subprocess

    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


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
