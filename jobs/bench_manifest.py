"""``chromascan bench manifest``: the manifest tools at archive scale, measured side by side.

For each size a synthetic DST is written (jobs/synthetic_manifest.py: rows only, files for a
small subset) and each command runs as its own process, so that its peak resident memory
(ru_maxrss) is its own. The previous way of reading (the whole manifest into one Arrow table,
then the summary over it) runs beside the new one at the same size, alternately, for a ratio.
Verify throughput is measured on real files with 1 and 2 Ray Data workers and with threads.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak_mib: float
    code: int


# `chromascan ARGV` in a process that writes its own peak (VmHWM) to stderr as it exits: the
# high-water mark of this very process image, not of the parent it was forked from.
PEAK_WRAPPER = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    with open('/proc/self/status') as status:\n"
    "        sys.stderr.write(next(l for l in status if l.startswith('VmHWM:')))\n"
    "atexit.register(_peak)\n"
    "from jobs.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def measure(argv: list[str]) -> Measured:
    """Run ``argv`` (from ``chromascan`` or ``python_peak``); wall time and peak memory."""
    started = time.perf_counter()
    process = subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    _, _, peak = process.stderr.rpartition("VmHWM:")
    peak_mib = int(peak.split()[0]) / 1024 if peak.strip() else float("nan")
    return Measured(time.perf_counter() - started, peak_mib, process.returncode)


def chromascan(*argv: str) -> list[str]:
    return [sys.executable, "-c", PEAK_WRAPPER, *argv]


def python_peak(code: str, *argv: str) -> list[str]:
    """``python -c CODE ARGV`` reporting its peak the same way."""
    wrapper = PEAK_WRAPPER.replace(
        "from jobs.cli import main\nsys.exit(main(sys.argv[1:]))\n", code + "\n"
    )
    return [sys.executable, "-c", wrapper, *argv]


def best_of(argv: list[str], repeats: int) -> Measured:
    runs = [measure(argv) for _ in range(repeats)]
    return Measured(
        statistics.median(r.seconds for r in runs), max(r.peak_mib for r in runs), runs[-1].code
    )


def write_files(root: Path, *, count: int, size: int) -> None:
    """A DST of ``count`` real outputs of ``size`` bytes each, for hashing throughput."""
    import hashlib
    from datetime import UTC, datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.schema import MANIFEST_SCHEMA

    rows = []
    for index in range(count):
        data = os.urandom(size)
        path = root / "images" / f"f{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append({"run_id": "r1", "source_uri": f"/scans/f{index:05d}.tif", "status": "ok",
                     "relative_path": f"f{index:05d}.tif", "output_uri": str(path),
                     "output_sha256": hashlib.sha256(data).hexdigest(), "output_size": size,
                     "finished_at": datetime.now(UTC)})  # fmt: skip
    folder = root / "manifest" / "run=r1"
    folder.mkdir(parents=True)
    full = [{name: row.get(name) for name in MANIFEST_SCHEMA.names} for row in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=MANIFEST_SCHEMA), folder / "part-0.parquet")


def page_load_seconds(dst: Path, path: str, repeats: int) -> list[float]:
    """Start `chromascan review --read-only` and time GET ``path`` (the server renders it)."""
    process = subprocess.Popen(
        chromascan("review", str(dst), "--read-only", "--port", "0", "--cache",
                   str(dst.parent / "thumbs")),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        url = line.rsplit(" ", 1)[-1].strip().rstrip("/")
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            with urllib.request.urlopen(url + path, timeout=600) as answer:
                answer.read()
            times.append(time.perf_counter() - started)
        return times
    finally:
        process.terminate()
        process.wait(timeout=30)


def bench_manifest_command(
    rows: Annotated[
        list[int] | None,
        typer.Option("--rows", min=1, help="Manifest rows; repeatable (default 100000, 1000000)."),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Runs of each command (median).")] = 3,
    files: Annotated[int, typer.Option(min=1, help="Files for the verify throughput.")] = 200,
    file_mb: Annotated[int, typer.Option(min=1, help="Size of each of those files, MB.")] = 4,
) -> None:
    """summary / show / report time and peak memory at each size, old reading beside new;
    verify throughput with 1 and 2 Ray workers; the review page's load time."""
    import tempfile

    from jobs.synthetic_manifest import write_synthetic_dst

    with tempfile.TemporaryDirectory(prefix="chromascan-bench-") as scratch:
        for count in rows or [100_000, 1_000_000]:
            dst = Path(scratch) / f"dst-{count}"
            typer.echo(f"bench: writing a synthetic manifest of {count} rows ...", err=True)
            write_synthetic_dst(dst, rows=count)
            report = Path(scratch) / f"report-{count}.html"
            commands = {
                "summary (before: whole table)": python_peak(_OLD_SUMMARY, str(dst)),
                "summary": chromascan("manifest", "summary", str(dst)),
                "show --status failed --limit 20": chromascan(
                    "manifest", "show", str(dst), "--status", "failed", "--limit", "20"),
                "report": chromascan("manifest", "report", str(dst), "--out", str(report)),
            }  # fmt: skip
            for name, argv in commands.items():
                result = best_of(argv, repeats)
                typer.echo(f"{count:>9} rows  {name:<32} {result.seconds:7.2f} s  "
                           f"peak {result.peak_mib:6.0f} MiB  exit {result.code}")  # fmt: skip
            typer.echo(f"{count:>9} rows  report size {report.stat().st_size / 1e6:.2f} MB")
            for label, path in (("review page 1", "/"), ("review page 1000, failed",
                                "/?status=failed&page=1000")):  # fmt: skip
                times = page_load_seconds(dst, path, repeats)
                typer.echo(f"{count:>9} rows  {label:<32} {min(times):7.2f} s  (best of "
                           f"{repeats}; first {times[0]:.2f} s)")  # fmt: skip
        hashed = Path(scratch) / "hashed"
        write_files(hashed, count=files, size=file_mb * 10**6)
        total_mb = files * file_mb
        for label, extra in (("threads (8)", ["--engine", "threads"]),
                             ("ray, 1 worker", ["--workers", "1"]),
                             ("ray, 2 workers", ["--workers", "2"])):  # fmt: skip
            result = best_of(chromascan("manifest", "verify", str(hashed), *extra), repeats)
            typer.echo(f"verify {label:<16} {total_mb / result.seconds:7.1f} MB/s  "
                       f"({result.seconds:.2f} s for {total_mb} MB, exit {result.code}; "
                       "includes starting Ray)")  # fmt: skip


_OLD_SUMMARY = (
    "from pipeline.manifest_tools import open_manifest, summarize\n"
    "summarize(open_manifest(sys.argv[1]), sys.argv[1])"
)
