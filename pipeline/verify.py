"""Verify DST/images against the manifest: every output re-hashed, every stray file named.

What the manifest says should be there (the latest ok row per output) is full-outer-joined
with a listing of DST/images in Arrow; then the files present on both sides are re-hashed
in 1 MiB chunks on a small thread pool, in path order. Memory holds the two path columns and
a few chunks in flight, so it works on a bucket of millions of PNGs as on a local folder.
Signed outputs are the exception: c2pa validates a whole file, so each one being checked is
held once (one per worker thread or task), from the same read that hashes it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.manifest_tools import (
    FILES_SCHEMA,
    OUTPUT_PATH,
    current_outputs,
    file_tasks,
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
# Signed when written, but its C2PA credentials no longer validate: gone, broken, or (with
# trust anchors given) signed by no one they vouch for.
CREDENTIALS = "credentials"
KINDS = (MISSING, CHANGED, UNTRACKED, UNREADABLE, UNLOCATABLE, CREDENTIALS)

_COLUMNS = ["run_id", "status", "relative_path", "output_uri", "output_sha256", "output_size",
            "finished_at", "signed"]  # fmt: skip


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    path: str  # relative to DST/images (the output URI for UNLOCATABLE)
    detail: str = ""


@dataclass
class VerifyResult:
    expected: int = 0  # outputs the manifest vouches for
    verified: int = 0  # of those, present with the recorded sha256 (and valid credentials)
    signed: int = 0  # outputs whose content credentials were checked
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
    trust_anchors: str | None = None,
) -> VerifyResult:
    """Re-hash every output under DST/images against the manifest; report what differs.

    ``on_finding`` is called for each problem (in path order), so a caller can print
    progressively; the returned result has the counts.

    ``engine``: "threads" hashes on this machine with ``workers`` threads; "ray" hashes in
    Ray Data tasks (``workers`` at a time) on the cluster Ray is connected to, where the data
    is read, and sends back only each batch's problems and counts. ``connect`` is called
    (to start or join Ray) once the manifest has been read.

    Outputs written signed also have their C2PA credentials validated: with ``trust_anchors``
    (CA certificates, PEM) they must be "Trusted", without them intact ("Valid").

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
    expected = outputs.select([OUTPUT_PATH, "output_sha256", "output_size", "signed"])
    joined = expected.join(listed, keys=OUTPUT_PATH, join_type="full outer").sort_by(OUTPUT_PATH)

    if engine == "ray":
        if connect is not None:
            connect()
        _verify_on_ray(joined, images=images, storage_options=storage_options, workers=workers,
                       result=result, report=report, trust_anchors=trust_anchors)  # fmt: skip
        result.elapsed_s = time.perf_counter() - started
        return result
    fs, root = filesystem(images, storage_options)
    root = root.rstrip("/")

    def rows() -> Iterator[dict[str, Any]]:
        for batch in joined.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()

    def check(row: Mapping[str, Any]) -> Checked:
        return _check(fs, root, row, trust_anchors)

    for checked in ordered_map(check, rows(), workers=workers):
        result.bytes_hashed += checked.size
        result.signed += checked.signed
        if checked.finding is None:
            result.verified += 1
        else:
            report(checked.finding)
    result.elapsed_s = time.perf_counter() - started
    return result


@dataclass(frozen=True)
class Checked:
    """One output's check: its finding (None: verified), bytes hashed, credentials checked."""

    finding: Finding | None
    size: int = 0
    signed: bool = False


def _check(fs: Any, root: str, row: Mapping[str, Any], trust_anchors: str | None) -> Checked:
    """One row of the manifest-listing join, checked."""
    path = row[OUTPUT_PATH]
    if row["output_sha256"] is None:
        return Checked(Finding(UNTRACKED, path, f"{row['listed_size']} bytes"))
    if row["listed_size"] is None:
        return Checked(Finding(MISSING, path, f"sha256 {row['output_sha256']}"))
    signed = bool(row.get("signed"))
    try:
        # A signed output's bytes are kept from the one read that hashes them, for c2pa to
        # validate: what it says is why the file fails.
        kept = io.BytesIO() if signed else None
        digests, size = hash_stream(fs, f"{root}/{path}", copy_to=kept)
        problem = None if kept is None else _credentials_problem(kept.getvalue(), trust_anchors)
    except FileNotFoundError:  # deleted between the listing and the read
        return Checked(Finding(MISSING, path, f"sha256 {row['output_sha256']}"))
    except OSError as err:
        return Checked(Finding(UNREADABLE, path, f"{type(err).__name__}: {err}"))
    if digests["sha256"] != row["output_sha256"]:
        detail = f"sha256 {digests['sha256']}, manifest {row['output_sha256']}"
        if row["output_size"] is not None and size != row["output_size"]:
            detail += f"; {size} bytes, manifest {row['output_size']}"
        if problem is not None:
            detail += f"; {problem}"
        return Checked(Finding(CHANGED, path, detail), size, signed)
    if problem is not None:
        return Checked(Finding(CREDENTIALS, path, problem), size, signed)
    return Checked(None, size, signed)


def _credentials_problem(data: bytes, trust_anchors: str | None) -> str | None:
    """What is wrong with a signed output's C2PA credentials, in c2pa's codes; None: nothing.

    Without trust anchors an intact signature ("Valid") passes; with them, only "Trusted".
    """
    from pipeline.credentials import INVALID, TRUSTED, read_credentials  # noqa: PLC0415

    credentials = read_credentials(data, trust_anchors=trust_anchors)
    codes = f": {', '.join(credentials.failures)}" if credentials.failures else ""
    if credentials.state is None:
        return "C2PA credentials gone (the file has none)"
    if credentials.state == INVALID:
        return f"C2PA credentials invalid{codes}"
    if trust_anchors is not None and credentials.state != TRUSTED:
        return f"C2PA credentials {credentials.state}, not trusted by --trust{codes}"
    return None


# --- On Ray Data ---------------------------------------------------------------------------

RAY_BATCH_ROWS = 256  # files per task: enough to amortise a task, few enough to spread out
_FINDINGS_SCHEMA = pa.schema([("kind", pa.string()), ("path", pa.string()),
                              ("detail", pa.string()), ("size", pa.int64()),
                              ("verified", pa.int64()),
                              ("signed", pa.int64())])  # fmt: skip


def hash_batch(
    batch: pa.Table,
    *,
    images: str,
    storage_options: Mapping[str, Any] | None,
    trust_anchors: str | None = None,
) -> pa.Table:
    """Ray Data stage: check one batch of rows; return its problems and one counts row.

    The counts row (kind null) carries the batch's verified files and bytes hashed, so what
    travels back to the driver is a row per problem, not a row per file.
    """
    fs, root = filesystem(images, storage_options)
    root = root.rstrip("/")
    kinds, paths, details, sizes = [], [], [], []
    verified = hashed = signed = 0
    for row in batch.to_pylist():
        checked = _check(fs, root, row, trust_anchors)
        hashed += checked.size
        signed += checked.signed
        if checked.finding is None:
            verified += 1
        else:
            kinds.append(checked.finding.kind)
            paths.append(checked.finding.path)
            details.append(checked.finding.detail)
            sizes.append(checked.size)
    counts = len(kinds)
    return pa.table(
        {
            "kind": [*kinds, None],
            "path": [*paths, None],
            "detail": [*details, None],
            "size": [*sizes, hashed],
            "verified": [0] * counts + [verified],
            "signed": [0] * counts + [signed],
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
    trust_anchors: str | None,
) -> None:
    batches = file_tasks(
        joined,
        hash_batch,
        rows_per_task=RAY_BATCH_ROWS,
        workers=workers,
        fn_kwargs={
            "images": images,
            "storage_options": _task_options(images, storage_options),
            "trust_anchors": trust_anchors,
        },
    )
    findings: list[Finding] = []
    for batch in batches:
        for row in batch.to_pylist():
            if row["kind"] is None:
                result.verified += row["verified"]
                result.bytes_hashed += row["size"]
                result.signed += row["signed"]
            else:
                findings.append(Finding(row["kind"], row["path"], row["detail"]))
    for finding in sorted(findings, key=lambda item: (item.path, item.kind)):
        report(finding)
