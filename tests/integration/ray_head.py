"""A real local Ray head with its dashboard (Jobs API), as a cluster's head node would run.

`LocalRayHead` runs ``ray start --head --block`` in its own process group, on free loopback
ports, with a private temp dir and its own auth token, so that it shares nothing with the
in-process test cluster (`ray_local`), with other Ray instances on the machine or with
~/.ray: every port Ray would otherwise default (6379, 8265, 10001, 52365, ...) is given, and
ray.init() elsewhere never finds it because its address file lives in the private temp dir.
Nothing in the test process calls ray.init against it; tests talk to it over HTTP, through
CLI subprocesses that get `client_env()`.

It is stopped by SIGKILL to its process group, not `ray stop`: `ray stop` kills every Ray
process of the user on the machine, the in-process test cluster included, and a SIGTERMed
head drains for up to 30 s, which a throw-away test cluster does not need.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.integration.s3server import _die_with_parent, free_ports

# Ports `ray start --head` would otherwise take from fixed defaults or pick itself.
_PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)

# Variables of the test process that must not reach the head: credentials (a job must get
# them only by --forward-env), Ray settings and addresses of the in-process cluster, and a
# PYTHONPATH pointing at the checkout, which would hide a broken working_dir upload.
_DROPPED_PREFIXES = ("AWS_", "RAY_", "FSSPEC_")
_DROPPED = ("PYTHONPATH",)


class RayHeadError(RuntimeError):
    """The local Ray head could not be started."""


def _venv_bin() -> str:
    return str(Path(sys.executable).parent)


def _ray_binary() -> str:
    found = shutil.which("ray", path=_venv_bin()) or shutil.which("ray")
    if found is None:
        raise RayHeadError(f"no `ray` executable next to {sys.executable} or on PATH")
    return found


class LocalRayHead:
    """One Ray head node on 127.0.0.1 with the dashboard; a context manager."""

    def __init__(self, *, num_cpus: int = 4, startup_timeout: float = 120.0) -> None:
        self.num_cpus = num_cpus
        self.startup_timeout = startup_timeout
        # Short: Ray's unix socket paths under it must stay below 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="cs-head-"))
        self.log_path = self.temp_dir / "ray-start.log"
        self.token = "chromascan-test-token-" + secrets.token_hex(16)
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for a process that talks to this head: its token, no stray settings."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(_DROPPED_PREFIXES) and key not in _DROPPED
        }
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, PYTHONUNBUFFERED="1")
        # The dashboard is on loopback; a host proxy must not get the requests.
        env["NO_PROXY"] = env["no_proxy"] = ",".join(
            filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])
        )
        env.update(extra)
        return env

    def _head_env(self) -> dict[str, str]:
        env = self.client_env(RAY_USAGE_STATS_ENABLED="0")
        # Job entrypoints run `python`: this venv's, as on a cluster image.
        env["PATH"] = os.pathsep.join([_venv_bin(), env.get("PATH", "")])
        return env

    def _command(self) -> list[str]:
        return [
            _ray_binary(), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", f"--num-cpus={self.num_cpus}", "--num-gpus=0",
            f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
            *(f"--{flag}={port}" for flag, port in self.ports.items()),
        ]  # fmt: skip

    def start(self) -> LocalRayHead:
        self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._head_env(),
                cwd=self.temp_dir,
                # Its own process group, so stop() can kill everything it started; and it dies
                # with pytest even when no teardown runs (Ray's children fate-share with it).
                # preexec_fn only calls prctl (see _die_with_parent), safe with threads.
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_until_ready(self) -> None:
        # Jobs can be submitted once the dashboard's job module answers and the head node's
        # agent (which runs the job supervisors) is up; the dashboard comes up first.
        urls = [
            f"{self.dashboard_url}/api/jobs/",
            f"http://127.0.0.1:{self.ports['dashboard-agent-listen-port']}/api/healthz",
        ]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RayHeadError(
                    f"ray start exited with {self._proc.returncode}: {self.log_tail()}"
                )
            while urls and self._answers(opener, urls[0]):
                urls.pop(0)
            if not urls:
                return
            time.sleep(0.5)
        raise RayHeadError(
            f"Ray dashboard not ready after {self.startup_timeout:.0f} s: {self.log_tail()}"
        )

    def _answers(self, opener: urllib.request.OpenerDirector, url: str) -> bool:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with opener.open(request, timeout=5) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def files_containing(self, needle: str) -> list[Path]:
        """Every file under the head's temp dir (its logs, GCS data, unpacked packages) with it."""
        found = []
        for path in self.temp_dir.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_socket() and needle.encode() in path.read_bytes():
                    found.append(path)
        return found

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def pids(self) -> list[int]:
        """Every live process of this head: those naming its private temp dir (Linux /proc)."""
        marker = str(self.temp_dir).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
        return found

    def stop(self) -> None:
        """Kill the head's process group, then any stray process of this head, by pid."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=30)
            self._proc = None
        # Workers that left the process group would still name our temp dir.
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayHead:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
