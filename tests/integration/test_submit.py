"""Job commands submitted to a real Ray cluster through the Jobs API, and `chromascan jobs`.

The cluster is a real local Ray head with its dashboard (tests/integration/ray_head.py), with
token auth on, as Ray 2.60 clusters have by default. The CLI runs as a user runs it: a
`python -m jobs` subprocess whose environment holds the cluster's token and nothing of the test
process's Ray or AWS settings. Tests before the cluster fixture need no cluster at all.
"""

from __future__ import annotations

import http.server
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from PIL import Image

from jobs.cli import main
from jobs.submit import (
    IN_JOB_ENV,
    WORKING_DIR_EXCLUDES,
    build_submission,
    job_arguments,
    jobs_api_address,
    project_root,
)
from models.config import GeneratorConfig
from models.networks import UNetGenerator, init_weights
from pipeline.model_store import save_model
from tests.integration.ray_head import LocalRayHead
from tests.integration.s3server import free_ports

# Ray's SDK opens its log websocket with ssl=None, which aiohttp deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
SUBMISSION_ID = re.compile(r"^chromascan-(colorize|train|nightly)-\d{8}T\d{6}Z-[0-9a-f]{6}$")
# A value no command prints by itself: any sighting of it is a leak.
PLANTED = "planted-secret-" + "5c7e1d" * 4


# ----------------------------------------------------------------------------------------------
# Inputs: a tiny model and a few small scans.


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    generator = UNetGenerator(GeneratorConfig(width=8, depth=5, image_size=32))
    init_weights(generator)
    folder = tmp_path_factory.mktemp("model")
    save_model(generator, str(folder), name="submit-test")
    return folder


def _write_scans(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    ramp = np.linspace(0, 255, 48, dtype=np.float64)
    for index in range(count):
        pixels = (np.add.outer(ramp[:40], ramp) / 2 + index * 7) % 256
        name = f"scan{index:03d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(folder / name)
        names.append(name)
    return names


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    folder = tmp_path_factory.mktemp("scans")
    return folder, _write_scans(folder, 4)


# ----------------------------------------------------------------------------------------------
# Without a cluster: where a command runs, what a submission holds, and one-line errors.


def test_only_http_addresses_submit_and_never_from_inside_a_job() -> None:
    assert jobs_api_address("http://head:8265/") == "http://head:8265"
    assert jobs_api_address("HTTPS://head:8265") == "HTTPS://head:8265"
    for local in ("ray://head:10001", "head:6379", "auto", "local"):
        assert jobs_api_address(local, {}) is None
    # --address beats RAY_ADDRESS, both ways.
    assert jobs_api_address(None, {"RAY_ADDRESS": "http://a:8265"}) == "http://a:8265"
    assert jobs_api_address("head:6379", {"RAY_ADDRESS": "http://a:8265"}) is None
    # Inside a submitted job nothing resubmits, whatever the addresses say.
    inside = {IN_JOB_ENV: "chromascan-colorize-x", "RAY_ADDRESS": "http://a:8265"}
    assert jobs_api_address("http://a:8265", inside) is None
    # Nor inside a driver that `ray job submit` started (Ray's job config is in its environment).
    ray_driver = {"RAY_JOB_CONFIG_JSON_ENV_VAR": "{}", "RAY_ADDRESS": "http://a:8265"}
    assert jobs_api_address("http://a:8265", ray_driver) is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["colorize", "a", "b", "-m", "m", "--address", "http://h:8265"], ["a", "b", "-m", "m"]),
        (["colorize", "--address=http://h:8265", "a", "--no-wait", "b"], ["a", "b"]),
        (["colorize", "a", "b", "--forward-env", "X", "--forward-env=Y", "--wait"], ["a", "b"]),
        # An option's value that looks like a submission option stays the option's value.
        (["colorize", "a", "b", "--model", "--no-wait"], ["a", "b", "--model", "--no-wait"]),
        (["colorize", "a", "--", "--address"], ["a", "--", "--address"]),
    ],
)
def test_job_arguments_drop_only_the_submission_options(
    argv: list[str], expected: list[str]
) -> None:
    import typer

    from jobs.cli import app
    from jobs.submit import install_submission

    group = typer.main.get_command(app)
    install_submission(group, argv)
    assert job_arguments(group.commands["colorize"], argv) == expected


def test_submission_holds_the_command_and_no_environment_values() -> None:
    environ = {"AWS_SECRET_ACCESS_KEY": PLANTED, "AWS_ACCESS_KEY_ID": "AKIA-test", "HOME": "/x"}
    root = project_root()
    assert root == ROOT  # a source checkout: it is uploaded
    submission = build_submission(
        "colorize",
        ["s3://a/scans", "s3://a/out", "--model", "s3://a/m v1"],
        environ=environ,
        working_dir=root,
        version="9.9.9",
    )
    assert SUBMISSION_ID.match(submission.submission_id)
    assert submission.entrypoint == (
        "python -m jobs colorize s3://a/scans s3://a/out --model 's3://a/m v1'"
    )
    assert submission.runtime_env == {
        "env_vars": {IN_JOB_ENV: submission.submission_id},
        "working_dir": str(ROOT),
        "excludes": list(WORKING_DIR_EXCLUDES),
    }
    assert submission.metadata["chromascan_command"] == "colorize"
    assert submission.metadata["chromascan_version"] == "9.9.9"
    assert submission.metadata["user"]
    assert PLANTED not in json.dumps(submission.__dict__)

    forwarding = build_submission(
        "train",
        ["photos", "--output", "out"],
        environ=environ,
        forward_env=["AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"],
    )
    assert forwarding.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == PLANTED
    assert "working_dir" not in forwarding.runtime_env
    assert forwarding.forwarded_env == ["AWS_SECRET_ACCESS_KEY"]
    assert forwarding.metadata["forwarded_env"] == "AWS_SECRET_ACCESS_KEY"  # the name only
    assert PLANTED not in json.dumps(forwarding.metadata)


def test_working_dir_package_holds_the_code_and_nothing_else(tmp_path: Path) -> None:
    """Ray's own packager, with the excludes a submission sends: what the cluster receives."""
    from ray._private.runtime_env.packaging import create_package

    # A copy of the checkout (big folders aside), plus what a careless checkout might hold.
    tree = tmp_path / "checkout"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info"))
    planted = [
        ".env",
        "jobs/.env.production",
        "pipeline/.aws/credentials",
        ".venv/bin/python",
        ".git/config",
        "jobs/model.safetensors",
        "scans/a.tif",
        "out/part-0.parquet",
        "chromascan-demo/model/model.json",
        "jobs/__pycache__/x.cpython-311.pyc",
        "models/key.pem",
        "notebooks/try.py",
    ]
    for name in planted:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(PLANTED)
    package = tmp_path / "package.zip"
    excludes = [".git", ".venv", "venv", "__pycache__", *WORKING_DIR_EXCLUDES]  # Ray's + ours
    create_package(str(tree), package, include_gitignore=True, excludes=excludes)
    with zipfile.ZipFile(package) as archive:
        names = [n for n in archive.namelist() if not n.endswith("/")]
        assert not [n for n in names if PLANTED.encode() in archive.read(n)]
    assert {
        "jobs/__main__.py",
        "jobs/cli.py",
        "jobs/submit.py",
        "pipeline/colorize.py",
        "models/networks.py",
        "pyproject.toml",
    } <= set(names)
    top = {name.split("/")[0] for name in names}
    assert top == {"jobs", "pipeline", "models", "pyproject.toml"}  # tests, infra, .ci stay home
    assert package.stat().st_size < 1024 * 1024  # kilobytes: no venv, tests or data


def _closed_port() -> int:
    return free_ports(1)[0]  # bound and released: nothing listens there


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--no-wait"], 2, "Invalid value for '--no-wait': only when submitting to a cluster"),
        (["--forward-env", "AWS_SECRET_ACCESS_KEY"], 2, "Invalid value for '--forward-env'"),
        (
            ["--address", "http://127.0.0.1:{port}"],
            1,
            "chromascan: cannot reach a Ray dashboard at http://127.0.0.1:{port} "
            "(connection refused)",
        ),
        (
            ["--address", "http://127.0.0.1:{port}", "--forward-env", "CHROMASCAN_UNSET_VAR"],
            2,
            "Invalid value for '--forward-env': "
            "CHROMASCAN_UNSET_VAR is not set in this environment",
        ),
        (
            ["--address", "http://127.0.0.1:{port}", "--forward-env", "RAY_AUTH_TOKEN"],
            2,
            "RAY_AUTH_TOKEN cannot be forwarded",
        ),
    ],
)
def test_submission_errors_are_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    extra: list[str],
    code: int,
    message: str,
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("CHROMASCAN_UNSET_VAR", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", PLANTED)
    port = _closed_port()
    argv = ["colorize", str(tmp_path), str(tmp_path / "out"), "-m", str(tmp_path)]
    assert main([*argv, *(e.format(port=port) for e in extra)]) == code
    captured = capsys.readouterr()
    assert message.format(port=port) in captured.err
    assert captured.err.count("\n") == 1
    assert PLANTED not in captured.err + captured.out


@pytest.fixture(params=[404, 200])
def not_ray(request: pytest.FixtureRequest) -> Iterator[str]:
    """An HTTP server that is not a Ray dashboard: 404 to everything, or 200 and a web page."""
    status = request.param

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if status == 404:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>a web page</html>")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_jobs_commands_need_a_dashboard_address(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, not_ray: str
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    cases = [
        (
            ["jobs", "list"],
            "chromascan: no cluster given: pass --address http://HEAD:8265 or "
            "set RAY_ADDRESS to it",
        ),
        (
            ["jobs", "status", "x", "--address", "ray://head:10001"],
            "chromascan: 'ray://head:10001' is not a Ray dashboard address; give one like "
            "http://HEAD:8265",
        ),
        (
            ["jobs", "logs", "x", "--address", not_ray],
            f"chromascan: {not_ray} answers, but it is not a Ray dashboard",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        assert capsys.readouterr().err == message + "\n"


def test_non_http_address_runs_in_process_with_ray_address(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import jobs.colorize

    seen: dict[str, Any] = {}

    def fake_execute(*, allow_failures: bool, **settings: Any) -> None:
        import os

        seen.update(settings=settings, env=os.environ.get("RAY_ADDRESS"))

    monkeypatch.setattr(jobs.colorize, "_execute", fake_execute)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    argv = ["colorize", "s3://a/scans", str(tmp_path), "-m", "s3://a/m", "--address", "local"]
    assert main(argv) == 0
    assert seen["env"] == "local"  # what ensure_ray reads while the command runs
    assert seen["settings"]["src"] == "s3://a/scans"
    import os

    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"  # restored afterwards


@pytest.mark.parametrize("command", ["colorize", "train", "nightly"])
def test_every_job_command_documents_the_cluster_options(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--address", "--no-wait", "--forward-env"):
        assert option in out, (command, option)


# ----------------------------------------------------------------------------------------------
# With a real cluster.


@pytest.fixture(scope="module")
def ray_head() -> Iterator[LocalRayHead]:
    with LocalRayHead(num_cpus=4) as head:
        yield head


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


class Chromascan:
    """`chromascan ARGV` in this process, with the environment of a user of `head`.

    In-process calls spare an interpreter start each; the one that matters most (a user's
    submission) and the auth failures still run as subprocesses below.
    """

    def __init__(
        self,
        head: LocalRayHead,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        self.head, self.capsys = head, capsys
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", IN_JOB_ENV):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    def __call__(self, *argv: str, address: bool = True) -> Result:
        self.capsys.readouterr()
        extra = ["--address", self.head.dashboard_url] if address else []
        code = main([*argv, *extra])
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)


@pytest.fixture
def chromascan(
    ray_head: LocalRayHead, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Chromascan:
    return Chromascan(ray_head, capsys, monkeypatch)


def _subprocess(
    head: LocalRayHead, *argv: str, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """`chromascan ARGV` as a user runs it: its own process, outside the source tree."""
    return subprocess.run(
        [sys.executable, "-m", "jobs", *argv],
        env=env or head.client_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=Path(head.temp_dir),
    )


def _api(head: LocalRayHead, path: str) -> Any:
    """The Jobs API's own answer (raw JSON), as the dashboard or `ray job` see it."""
    request = urllib.request.Request(
        f"{head.dashboard_url}{path}", headers={"Authorization": f"Bearer {head.token}"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        return json.loads(response.read())


def _submitted_id(stderr: str) -> str:
    match = re.search(r"job: submitted (\S+?);", stderr)
    assert match, stderr
    return match.group(1)


def _wait_for_status(head: LocalRayHead, job: str, wanted: set[str], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        info = _api(head, f"/api/jobs/{job}")
        if info["status"] in wanted or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def test_colorize_job_runs_on_the_cluster_and_jobs_commands_report_it(
    ray_head: LocalRayHead,
    chromascan: Chromascan,
    scans: tuple[Path, list[str]],
    model_dir: Path,
    tmp_path: Path,
) -> None:
    src, names = scans
    dst = tmp_path / "coloured"
    # Credentials in the submitting environment must stay there.
    env = ray_head.client_env(AWS_SECRET_ACCESS_KEY=PLANTED, AWS_ACCESS_KEY_ID="AKIA" + PLANTED)
    submitted = _subprocess(
        ray_head,
        "colorize",
        str(src),
        str(dst),
        "--model",
        str(model_dir),
        "--address",
        ray_head.dashboard_url,
        env=env,
    )
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = _submitted_id(submitted.stderr)
    assert SUBMISSION_ID.match(job)
    assert f"{len(names)} ok, 0 failed" in submitted.stdout  # the job's output, followed live
    assert submitted.stderr.splitlines()[-1].startswith(f"job: {job} SUCCEEDED after")

    # Outputs and manifest where colorize puts them, written by the job on the cluster.
    assert sorted(p.name for p in (dst / "images").iterdir()) == sorted(names)
    manifest = pq.read_table(dst / "manifest").to_pandas()
    assert sorted(manifest["status"]) == ["ok"] * len(names)
    (summary_file,) = (dst / "runs").glob("*.json")
    assert manifest["run_id"].iloc[0] == summary_file.stem

    # What the cluster holds about the job: command, user, version; the marker; no secrets.
    info = _api(ray_head, f"/api/jobs/{job}")
    assert info["status"] == "SUCCEEDED"
    assert info["entrypoint"] == (
        f"python -m jobs colorize {src} {dst} --model {model_dir}"
    )  # the same arguments, minus --address
    assert info["metadata"]["chromascan_command"] == "colorize"
    assert info["metadata"]["chromascan_version"]
    assert info["metadata"]["user"]
    assert info["runtime_env"]["env_vars"] == {IN_JOB_ENV: job}
    assert info["runtime_env"]["working_dir"].startswith("gcs://")  # the project, uploaded

    status = chromascan("jobs", "status", job)
    assert status.code == 0, status.err
    assert status.out.startswith(f"job        {job}\nstatus     SUCCEEDED")
    assert "command    colorize\n" in status.out
    assert "exit code  0\n" in status.out
    as_json = json.loads(chromascan("jobs", "status", job, "--json").out)
    assert (as_json["status"], as_json["command"], as_json["forwarded_env"]) == (
        "SUCCEEDED",
        "colorize",
        [],
    )
    logs = chromascan("jobs", "logs", job)
    assert logs.code == 0
    assert f"{len(names)} ok, 0 failed" in logs.out
    listed = chromascan("jobs", "list")
    assert listed.code == 0, listed.err
    (row,) = [line for line in listed.out.splitlines() if line.startswith(job)]
    assert row.split()[1:3] == ["SUCCEEDED", "colorize"]

    # The planted credentials: not in any output, not in anything the cluster stored or logged.
    everything = "".join(
        [
            submitted.stdout,
            submitted.stderr,
            status.out,
            status.err,
            logs.out,
            listed.out,
            json.dumps(info),
            json.dumps(_api(ray_head, "/api/jobs/")),
            _api(ray_head, f"/api/jobs/{job}/logs")["logs"],
        ]
    )
    assert PLANTED not in everything
    assert ray_head.token not in everything
    assert ray_head.files_containing(PLANTED) == []  # nor anywhere on the cluster's disk


def test_the_job_outcome_is_the_exit_code_with_no_wait_and_follow(
    ray_head: LocalRayHead,
    chromascan: Chromascan,
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = tmp_path / "with-a-bad-scan"
    names = _write_scans(src, 2)
    (src / "broken.jpg").write_bytes(b"not a jpeg at all")
    monkeypatch.setenv("RAY_ADDRESS", ray_head.dashboard_url)  # the address from the environment
    submitted = chromascan(
        "colorize",
        str(src),
        str(tmp_path / "out"),
        "-m",
        str(model_dir),
        "--no-wait",
        address=False,
    )
    assert submitted.code == 0, submitted.err
    job = submitted.out.strip()  # --no-wait prints the id alone on stdout
    assert SUBMISSION_ID.match(job)
    assert f"chromascan jobs logs {job} --follow" in submitted.err

    followed = chromascan("jobs", "logs", job, "--follow")
    # colorize exits 3 when some scans failed; so does following its job.
    assert followed.code == 3, followed.err
    assert f"{len(names)} ok, 1 failed" in followed.out
    last = followed.err.splitlines()[-1]
    assert re.fullmatch(rf"chromascan: job {job} FAILED after [\d.]+ s \(exit code 3\)", last)
    info = _api(ray_head, f"/api/jobs/{job}")
    assert (info["status"], info["driver_exit_code"]) == ("FAILED", 3)


def test_jobs_stop_stops_a_long_job(
    ray_head: LocalRayHead, chromascan: Chromascan, model_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "many"
    _write_scans(src, 150)
    dst = tmp_path / "out"
    submitted = chromascan(
        "colorize", str(src), str(dst), "-m", str(model_dir), "--batch-size", "1", "--no-wait"
    )
    assert submitted.code == 0, submitted.err
    job = submitted.out.strip()
    running = _wait_for_status(ray_head, job, {"RUNNING", "SUCCEEDED", "FAILED"})
    assert running["status"] == "RUNNING"

    stopped = chromascan("jobs", "stop", job)
    assert stopped.code == 0, stopped.err
    assert re.fullmatch(rf"job {job} STOPPED after [\d.]+ s: .+\n", stopped.out), stopped.out
    assert _api(ray_head, f"/api/jobs/{job}")["status"] == "STOPPED"
    assert not list((dst / "runs").glob("*.json"))  # it never got to the end

    again = chromascan("jobs", "stop", job)
    assert (again.code, again.out) == (0, f"job {job} had already ended: STOPPED\n")
    followed = chromascan("jobs", "logs", job, "-f")
    assert followed.code == 1
    assert followed.err.splitlines()[-1].startswith(f"chromascan: job {job} STOPPED after")


def test_jobs_errors_with_a_cluster_are_one_line(
    ray_head: LocalRayHead, chromascan: Chromascan
) -> None:
    address = ray_head.dashboard_url
    unknown = chromascan("jobs", "status", "chromascan-nope")
    assert (unknown.code, unknown.err) == (
        1,
        f"chromascan: no job chromascan-nope on the Ray cluster at {address}\n",
    )
    # Auth failures in their own processes: Ray caches its auth mode per process.
    no_token = _subprocess(
        ray_head,
        "jobs",
        "list",
        "--address",
        address,
        env={**ray_head.client_env(), "RAY_AUTH_MODE": "disabled"},
    )
    assert no_token.returncode == 1
    assert no_token.stderr == (
        f"chromascan: the Ray cluster at {address} needs its auth token: set RAY_AUTH_MODE=token "
        "and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, a file holding it)\n"
    )
    wrong = _subprocess(
        ray_head,
        "jobs",
        "list",
        "--address",
        address,
        env=ray_head.client_env(RAY_AUTH_TOKEN=PLANTED),
    )
    assert wrong.returncode == 1
    assert wrong.stderr.startswith(f"chromascan: the Ray cluster at {address} refused this")
    assert wrong.stderr.count("\n") == 1
    assert PLANTED not in wrong.stderr + wrong.stdout


def _readme_ray_job_submit() -> list[str]:
    """The `ray job submit` one-liner that infra/README.md documents."""
    text = (ROOT / "infra" / "README.md").read_text()
    (line,) = [line for line in text.splitlines() if line.startswith("ray job submit ")]
    return shlex.split(line)


def test_ray_job_submit_runs_the_same_entrypoint(
    ray_head: LocalRayHead,
    chromascan: Chromascan,
    scans: tuple[Path, list[str]],
    model_dir: Path,
    tmp_path: Path,
) -> None:
    src, names = scans
    dst = tmp_path / "by-ray-cli"
    placeholders = {
        "http://HEAD:8265": ray_head.dashboard_url,
        "SRC": str(src),
        "DST": str(dst),
        "MODEL": str(model_dir),
    }
    argv = [placeholders.get(word, word) for word in _readme_ray_job_submit()]
    assert argv[argv.index("--") + 1 :][:4] == ["python", "-m", "jobs", "colorize"]
    ray = str(Path(sys.executable).parent / "ray")
    result = subprocess.run(
        [ray, *argv[1:]],
        env=ray_head.client_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(names)} ok, 0 failed" in result.stdout + result.stderr
    assert sorted(p.name for p in (dst / "images").iterdir()) == sorted(names)
    # Ray named it; `chromascan jobs` reports it like its own.
    listed = chromascan("jobs", "list")
    assert any(
        line.startswith("raysubmit_") and "SUCCEEDED  colorize" in line
        for line in listed.out.splitlines()
    ), listed.out


def test_forward_env_gives_the_job_credentials_and_prints_no_value(
    ray_head: LocalRayHead,
    chromascan: Chromascan,
    scans: tuple[Path, list[str]],
    model_dir: Path,
    s3_server: Any,
    s3_bucket: str,
    s3_env: dict[str, str],
) -> None:
    src, names = scans
    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    fs.put(str(src) + "/", f"{s3_bucket}/scans/", recursive=True)
    fs.put(str(model_dir) + "/", f"{s3_bucket}/model/", recursive=True)
    secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    forwarded = sorted(s3_server.env())
    # The head has no AWS settings (ray_head.py drops them): only forwarding can work.
    submitted = chromascan(
        "colorize",
        f"s3://{s3_bucket}/scans",
        f"s3://{s3_bucket}/out",
        "--model",
        f"s3://{s3_bucket}/model",
        *(arg for name in forwarded for arg in ("--forward-env", name)),
    )
    assert submitted.code == 0, submitted.err[-3000:]
    job = _submitted_id(submitted.err)
    assert f"job: forwarding {', '.join(forwarded)} (values not shown)" in submitted.err
    assert f"{len(names)} ok, 0 failed" in submitted.out
    assert len(fs.ls(f"{s3_bucket}/out/images")) == len(names)

    status = chromascan("jobs", "status", job)
    assert f"forwarded  {', '.join(forwarded)} (values not shown)" in status.out
    as_json = chromascan("jobs", "status", job, "--json")
    assert json.loads(as_json.out)["forwarded_env"] == forwarded
    listed = chromascan("jobs", "list", "--json")
    info = _api(ray_head, f"/api/jobs/{job}")
    assert info["metadata"]["forwarded_env"] == ",".join(forwarded)  # names only
    printed = "".join(r.out + r.err for r in (submitted, status, as_json, listed))
    logs = _api(ray_head, f"/api/jobs/{job}/logs")["logs"]
    for place in (printed, logs, json.dumps(info["metadata"]), info["entrypoint"]):
        assert secret not in place
    # Where the values do live, as documented: the job's runtime_env on the cluster (and Ray's
    # runtime-env agent log on the head, which records runtime_envs in full).
    assert info["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == secret


def test_train_and_nightly_are_submitted_the_same_way(
    ray_head: LocalRayHead, chromascan: Chromascan, model_dir: Path, tmp_path: Path
) -> None:
    runs = {
        "train": ["train", str(tmp_path / "photos"), "--output", str(tmp_path / "run"),
                  "--epochs", "1"],
        "nightly": ["nightly", str(tmp_path / "scans"), str(tmp_path / "out"), "-m",
                    str(model_dir), "--any-model"],
    }  # fmt: skip
    for command, argv in runs.items():
        submitted = chromascan(*argv, "--no-wait")
        assert submitted.code == 0, submitted.err
        job = submitted.out.strip()
        assert job.startswith(f"chromascan-{command}-")
        info = _api(ray_head, f"/api/jobs/{job}")
        assert info["entrypoint"] == shlex.join(["python", "-m", "jobs", *argv])
        assert info["metadata"]["chromascan_command"] == command
        stopped = chromascan("jobs", "stop", job)  # nothing to train on: no need to wait
        assert stopped.code == 0, stopped.err
