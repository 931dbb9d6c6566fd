"""One local Ray cluster shared by every integration test (Ray's own test guide: start once)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.integration.corpus import crash_scan

# Logical CPUs, more than the 2 real cores of CI machines: Ray Train's workers, Ray Data's
# decode/encode tasks and the colorizer actors must all fit at once or a job waits forever.
TEST_CLUSTER_CPUS = 4


@pytest.fixture(scope="session")
def ray_local() -> Iterator[dict[str, object]]:
    """Start (once) a local Ray cluster; yields ray.init's context info."""
    import ray
    import torch

    # Workers must import this checkout's packages (models/, pipeline/) like the driver does.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p
    )
    # The workers die (SIGKILL) on this one scan, as on a codec segfault (test_reliability).
    os.environ["CHROMASCAN_TEST_CRASH_SHA256"] = hashlib.sha256(crash_scan()).hexdigest()
    # A short private temp dir: Ray's unix socket paths must stay under 108 bytes, which
    # pytest's nested tmp_path can exceed; and a shared /tmp/ray would mix runs.
    temp_dir = tempfile.mkdtemp(prefix="cs-ray-")
    context = ray.init(
        num_cpus=TEST_CLUSTER_CPUS,
        # GPU paths are tested where there is one (a lent GPU machine); CI has none.
        num_gpus=torch.cuda.device_count(),
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="WARNING",
        log_to_driver=False,
        configure_logging=True,
    )
    try:
        yield {"address": context.address_info.get("address"), "temp_dir": temp_dir}
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
