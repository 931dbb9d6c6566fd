"""Scans that kill their worker: counted, retried once in isolation, then a failed row.

A codec that segfaults on a hostile file, or a scan that makes the kernel's OOM killer end the
worker, is not an exception anything can catch: the process is gone. Ray retries the task
(Ray Data's tasks and actor tasks retry without limit), so the same scan would kill a worker
again and again and the run would never end. Here:

1. Before a per-scan stage works on its rows, it tells the run's ``AttemptLedger`` actor
   (on the driver's node) which scans it starts; the ledger answers how many times each was
   started before. When the batch finishes, the ledger forgets them, so it only ever holds
   the scans in flight (and those that killed a worker): nothing accumulates with the run.
2. A first attempt runs in the worker as usual, at no extra cost.
3. A scan started before whose worker never reported back is run again in a child process
   of its own (``run_isolated``): if that child dies too, the scan becomes a failed row with
   error type ``WorkerCrashed`` naming how it died, and its neighbours in the batch are
   coloured as usual.
4. Past ``max_attempts`` starts the scan is not touched again: a failed row at once.

The ledger is best effort by design: if it cannot be reached, stages run as if every attempt
were the first (what Ray does without it), and say so in the worker's log.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

WORKER_CRASHED = "WorkerCrashed"
# Starts of one scan in one stage before it is given up without another try: the first, in
# the worker; the second, isolated in a child process; a third start means even the isolated
# try took its worker down (a node's memory, not the process's), so the scan is failed.
DEFAULT_MAX_ATTEMPTS = 2
_LEDGER_TIMEOUT_S = 60.0


class AttemptLedger:
    """Starts per scan key for the scans in flight; one per run, tiny and on the driver's node."""

    def __init__(self) -> None:
        self.starts: dict[str, int] = {}

    def begin(self, keys: Sequence[str]) -> list[int]:
        """Count a start of each key; returns how many starts each has had, this one included."""
        counts = []
        for key in keys:
            self.starts[key] = self.starts.get(key, 0) + 1
            counts.append(self.starts[key])
        return counts

    def end(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.starts.pop(key, None)

    def in_flight(self) -> int:
        return len(self.starts)


def start_attempt_ledger() -> Any:
    """The run's ledger actor, pinned to the driver's node so that it shares the driver's fate."""
    on_driver_node = NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=False
    )
    return (
        ray.remote(AttemptLedger)
        .options(num_cpus=0, max_restarts=0, scheduling_strategy=on_driver_node)
        .remote()
    )


def begin(ledger: Any, keys: list[str]) -> list[int]:
    """Starts of each key so far (1: first), or all 1 when there is no reachable ledger."""
    if ledger is None or not keys:
        return [1] * len(keys)
    try:
        return list(ray.get(ledger.begin.remote(keys), timeout=_LEDGER_TIMEOUT_S))
    except Exception as err:  # a lost ledger must not cost the scans: run them as Ray would
        logger.warning("attempt ledger unreachable (%s); treating as first attempts", err)
        return [1] * len(keys)


def end(ledger: Any, keys: list[str]) -> None:
    if ledger is None or not keys:
        return
    try:
        ledger.end.remote(keys)  # no wait: a lost message only keeps a key for the run's life
    except Exception as err:
        logger.warning("attempt ledger unreachable (%s)", err)


def death_description(exitcode: int | None) -> str:
    """'killed by SIGSEGV' / 'exited with status 1' for a child's exit code."""
    if exitcode is None:
        return "vanished"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def _child(connection: Any) -> None:
    """Run jobs sent by the parent until told to stop; each answer goes back on the pipe."""
    while True:
        job = connection.recv()
        if job is None:
            return
        function, args = job
        try:
            connection.send(("ok", function(*args)))
        except BaseException as err:  # the parent decides; a crash is what this is here for
            connection.send(("raised", err))


def run_isolated(
    jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
    on_death: Callable[[int, str], Any],
) -> list[Any]:
    """Run each ``function(*args)`` in a child process; a child that dies is replaced.

    Returns each job's result, or ``on_death(index, how)`` for a job whose child died. An
    exception a job raises is raised here, as it would have been in the worker.
    """
    # Spawn, not fork: the worker holds threads (Ray's, torch's) that a forked child would
    # inherit mid-lock.
    context = multiprocessing.get_context("spawn")
    results: list[Any] = []
    child = connection = None
    try:
        for index, (function, args) in enumerate(jobs):
            if child is None:
                connection, child_end = context.Pipe()
                child = context.Process(target=_child, args=(child_end,), daemon=True)
                child.start()
                child_end.close()
            try:
                connection.send((function, args))
                kind, value = connection.recv()
            except (EOFError, OSError):
                child.join(timeout=30)
                how = death_description(child.exitcode)
                logger.warning("isolated attempt %d of %d: the child %s", index, len(jobs), how)
                results.append(on_death(index, how))
                child = connection = None
                continue
            if kind == "raised":
                raise value
            results.append(value)
    finally:
        if child is not None and connection is not None:
            try:
                connection.send(None)
                child.join(timeout=10)
            except (OSError, EOFError):
                pass
            if child.is_alive():
                child.kill()
    return results


# --- fault injection for tests --------------------------------------------------------------

_CRASH_ENV = "CHROMASCAN_TEST_CRASH_SHA256"


def crash_if_asked(source_sha256: str) -> None:
    """Kill this process as a codec segfault or the OOM killer would, for listed scans.

    Tests only: ``CHROMASCAN_TEST_CRASH_SHA256`` (a comma list of sha256 hex digests) is set
    in the test cluster's environment; a real deployment never sets it and pays one dict
    lookup per scan.
    """
    wanted = os.environ.get(_CRASH_ENV)
    if wanted and source_sha256 in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
