"""Job commands on a Ray cluster: in-process by default, or submitted through the Ray Jobs API.

Every job command (``train``, ``colorize``, ``nightly``) gets three options from here:
``--address``, ``--wait/--no-wait`` and ``--forward-env``. With an ``http(s)://`` address (the
cluster's dashboard, usually port 8265), given as ``--address`` or in ``RAY_ADDRESS``, the
command is not run here: the same arguments become a Ray job running
``python -m jobs <command> <args>`` on the cluster, with this project as its working_dir. Any
other address (``ray://…``, ``HOST:6379``, ``auto``, ``local``) keeps the command in-process and
is what ``ray.init`` connects to.

A submitted job must never submit itself again, yet inside it ``RAY_ADDRESS`` is set (by Ray,
to the GCS address) and the user's may have been an http one. Two rules keep it in-process:
the job's runtime_env carries ``CHROMASCAN_SUBMISSION_ID`` (and a driver that any Ray job
submission started, e.g. ``ray job submit``, has Ray's job config variable), and only http(s)
addresses count as Jobs API addresses.

Secrets: nothing from this machine's environment reaches the cluster unless named with
``--forward-env``; the names (never the values) go into the job's metadata, and nothing here
prints a value. Clusters should get storage credentials from their nodes' identity instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

JOB_COMMANDS = ("train", "colorize", "nightly")

# Set in every submitted job's runtime_env: the entrypoint runs in-process and never resubmits.
IN_JOB_ENV = "CHROMASCAN_SUBMISSION_ID"
# Ray's job supervisor gives every job driver it starts this variable (ray job submit, KubeRay).
RAY_JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

# What the cluster runs: the package's own `python -m jobs`, found in the uploaded working_dir
# (or installed in the cluster image when there is no source tree to upload).
ENTRYPOINT = ("python", "-m", "jobs")

# Names that must come from the cluster, not from the submitting machine: Ray's own address and
# auth settings would point the job's driver at the wrong place or leak this machine's token.
RESERVED_ENV = frozenset(
    {
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "PATH",
        "PYTHONPATH",
        "HOME",
        IN_JOB_ENV,
    }
)

# The uploaded working_dir, in gitignore syntax (later lines win). Only the packages the job
# imports travel: every top-level entry is left out, then those are let back in, so a new
# folder of data, notebooks or CI files stays home by default. Paths in job arguments are read
# on the cluster, so data, models and outputs never need to travel; secrets must not.
WORKING_DIR_EXCLUDES = (
    "/[!.]*",  # every top-level entry ("/*" would also match "." and so the whole tree)
    "/.?*",
    "!/jobs",
    "!/jobs/**",
    "!/models",
    "!/models/**",
    "!/pipeline",
    "!/pipeline/**",
    "!/pyproject.toml",
    # Inside the packages too: caches, secrets, data and weights.
    "__pycache__",
    "*.pyc",
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    ".aws/",
    "*.safetensors",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.parquet",
    "*.jpg",
    "*.jpeg",
    "*.png",
    "*.tif",
    "*.tiff",
    "*.zip",
    "*.tar",
    "*.tar.gz",
)

CONNECT_TIMEOUT_S = 10.0  # a black-holed address would otherwise hang for minutes
STOP_TIMEOUT_S = 60.0  # Ray sends SIGTERM, then SIGKILL after its own grace period
AGENT_WAIT_S = 60.0  # a freshly started head answers before its job agent is up
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SUBMISSION_PREFIX = "chromascan"

EXIT_JOB_FAILED = 1  # the job failed without an exit code of its own, or was stopped
EXIT_DETACHED = 130  # Ctrl-C while following: the job keeps running


class ClusterError(typer.TyperException):
    """The cluster could not be reached, refused a request, or has no such job.

    A TyperException so that the CLI prints it as one line and exits with ``exit_code``.
    """

    exit_code = 1


# ----------------------------------------------------------------------------------------------
# Where a job command runs.


def inside_ray_job(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is the driver of a submitted Ray job (so already on the cluster)."""
    return bool(environ.get(IN_JOB_ENV) or environ.get(RAY_JOB_DRIVER_ENV))


def jobs_api_address(address: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The Jobs API URL to submit to, or None to run in this process.

    ``address`` (the ``--address`` option) wins over ``RAY_ADDRESS``; only http(s) URLs are Jobs
    API addresses. Inside a submitted job the answer is always None.
    """
    if inside_ray_job(environ):
        return None
    target = address if address is not None else environ.get("RAY_ADDRESS")
    if target and target.lower().startswith(("http://", "https://")):
        return target.rstrip("/")
    return None


@contextlib.contextmanager
def ray_address(address: str | None) -> Iterator[None]:
    """Hand a non-http ``--address`` to ``jobs.runtime.ensure_ray`` (which reads RAY_ADDRESS)."""
    if address is None:
        yield
        return
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous


# ----------------------------------------------------------------------------------------------
# What gets submitted.


@dataclass(frozen=True)
class Submission:
    """Everything sent to the Jobs API for one job command."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]

    @property
    def forwarded_env(self) -> list[str]:
        """The names (never the values) of the environment variables the job gets from here."""
        return sorted(k for k in self.runtime_env.get("env_vars", {}) if k != IN_JOB_ENV)


def project_root() -> Path | None:
    """This source tree's root, or None when chromascan runs from an installed package.

    Only a source tree is uploaded as the job's working_dir; an installed chromascan (e.g. in a
    scheduler's image) submits nothing but arguments, and the cluster image's chromascan runs.
    """
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return None
    return root if re.search(r'^name\s*=\s*"chromascan"', text, re.MULTILINE) else None


def new_submission_id(command: str, now: datetime | None = None) -> str:
    """A readable, unique id: chromascan-<command>-<UTC time>-<6 hex>."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{_SUBMISSION_PREFIX}-{command}-{stamp}-{secrets.token_hex(3)}"


def check_forward_env(names: Sequence[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """Validate ``--forward-env`` names; returns them sorted and without repeats."""
    chosen = sorted(set(names))
    for name in chosen:
        if not _ENV_NAME.match(name):
            raise typer.BadParameter(
                f"{name!r} is not an environment variable name", param_hint="'--forward-env'"
            )
        if name in RESERVED_ENV:
            raise typer.BadParameter(
                f"{name} cannot be forwarded: the cluster sets its own",
                param_hint="'--forward-env'",
            )
        if name not in environ:
            raise typer.BadParameter(
                f"{name} is not set in this environment", param_hint="'--forward-env'"
            )
    return chosen


def build_submission(
    command: str,
    args: Sequence[str],
    *,
    forward_env: Sequence[str] = (),
    environ: Mapping[str, str] = os.environ,
    working_dir: Path | None = None,
    version: str = "0+unknown",
    now: datetime | None = None,
) -> Submission:
    """The entrypoint, runtime_env and metadata for running ``command args`` on a cluster.

    Args:
        command: the job command (train, colorize, nightly).
        args: its arguments, as the user gave them, minus the submission options.
        forward_env: names of environment variables whose values the job should get.
        working_dir: the source tree to upload; None to rely on the cluster's installation.
    """
    names = check_forward_env(forward_env, environ)
    submission_id = new_submission_id(command, now)
    env_vars = {IN_JOB_ENV: submission_id, **{name: environ[name] for name in names}}
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    metadata = {
        "chromascan_command": command,
        "chromascan_version": version,
        "user": _user(),
    }
    if names:
        metadata["forwarded_env"] = ",".join(names)
    return Submission(
        submission_id=submission_id,
        entrypoint=shlex.join([*ENTRYPOINT, command, *args]),
        runtime_env=runtime_env,
        metadata=metadata,
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary uid in a container
        return "unknown"


# ----------------------------------------------------------------------------------------------
# The Jobs API client, with every failure turned into one line.


def _reason(err: BaseException) -> str:
    """The most specific cause of a connection failure, in a few words."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TimeoutError) or "timed out" in str(current).lower():
            return "no answer in time"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror.lower()
        stack.extend([current.__cause__, current.__context__, getattr(current, "reason", None)])
        stack.extend(a for a in getattr(current, "args", ()) if isinstance(a, BaseException))
    return type(err).__name__


def _auth_message(address: str, err: BaseException) -> str:
    if str(err).startswith("Authentication failed"):
        return (
            f"the Ray cluster at {address} refused this machine's Ray auth token "
            "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): it is not that cluster's"
        )
    return (
        f"the Ray cluster at {address} needs its auth token: set RAY_AUTH_MODE=token and "
        "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, a file holding it)"
    )


@contextlib.contextmanager
def cluster_errors(address: str, job: str | None = None) -> Iterator[None]:
    """Turn the Jobs API's exceptions into a one-line ClusterError."""
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        raise ClusterError(_auth_message(address, err)) from err
    except (requests.RequestException, aiohttp.ClientError, ConnectionError, TimeoutError) as err:
        raise ClusterError(
            f"lost the connection to the Ray cluster at {address} ({_reason(err)})"
        ) from err
    except RuntimeError as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if job is not None and "status code 404" in text:
            raise ClusterError(f"no job {job} on the Ray cluster at {address}") from err
        raise ClusterError(f"the Ray cluster at {address} refused the request: {text}") from err


def auth_headers(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The Ray auth header from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, when RAY_AUTH_MODE=token.

    Ray's own token loader caches the token for the life of the process; reading it per
    connection lets one process talk to clusters with different tokens. With neither variable
    set, Ray's loader still finds ~/.ray/auth_token.
    """
    if environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).expanduser().read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH: cannot read {path} ({err.strerror})") from err
    return {"Authorization": f"Bearer {token}"} if token else {}


@contextlib.contextmanager
def _without_ray_address_env() -> Iterator[None]:
    # JobSubmissionClient lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is
    # given; the --address the user typed must win.
    saved = {
        k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ
    }
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> Any:
    """A JobSubmissionClient for the dashboard at ``address``, or a one-line ClusterError."""
    import requests

    if not address.lower().startswith(("http://", "https://")):
        raise ClusterError(
            f"{address!r} is not a Ray dashboard address; give one like http://HEAD:8265"
        )
    # Reachability first, with a timeout: the client's own requests have none. The endpoint is
    # public even on clusters with token auth.
    try:
        requests.get(f"{address}/api/authentication_mode", timeout=timeout_s)
    except requests.RequestException as err:
        raise ClusterError(
            f"cannot reach a Ray dashboard at {address} ({_reason(err)}); is the cluster up and "
            "is that its dashboard port (8265 by default)?"
        ) from err
    from ray.job_submission import JobSubmissionClient

    not_ray = f"{address} answers, but it is not a Ray dashboard"
    try:
        with _without_ray_address_env(), cluster_errors(address):
            try:
                return JobSubmissionClient(address, headers=auth_headers())
            except (requests.exceptions.JSONDecodeError, KeyError) as err:  # /api/version
                raise ClusterError(not_ray) from err
    except ClusterError as err:
        if "Version check returned 404" in str(err):
            raise ClusterError(not_ray) from err
        raise


# ----------------------------------------------------------------------------------------------
# Outcomes and following a job.


def job_exit_code(details: Any) -> int:
    """The exit code a finished job stands for: its driver's, else 0 / 1 by its status."""
    status = str(getattr(details.status, "value", details.status))
    if status == "SUCCEEDED":
        return 0
    code = details.driver_exit_code
    if isinstance(code, int) and code > 0:
        return code
    if isinstance(code, int) and code < 0:  # killed by a signal: the shell's convention
        return 128 - code
    return EXIT_JOB_FAILED


def status_name(details: Any) -> str:
    return str(getattr(details.status, "value", details.status))


def describe_end(details: Any) -> str:
    """One line saying how a finished job ended: id, status, time taken, exit code or reason."""
    took = ""
    if details.start_time and details.end_time:
        took = f" after {(details.end_time - details.start_time) / 1000:.1f} s"
    code = details.driver_exit_code
    if code not in (None, 0):
        why = f" (exit code {code})"
    elif details.message and status_name(details) != "SUCCEEDED":
        # Ray's message can append the job's last logs; they were printed already.
        why = f": {details.message.splitlines()[0].split(', last available logs')[0]}"
    else:
        why = ""
    return f"{details.submission_id} {status_name(details)}{took}{why}"


def wait_until_done(client: Any, address: str, job: str, *, timeout_s: float) -> Any:
    """Poll until the job's status is terminal (or timeout_s passes); returns its details."""
    deadline = time.monotonic() + timeout_s
    while True:
        with cluster_errors(address, job):
            details = client.get_job_info(job)
        if details.status.is_terminal() or time.monotonic() >= deadline:
            return details
        time.sleep(0.5)


def follow(
    client: Any,
    address: str,
    job: str,
    *,
    write: Callable[[str], None],
    note: Callable[[str], None],
) -> int:
    """Print the job's logs as they come until it ends; return the exit code it stands for."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job):
            write(chunk)

    try:
        with _quiet_ray_client_logs(), cluster_errors(address, job):
            asyncio.run(tail())
        # The log stream closes when the driver exits; the status lands a moment later.
        details = wait_until_done(client, address, job, timeout_s=30.0)
    except KeyboardInterrupt:
        note(
            f"chromascan: stopped following job {job}; it keeps running "
            f"(chromascan jobs stop {job} --address {address})"
        )
        return EXIT_DETACHED
    if not details.status.is_terminal():
        note(f"chromascan: job {job} is still {status_name(details)} but its log stream ended")
        return EXIT_JOB_FAILED
    code = job_exit_code(details)
    note(("job: " if code == 0 else "chromascan: job ") + describe_end(details))
    return code


def write_stdout(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def note(line: str) -> None:
    typer.echo(line, err=True)


def submit_command(
    address: str,
    command: str,
    args: Sequence[str],
    *,
    wait: bool,
    forward_env: Sequence[str],
) -> int:
    """Submit ``command args`` to the cluster at ``address``; follow it unless ``wait`` is off."""
    from jobs.cli import package_version

    root = project_root()
    submission = build_submission(
        command, args, forward_env=forward_env, working_dir=root, version=package_version()
    )
    client = connect(address)
    if submission.forwarded_env:
        note(f"job: forwarding {', '.join(submission.forwarded_env)} (values not shown)")
    source = (
        f"uploading {root}" if root else "no source tree to upload; the cluster's chromascan runs"
    )
    note(f"job: submitting to {address} ({source})")
    _submit(client, address, submission)
    if not wait:
        typer.echo(submission.submission_id)
        note(
            f"job: submitted {submission.submission_id}; follow it with "
            f"chromascan jobs logs {submission.submission_id} --follow --address {address}"
        )
        return 0
    note(
        f"job: submitted {submission.submission_id}; following its logs "
        "(Ctrl-C stops following, not the job)"
    )
    return follow(client, address, submission.submission_id, write=write_stdout, note=note)


def _submit(client: Any, address: str, submission: Submission) -> None:
    """Send the job; wait out a head whose job agent is not up yet (a cluster just started)."""
    deadline = time.monotonic() + AGENT_WAIT_S
    waiting = False
    while True:
        try:
            with _quiet_ray_client_logs(), cluster_errors(address):
                client.submit_job(
                    entrypoint=submission.entrypoint,
                    submission_id=submission.submission_id,
                    runtime_env=submission.runtime_env,
                    metadata=submission.metadata,
                )
            return
        except ClusterError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            if not waiting:
                note(
                    f"job: the cluster's job agent is not up yet; retrying for {AGENT_WAIT_S:.0f} s"
                )
                waiting = True
            time.sleep(2.0)


@contextlib.contextmanager
def _quiet_ray_client_logs() -> Iterator[None]:
    # The SDK logs every package upload at INFO and warns once per default-excluded folder;
    # the CLI says itself what it uploads.
    import logging

    names = ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.working_dir",
             "ray._private.runtime_env.packaging", "ray.dashboard.modules.job.sdk")  # fmt: skip
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# ----------------------------------------------------------------------------------------------
# The options every job command gets, and the hook that makes a command submittable.


def _submission_options(
    submit_address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Ray cluster: http://HEAD:8265 (its dashboard) submits this command as a Ray "
            "job; ray://…, HOST:6379, auto or local run it here against that cluster. "
            "Default: RAY_ADDRESS, else a local Ray.",
            rich_help_panel="Cluster",
        ),
    ] = None,
    submit_wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="With an http address: follow the job's logs and exit with its outcome, or "
            "print its id and return at once.",
            rich_help_panel="Cluster",
        ),
    ] = True,
    submit_forward_env: Annotated[
        list[str] | None,
        typer.Option(
            "--forward-env",
            metavar="NAME",
            help="With an http address: give the job this environment variable's value from "
            "here (repeatable). chromascan never prints values, but Ray keeps them in the job's "
            "runtime_env and logs on the cluster; prefer the nodes' own identity.",
            rich_help_panel="Cluster",
        ),
    ] = None,
) -> None:
    """Template: typer builds these options once; they are grafted onto every job command."""


def _option_params() -> list[Any]:
    template = typer.Typer(add_completion=False)
    template.command()(_submission_options)
    return list(typer.main.get_command(template).params)


def _takes_value(param: Any) -> bool:
    return param.param_type_name == "option" and not param.is_flag and not param.count


def job_arguments(command: Any, argv: Sequence[str]) -> list[str]:
    """The command's own arguments from the full argv, minus the submission options.

    Options the command defines that take a value keep that value, even one that looks like a
    submission option; everything after ``--`` is kept as it is.
    """
    tokens = list(argv)
    start = next((i for i, token in enumerate(tokens) if not token.startswith("-")), len(tokens))
    rest = tokens[start + 1 :]
    ours: dict[str, bool] = {}
    theirs: set[str] = set()
    for param in command.params:
        if param.param_type_name != "option":
            continue
        names = [*param.opts, *param.secondary_opts]
        if param.name in _OPTION_NAMES:
            ours.update((name, _takes_value(param)) for name in names)
        elif _takes_value(param):
            theirs.update(names)
    kept: list[str] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        if token == "--":
            kept.extend(rest[i:])
            break
        name, has_value, _ = token.partition("=")
        if name in ours:
            i += 1 if has_value or not ours[name] else 2
            continue
        kept.append(token)
        if token in theirs and i + 1 < len(rest):
            kept.append(rest[i + 1])
            i += 1
        i += 1
    return kept


_OPTION_NAMES = ("submit_address", "submit_wait", "submit_forward_env")


def make_submittable(command: Any, argv: Sequence[str]) -> None:
    """Give one job command the submission options, and decide at call time where it runs."""
    options = _option_params()
    our_opts = {opt for param in options for opt in (*param.opts, *param.secondary_opts)}
    # A command that still defines its own --address (or --wait, --forward-env) gives it up to
    # the generic option; its parameter is then passed None, and ensure_ray reads the address
    # from RAY_ADDRESS.
    replaced = [p.name for p in command.params if our_opts & {*p.opts, *p.secondary_opts}]
    command.params = [p for p in command.params if p.name not in replaced] + options
    original = command.callback
    name = command.name

    def callback(**kwargs: Any) -> Any:
        address = kwargs.pop("submit_address")
        wait = kwargs.pop("submit_wait")
        forward_env = kwargs.pop("submit_forward_env") or []
        target = jobs_api_address(address)
        if target is not None:
            return submit_command(
                target, name, job_arguments(command, argv), wait=wait, forward_env=forward_env
            )
        if not wait or forward_env:
            flag = "'--no-wait'" if not wait else "'--forward-env'"
            raise typer.BadParameter(
                "only when submitting to a cluster (--address http://HEAD:8265 or RAY_ADDRESS)",
                param_hint=flag,
            )
        kwargs.update(dict.fromkeys(replaced))
        # Inside a submitted job Ray has set RAY_ADDRESS to the cluster; leave it alone.
        local_address = None if inside_ray_job() else address
        with ray_address(local_address):
            return original(**kwargs)

    command.callback = callback


def install_submission(group: Any, argv: Sequence[str]) -> None:
    """Make every job command of the CLI group submittable (the hook in jobs.cli.main)."""
    commands = getattr(group, "commands", {})
    for name in JOB_COMMANDS:
        if name in commands:
            make_submittable(commands[name], argv)
