"""Memory flatness: driver and worker peak memory of a colorize run of N vs 10×N scans.

Each run gets its own process and its own local Ray cluster, so neither the driver's peak
nor a reused worker's carries over from the previous run. Worker
peaks are the kernel's high-water marks (VmHWM) of the raylet's child processes, read every
half second: a peak between two reads is still counted, because VmHWM never falls.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

_POLL_S = 0.5


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident memory (Linux VmHWM) in MiB; None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) from /proc (no psutil: it is not a dependency)."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
        table[int(entry)] = (ppid, cmdline)
    return table


def raylet_worker_pids() -> list[int]:
    """Pids of this node's Ray workers: the descendants of our raylet (found by its socket).

    Other Ray clusters on the same machine have other raylets, so their workers are not ours.
    """
    import ray

    sockets = {node["RayletSocketName"] for node in ray.nodes() if node.get("Alive")}
    table = _processes()
    frontier = [
        pid
        for pid, (_, cmdline) in table.items()
        if "raylet" in cmdline and any(socket in cmdline for socket in sockets)
    ]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    while frontier:
        pid = frontier.pop()
        for child in children.get(pid, []):
            found.append(child)
            frontier.append(child)
    return found


class WorkerPeaks:
    """Polls the workers' VmHWM in a thread; keeps each worker's highest value."""

    def __init__(self) -> None:
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(_POLL_S)

    def poll(self) -> None:
        for pid in raylet_worker_pids():
            peak = peak_rss_mib(pid)
            if peak is not None:
                self.peaks[pid] = max(peak, self.peaks.get(pid, 0.0))

    def __enter__(self) -> WorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()


@dataclass(frozen=True)
class MemoryRun:
    images: int
    seconds: float
    driver_peak_mib: float
    worker_peak_mib: float  # the largest single worker
    workers: int


def _one_run(src: str, model_url: str, images: int, queue: Any) -> None:
    from jobs.runtime import ensure_ray
    from pipeline.colorize import ColorizeConfig, run_colorize

    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="chromascan-bench-mem-") as scratch:
        started = time.perf_counter()
        with WorkerPeaks() as workers:
            summary = run_colorize(
                ColorizeConfig(src=src, dst=scratch, model=model_url, incremental=False,
                               limit=images),
                software="bench",
            )  # fmt: skip
        seconds = time.perf_counter() - started
    peaks = workers.peaks.values()
    queue.put(
        MemoryRun(
            images=summary.ok,
            seconds=seconds,
            # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a spawned child starts with
            # its parent's peak (the CLI's, torch loaded), which would hide the run's own.
            driver_peak_mib=peak_rss_mib(os.getpid()) or 0.0,
            worker_peak_mib=max(peaks, default=0.0),
            workers=len(workers.peaks),
        )
    )


def bench_memory(src: str, model_url: str, *, counts: list[int]) -> list[MemoryRun]:
    """One colorize run per count (the first ``count`` scans of src), each in a fresh process.

    RAY_ADDRESS must be unset for a clean measurement: each run starts its own local cluster.
    """
    if os.environ.get("RAY_ADDRESS"):
        raise ValueError("bench memory starts its own local clusters; unset RAY_ADDRESS")
    context = multiprocessing.get_context("spawn")
    results = []
    for count in counts:
        queue = context.Queue()
        process = context.Process(target=_one_run, args=(src, model_url, count, queue))
        process.start()
        results.append(queue.get())
        process.join()
    return results
