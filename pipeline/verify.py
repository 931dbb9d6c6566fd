"""Verify DST/images against the manifest: every output re-hashed, every stray file named.

What the manifest says should be there (the latest ok row per output) is full-outer-joined
with a listing of DST/images in Arrow; then the files present on both sides are re-hashed
in 1 MiB chunks on a small thread pool, in path order. Memory holds the two path columns and
a few chunks in flight, never the outputs themselves, so it works on a bucket of millions of
PNGs as on a local folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.manifest_tools import (
    FILES_SCHEMA,
    OUTPUT_PATH,
    current_outputs,
    hash_stream,
    iter_files,
    open_manifest,
    ordered_map,
)
from pipeline.storage import filesystem, join, portable_storage_options

MISSING = "missing"  # the manifest has it, storage does not
CHANGED = "changed"  # present, but its sha256 is not the manifest's
UNTRACKED = "untracked"  # on storage under images/, in no ok manifest row
UNREADABLE = "unreadable"  # listed, but reading it failed
UNLOCATABLE = "unlocatable"  # an ok row whose output_uri maps to no path under DST/images
KINDS = (MISSING, CHANGED, UNTRACKED, UNREADABLE, UNLOCATABLE)

_COLUMNS = ["run_id", "status", "relative_path", "output_uri", "output_sha256", "output_size",
            "finished_at"]  # fmt: skip


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    path: str  # relative to DST/images (the output URI for UNLOCATABLE)
    detail: str = ""


@dataclass
class VerifyResult:
    expected: int = 0  # outputs the manifest vouches for
    verified: int = 0  # of those, present with the recorded sha256
    bytes_hashed: int = 0
    elapsed_s: float = 0.0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    @property
    def problems(self) -> int:
        return sum(self.counts.values())


def verify_outputs(
    dst: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    workers: int = 8,
    on_finding: Callable[[Finding], None] | None = None,
    engine: str = "threads",
    connect: Callable[[], None] | None = None,
) -> VerifyResult:
    """Re-hash every output under DST/images against the manifest; report what differs.

    ``on_finding`` is called for each problem (in path order), so a caller can print
    progressively; the returned result has the counts.

    ``engine``: "threads" hashes on this machine with ``workers`` threads; "ray" hashes in
    Ray Data tasks (``workers`` at a time) on the cluster Ray is connected to, where the data
    is read, and sends back only each batch's problems and counts. ``connect`` is called
    (to start or join Ray) once the manifest has been read.

    Raises:
        StorageError: DST or its files cannot be listed.
        ManifestToolError: DST holds no manifest.
    """
    started = time.perf_counter()
    result = VerifyResult()

    def report(finding: Finding) -> None:
        result.counts[finding.kind] += 1
        if on_finding is not None:
            on_finding(finding)

    table = open_manifest(dst, storage_options=storage_options, columns=_COLUMNS)
    outputs, unlocatable = current_outputs(table, dst)
    for row in unlocatable.select(["output_uri", "run_id"]).to_pylist():
        report(Finding(UNLOCATABLE, row["output_uri"], f"run {row['run_id']}"))
    result.expected = outputs.num_rows

    images = join(dst, "images")
    listed = pa.Table.from_batches(
        list(iter_files(images, storage_options=storage_options)), schema=FILES_SCHEMA
    ).rename_columns([OUTPUT_PATH, "listed_size"])
    expected = outputs.select([OUTPUT_PATH, "output_sha256", "output_size"])
    joined = expected.join(listed, keys=OUTPUT_PATH, join_type="full outer").sort_by(OUTPUT_PATH)

    if engine == "ray":
        if connect is not None:
            connect()
        _verify_on_ray(joined, images=images, storage_options=storage_options, workers=workers,
                       result=result, report=report)  # fmt: skip
        result.elapsed_s = time.perf_counter() - started
        return result
    fs, root = filesystem(images, storage_options)
    root = root.rstrip("/")

    def rows() -> Iterator[dict[str, Any]]:
        for batch in joined.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()

    for finding, size in ordered_map(lambda row: _check(fs, root, row), rows(), workers=workers):
        result.bytes_hashed += size
        if finding is None:
            result.verified += 1
        else:
            report(finding)
    result.elapsed_s = time.perf_counter() - started
    return result


def _check(fs: Any, root: str, row: Mapping[str, Any]) -> tuple[Finding | None, int]:
    """One row of the manifest-listing join: its finding (None: verified) and bytes hashed."""
    path = row[OUTPUT_PATH]
    if row["output_sha256"] is None:
        return Finding(UNTRACKED, path, f"{row['listed_size']} bytes"), 0
    if row["listed_size"] is None:
        return Finding(MISSING, path, f"sha256 {row['output_sha256']}"), 0
    try:
        digests, size = hash_stream(fs, f"{root}/{path}")
    except FileNotFoundError:  # deleted between the listing and the read
        return Finding(MISSING, path, f"sha256 {row['output_sha256']}"), 0
    except OSError as err:
        return Finding(UNREADABLE, path, f"{type(err).__name__}: {err}"), 0
    if digests["sha256"] != row["output_sha256"]:
        detail = f"sha256 {digests['sha256']}, manifest {row['output_sha256']}"
        if row["output_size"] is not None and size != row["output_size"]:
            detail += f"; {size} bytes, manifest {row['output_size']}"
        return Finding(CHANGED, path, detail), size
    return None, size


# --- On Ray Data ---------------------------------------------------------------------------

RAY_BATCH_ROWS = 256  # files per task: enough to amortise a task, few enough to spread out
_FINDINGS_SCHEMA = pa.schema([("kind", pa.string()), ("path", pa.string()),
                              ("detail", pa.string()), ("size", pa.int64()),
                              ("verified", pa.int64())])  # fmt: skip


def hash_batch(
    batch: pa.Table, *, images: str, storage_options: Mapping[str, Any] | None
) -> pa.Table:
    """Ray Data stage: check one batch of rows; return its problems and one counts row.

    The counts row (kind null) carries the batch's verified files and bytes hashed, so what
    travels back to the driver is a row per problem, not a row per file.
    """
    fs, root = filesystem(images, storage_options)
    root = root.rstrip("/")
    kinds, paths, details, sizes = [], [], [], []
    verified = hashed = 0
    for row in batch.to_pylist():
        finding, size = _check(fs, root, row)
        hashed += size
        if finding is None:
            verified += 1
        else:
            kinds.append(finding.kind)
            paths.append(finding.path)
            details.append(finding.detail)
            sizes.append(size)
    counts = len(kinds)
    return pa.table(
        {
            "kind": [*kinds, None],
            "path": [*paths, None],
            "detail": [*details, None],
            "size": [*sizes, hashed],
            "verified": [0] * counts + [verified],
        },
        schema=_FINDINGS_SCHEMA,
    )


def _task_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What the tasks use to reach the store: workers may not share the driver's AWS_*
    environment, so they get its endpoint and credentials in the task payload (as colorize's
    workers do), never in a log."""
    if storage_options is not None:
        return dict(storage_options)
    return portable_storage_options(url) if url.startswith("s3") else None


def _verify_on_ray(
    joined: pa.Table,
    *,
    images: str,
    storage_options: Mapping[str, Any] | None,
    workers: int,
    result: VerifyResult,
    report: Callable[[Finding], None],
) -> None:
    import ray.data  # noqa: PLC0415  (Ray only where it is asked for)

    # The join holds paths, digests and sizes only; the files themselves are read by the
    # tasks, next to the storage, RAY_BATCH_ROWS to a block so that `workers` tasks share them.
    blocks = [joined.slice(start, RAY_BATCH_ROWS)
              for start in range(0, joined.num_rows, RAY_BATCH_ROWS)]  # fmt: skip
    if not blocks:
        return
    dataset = ray.data.from_arrow(blocks).map_batches(
        hash_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"images": images, "storage_options": _task_options(images, storage_options)},
        compute=ray.data.TaskPoolStrategy(size=workers),
        num_cpus=1,
    )
    findings: list[Finding] = []
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            if row["kind"] is None:
                result.verified += row["verified"]
                result.bytes_hashed += row["size"]
            else:
                findings.append(Finding(row["kind"], row["path"], row["detail"]))
    for finding in sorted(findings, key=lambda item: (item.path, item.kind)):
        report(finding)
