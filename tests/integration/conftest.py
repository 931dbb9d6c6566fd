"""Fixtures for integration tests that talk S3: a private SeaweedFS server on loopback.

Nothing here skips: if the `weed` binary is missing the fixtures error out with the install
hint, because an integration run that silently tests nothing is worse than a red one.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec.config
import pytest
import s3fs

from tests.integration.browser import chromium  # noqa: F401  (headless Chromium fixture)
from tests.integration.ray_cluster import ray_local  # noqa: F401  (the shared Ray fixture)
from tests.integration.s3server import SeaweedS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the whole session; signed requests only."""
    # Under pytest's basetemp so weed.log of a failed run is still there to read afterwards.
    with SeaweedS3(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3, request: pytest.FixtureRequest) -> str:
    """A new, empty bucket for this test, named after it (so stray objects are traceable)."""
    # Bucket names: 3-63 characters of [a-z0-9-], starting and ending with a letter or digit.
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].rstrip("-")
    # Left in place afterwards: every test gets its own bucket, and the server's data dir is
    # discarded with the session.
    return s3_server.make_bucket(f"t-{slug}-{uuid.uuid4().hex[:8]}")


def isolated_aws_env(
    server_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict[str, str]:
    """Set the standard AWS environment to ``server_env`` and nothing of the host's.

    Returns the variables it set, e.g. to hand on to subprocesses or Ray runtime_env.
    """
    # Host settings must not leak in: a profile, session token, CA bundle or a
    # service-specific AWS_ENDPOINT_URL_S3 (which beats AWS_ENDPOINT_URL) would change where
    # requests go or how they are signed. FSSPEC_S3_* would reach s3fs in subprocesses.
    for key in list(os.environ):
        if key.startswith(("AWS_", "FSSPEC_")):
            monkeypatch.delenv(key)
    env = {
        **server_env,
        # Files that do not exist: ~/.aws/config and ~/.aws/credentials are ignored.
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    # A host HTTP(S)_PROXY must not swallow requests to the loopback server.
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # fsspec read FSSPEC_* and ~/.config/fsspec into this dict at import time; its s3 entry
    # would be merged into every S3FileSystem() made in this process.
    monkeypatch.setattr(fsspec.config, "conf", {})
    # fsspec hands back cached S3FileSystem instances for equal arguments, and S3FileSystem()
    # with no arguments may already exist with credentials from before this was called.
    s3fs.S3FileSystem.clear_instance_cache()
    return env


@pytest.fixture
def s3_env(
    s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """Point the standard AWS environment at the test server, and only at it."""
    yield isolated_aws_env(s3_server.env(), monkeypatch, tmp_path)
    s3fs.S3FileSystem.clear_instance_cache()
