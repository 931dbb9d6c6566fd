"""``chromascan jobs``: list, inspect, follow and stop jobs on a Ray cluster (Ray Jobs API).

Works for any submitted job on the cluster, whether ``chromascan … --address`` or
``ray job submit`` sent it. Exit codes: 0 done; 1 no such job, cluster unreachable or refusing;
``jobs logs --follow`` exits with the job's own outcome, like a submitting command does.
Nothing here prints a job's runtime_env values: forwarded variables are listed by name only.
"""

from __future__ import annotations

import json
import shlex
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from jobs.submit import (
    IN_JOB_ENV,
    STOP_TIMEOUT_S,
    ClusterError,
    cluster_errors,
    connect,
    describe_end,
    follow,
    note,
    status_name,
    wait_until_done,
    write_stdout,
)

jobs_app = typer.Typer(
    help="List, inspect, follow and stop chromascan jobs on a Ray cluster.",
    no_args_is_help=True,
)

Address = Annotated[
    str | None,
    typer.Option(
        "--address",
        envvar="RAY_ADDRESS",
        help="The cluster's dashboard, e.g. http://HEAD:8265.",
        show_envvar=True,
    ),
]
JobId = Annotated[str, typer.Argument(help="Submission id, e.g. chromascan-colorize-….")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _client(address: str | None) -> tuple[Any, str]:
    if not address:
        raise ClusterError(
            "no cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS to it"
        )
    address = address.rstrip("/")
    return connect(address), address


def _command_of(details: Any) -> str:
    """The chromascan command a job runs: from its metadata, else from its entrypoint."""
    metadata = details.metadata or {}
    if metadata.get("chromascan_command"):
        return str(metadata["chromascan_command"])
    try:
        words = shlex.split(details.entrypoint or "")
    except ValueError:
        words = []
    for i, word in enumerate(words[:-2]):
        if word == "-m" and words[i + 1] == "jobs":
            return words[i + 2]
    return "-"


def _forwarded(details: Any) -> list[str]:
    env_vars = (details.runtime_env or {}).get("env_vars") or {}
    return sorted(name for name in env_vars if name != IN_JOB_ENV)


def _utc(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(details: Any) -> str:
    if not details.start_time:
        return "-"
    end = details.end_time or time.time() * 1000
    return f"{(end - details.start_time) / 1000:.1f} s"


def _as_dict(details: Any) -> dict[str, Any]:
    """A job's public facts: never its runtime_env values, which may hold forwarded secrets."""
    metadata = details.metadata or {}
    return {
        "submission_id": details.submission_id,
        "job_id": details.job_id,
        "status": status_name(details),
        "message": details.message,
        "command": _command_of(details),
        "entrypoint": details.entrypoint,
        "user": metadata.get("user"),
        "chromascan_version": metadata.get("chromascan_version"),
        "forwarded_env": _forwarded(details),
        "working_dir": (details.runtime_env or {}).get("working_dir"),
        "start_time": _utc(details.start_time),
        "end_time": _utc(details.end_time),
        "driver_exit_code": details.driver_exit_code,
    }


@jobs_app.command("list")
def list_jobs(address: Address = None, as_json: AsJson = False) -> None:
    """Every submitted job on the cluster, oldest first."""
    client, address = _client(address)
    with cluster_errors(address):
        jobs = [job for job in client.list_jobs() if job.submission_id]
    jobs.sort(key=lambda job: (job.start_time or 0, job.submission_id))
    if as_json:
        typer.echo(json.dumps([_as_dict(job) for job in jobs], indent=2))
        return
    if not jobs:
        typer.echo(f"no jobs on {address}")
        return
    width = max(len("SUBMISSION ID"), *(len(job.submission_id) for job in jobs))
    typer.echo(
        f"{'SUBMISSION ID':<{width}}  {'STATUS':<9}  {'COMMAND':<9}  {'USER':<10}  "
        f"{'STARTED (UTC)':<20}  DURATION"
    )
    for job in jobs:
        user = (job.metadata or {}).get("user", "-")
        typer.echo(
            f"{job.submission_id:<{width}}  {status_name(job):<9}  {_command_of(job):<9}  "
            f"{user:<10}  {_utc(job.start_time):<20}  {_duration(job)}"
        )


@jobs_app.command("status")
def job_status(job: JobId, address: Address = None, as_json: AsJson = False) -> None:
    """One job's status, command, timing and exit code."""
    client, address = _client(address)
    with cluster_errors(address, job):
        details = client.get_job_info(job)
    facts = _as_dict(details)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    message = f" ({facts['message']})" if facts["message"] else ""
    typer.echo(f"job        {facts['submission_id']}")
    typer.echo(f"status     {facts['status']}{message}")
    typer.echo(f"command    {facts['command']}")
    typer.echo(f"entrypoint {facts['entrypoint']}")
    if facts["user"] or facts["chromascan_version"]:
        typer.echo(
            f"submitted  by {facts['user'] or '?'}, chromascan {facts['chromascan_version'] or '?'}"
        )
    typer.echo(f"started    {facts['start_time']}")
    typer.echo(f"ended      {facts['end_time']} ({_duration(details)})")
    if facts["driver_exit_code"] is not None:
        typer.echo(f"exit code  {facts['driver_exit_code']}")
    if facts["forwarded_env"]:
        typer.echo(f"forwarded  {', '.join(facts['forwarded_env'])} (values not shown)")


@jobs_app.command("logs")
def job_logs(
    job: JobId,
    address: Address = None,
    follow_logs: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Keep printing until the job ends; exit with its outcome."
        ),
    ] = False,
) -> None:
    """A job's output (its driver's stdout and stderr)."""
    client, address = _client(address)
    if follow_logs:
        raise typer.Exit(follow(client, address, job, write=write_stdout, note=note))
    with cluster_errors(address, job):
        write_stdout(client.get_job_logs(job))


@jobs_app.command("stop")
def stop_job(
    job: JobId,
    address: Address = None,
    wait: Annotated[
        bool, typer.Option(help=f"Wait (up to {STOP_TIMEOUT_S:.0f} s) until the job has ended.")
    ] = True,
) -> None:
    """Stop a job (SIGTERM to its driver, then SIGKILL); stopping an ended job does nothing."""
    client, address = _client(address)
    with cluster_errors(address, job):
        stopping = client.stop_job(job)
    if not stopping:
        details = wait_until_done(client, address, job, timeout_s=0)
        typer.echo(f"job {job} had already ended: {status_name(details)}")
        return
    if not wait:
        typer.echo(f"job {job}: stop requested")
        return
    details = wait_until_done(client, address, job, timeout_s=STOP_TIMEOUT_S)
    if not details.status.is_terminal():
        raise ClusterError(
            f"job {job} is still {status_name(details)} "
            f"{STOP_TIMEOUT_S:.0f} s after the stop request"
        )
    typer.echo(f"job {describe_end(details)}")
