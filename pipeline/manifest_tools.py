"""Reading a DST back for archive teams: what was attempted, what is current, what it cost.

The manifest is a log: a source coloured on three nights has three rows. The tools built on
this module (``verify``, ``bag``, ``report``) need the current state instead, so the helpers
here pick the latest row per source or per output, column-wise in Arrow, and never hold more
than the manifest's own columns in memory.

Where an output lives is recomputed from DST rather than trusted from ``output_uri``: a DST
that was copied (local folder to a bucket, one bucket to another) still verifies and bags.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.manifest import read_manifest
from pipeline.manifest_query import (
    REVIEW_STATES,
    ManifestQuery,
    no_manifest_error,
    require_dst,
)
from pipeline.provenance import redact_uri
from pipeline.schema import STATUS_FAILED, STATUS_OK, STATUS_SKIPPED
from pipeline.storage import StorageError, filesystem, join, read_bytes

logger = logging.getLogger(__name__)

STATUSES = (STATUS_OK, STATUS_FAILED, STATUS_SKIPPED)
OUTPUT_PATH = "output_path"  # added column: the output's path relative to DST/images
HASH_CHUNK_BYTES = 1 << 20  # 1 MiB reads: large enough for object stores, small in memory

_T = TypeVar("_T")
_R = TypeVar("_R")


# --- Reading the manifest ------------------------------------------------------------------


def open_manifest(
    dst: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Every manifest row under DST (``read_manifest``), or a clear error when there are none.

    Raises:
        StorageError: DST does not exist or cannot be listed.
        ManifestToolError: DST exists but holds no manifest rows.
    """
    shown = require_dst(dst, storage_options)
    table = read_manifest(dst, storage_options=storage_options, columns=columns)
    if table.num_rows == 0:
        raise no_manifest_error(shown)
    return table


def with_output_path(table: pa.Table, dst: str) -> pa.Table:
    """Add ``output_path``: where each row's output lies under DST/images (null: no output).

    Rows written to this very DST are matched by prefix, column-wise. Rows whose output_uri
    names another place (DST was copied or is reached by another URL) are mapped through the
    source's relative path, which the output mirrors (DESIGN.md's layout), suffix and all when
    two sources collided (scan.tif.png).
    """
    uris = table["output_uri"]
    prefix = redact_uri(join(dst, "images")) + "/"
    under_dst = pc.fill_null(pc.starts_with(uris, prefix), False)
    paths = pc.if_else(
        under_dst, pc.utf8_slice_codeunits(uris, len(prefix)), pa.scalar(None, pa.string())
    )
    moved = pc.and_(pc.is_valid(uris), pc.invert(under_dst))
    if pc.any(moved).as_py():
        relatives = table["relative_path"].to_pylist()
        mask = moved.to_pylist()
        resolved = paths.to_pylist()
        for index, uri in enumerate(uris.to_pylist()):
            if mask[index]:
                resolved[index] = _mirrored_output(uri, relatives[index])
        paths = pa.array(resolved, pa.string())
    return table.append_column(OUTPUT_PATH, paths)


def _mirrored_output(uri: str, relative_path: str | None) -> str | None:
    # Imported here: pipeline.stages brings torch (2 s), which only this rare path needs.
    from pipeline.stages import output_relative_path  # noqa: PLC0415

    if not relative_path:
        return None
    for candidate in (f"{relative_path}.png", output_relative_path(relative_path)):
        if uri.endswith("/" + candidate) or uri == candidate:
            return candidate
    return None


def latest_rows(table: pa.Table, key: str) -> pa.Table:
    """One row per distinct non-null ``key``: the latest attempt, sorted by ``key``.

    Latest means the greatest finished_at, then the greatest run_id (ids sort by start time);
    rows with no finished_at count as the oldest.
    """
    table = table.filter(pc.is_valid(table[key]))
    if table.num_rows == 0:
        return table
    ordered = table.sort_by(
        [(key, "ascending"), ("finished_at", "descending"), ("run_id", "descending")]
    )
    keys = ordered[key].combine_chunks()
    previous = pa.concat_arrays([pa.nulls(1, keys.type), keys.slice(0, len(keys) - 1)])
    first_of_key = pc.fill_null(pc.not_equal(keys, previous), True)
    return ordered.filter(first_of_key)


def current_outputs(table: pa.Table, dst: str) -> tuple[pa.Table, pa.Table]:
    """(outputs, unlocatable): the latest ok row per output path, and ok rows with no path.

    A re-run overwrites an output in place, so only the latest ok row describes the file on
    storage now; failed re-runs leave the earlier output as it was.
    """
    ok = table.filter(pc.equal(table["status"], STATUS_OK))
    ok = with_output_path(ok, dst)
    unlocatable = ok.filter(pc.and_(pc.is_valid(ok["output_uri"]), pc.is_null(ok[OUTPUT_PATH])))
    return latest_rows(ok, OUTPUT_PATH), unlocatable


def file_tasks(
    table: pa.Table,
    task: Callable[..., pa.Table],
    *,
    rows_per_task: int,
    workers: int,
    fn_kwargs: Mapping[str, Any],
) -> Iterator[pa.Table]:
    """``task`` over ``table`` in Ray Data tasks, ``workers`` at a time, where the files are.

    The table holds paths and digests only; each task reads its ``rows_per_task`` files next
    to the storage and returns a small table, which is what travels back to the driver.
    """
    import ray.data  # noqa: PLC0415  (Ray only where it is asked for)

    blocks = [table.slice(start, rows_per_task)
              for start in range(0, table.num_rows, rows_per_task)]  # fmt: skip
    if not blocks:
        return
    dataset = ray.data.from_arrow(blocks).map_batches(
        task,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs=dict(fn_kwargs),
        compute=ray.data.TaskPoolStrategy(size=workers),
        num_cpus=1,
    )
    yield from dataset.iter_batches(batch_format="pyarrow", batch_size=None)


# --- Streaming over storage ----------------------------------------------------------------

FILES_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64())])


def iter_files(
    url: str, *, storage_options: Mapping[str, Any] | None = None, batch_rows: int = 10_000
) -> Iterator[pa.RecordBatch]:
    """Every file under ``url`` (hidden ones too) as (path relative to url, size) batches.

    Unlike the image listing this keeps dot-files: a leftover temporary file next to the
    outputs is exactly what a verification should report. A missing ``url`` has no files.
    """
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    try:
        # Object-store filesystems cache listings per process: a listing from earlier in this
        # process must not hide files deleted or added since.
        fs.invalidate_cache(root)
        if not fs.isdir(root):
            return
        paths: list[str] = []
        sizes: list[int] = []
        for folder, _subfolders, files in fs.walk(root, detail=True):
            # ... and a folder's cached listing is dropped once read, so memory holds one
            # folder's entries, not the whole bucket's.
            fs.invalidate_cache(folder)
            relative_folder = folder.rstrip("/")[len(root) :].strip("/")
            for name in sorted(files):
                info = files[name]
                if info.get("type") == "directory":
                    continue
                paths.append(f"{relative_folder}/{name}" if relative_folder else name)
                sizes.append(int(info.get("size") or 0))
                if len(paths) >= batch_rows:
                    yield pa.RecordBatch.from_arrays(
                        [pa.array(paths, pa.string()), pa.array(sizes, pa.int64())],
                        schema=FILES_SCHEMA,
                    )
                    paths, sizes = [], []
        if paths:
            yield pa.RecordBatch.from_arrays(
                [pa.array(paths, pa.string()), pa.array(sizes, pa.int64())], schema=FILES_SCHEMA
            )
    except OSError as err:
        raise StorageError(f"{redact_uri(url)}: cannot list ({type(err).__name__}: {err})") from err


def hash_stream(
    fs: fsspec.AbstractFileSystem,
    path: str,
    *,
    algorithms: tuple[str, ...] = ("sha256",),
    copy_to: Any = None,
) -> tuple[dict[str, str], int]:
    """Hash one file in 1 MiB chunks (optionally copying it to the open ``copy_to``).

    Returns ({algorithm: hex digest}, size). Memory stays at one chunk whatever the file's size.
    """
    hashers = {name: hashlib.new(name) for name in algorithms}
    size = 0
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            size += len(chunk)
            for hasher in hashers.values():
                hasher.update(chunk)
            if copy_to is not None:
                copy_to.write(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}, size


def ordered_map(function: Callable[[_T], _R], items: Iterable[_T], *, workers: int) -> Iterator[_R]:
    """``map`` on a thread pool, results in input order, at most ``2 × workers`` in flight.

    Threads suit this work: hashing and image decoding release the GIL, and object-store reads
    wait on the network. The bound keeps memory flat however long ``items`` is.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chromascan-io") as pool:
        pending: deque[Future[_R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            # On an error (or the caller stopping early) queued work is dropped, not finished.
            for future in pending:
                future.cancel()


# --- Summary -------------------------------------------------------------------------------


@dataclass
class RunStats:
    """One run as its manifest rows and (when present) its run summary JSON describe it."""

    run_id: str
    rows: int
    statuses: dict[str, int]
    error_types: dict[str, int]
    models: dict[str, int]
    started_at: str | None
    finished_at: str | None
    elapsed_s: float | None
    images_per_second: float | None
    # "run summary" when DST/runs/<run_id>.json gave the timing; "manifest" when it is missing
    # (a run that died before writing it) and the rows' own timestamps were used instead.
    timing_from: str
    listed: int | None = None  # inputs the run listed under SRC (run summary)
    already_done: int | None = None  # of those, skipped because the ledger had them


@dataclass
class ManifestSummary:
    dst: str
    runs: list[RunStats]
    rows: int
    statuses: dict[str, int]
    sources: int
    latest_statuses: dict[str, int]  # each source counted once, by its latest attempt
    outputs: int
    error_types: dict[str, int]  # over the latest attempts: what is failing now
    models: dict[str, int]  # rows per model id
    elapsed_s: float
    images_per_second: float | None
    # Current outputs by review state (approved, rejected, pending): DST/review/ decisions.
    reviews: dict[str, int] = field(default_factory=dict)


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    values = table[column].drop_null()
    if len(values) == 0:
        return {}
    counted = pc.value_counts(values).to_pylist()
    ordered = sorted(counted, key=lambda item: (-item["counts"], item["values"]))
    return {item["values"]: item["counts"] for item in ordered}


def _status_counts(table: pa.Table) -> dict[str, int]:
    """Counts by status in the fixed order ok, failed, skipped (then anything unexpected)."""
    counts = _counts(table, "status")
    order = {status: index for index, status in enumerate(STATUSES)}
    return dict(sorted(counts.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def read_run_summary(
    dst: str, run_id: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """DST/runs/<run_id>.json as a dict; None when missing or unreadable as JSON."""
    data = read_bytes(
        join(dst, "runs", f"{run_id}.json"), storage_options=storage_options, missing_ok=True
    )
    if data is None:
        return None
    try:
        document = json.loads(data)
    except ValueError:
        logger.warning("run summary of %s is not JSON; using the manifest's timestamps", run_id)
        return None
    return document if isinstance(document, dict) else None


def _run_slices(table: pa.Table) -> dict[str, pa.Table]:
    """Each run's rows: one sort, then zero-copy slices (nightly DSTs hold hundreds of runs)."""
    by_run = table.filter(pc.is_valid(table["run_id"])).sort_by("run_id")
    run_ids = by_run["run_id"].combine_chunks()
    if len(run_ids) == 0:
        return {}
    starts = [0]
    if len(run_ids) > 1:
        changes = pc.not_equal(run_ids.slice(1), run_ids.slice(0, len(run_ids) - 1))
        starts += [int(i) + 1 for i in pc.indices_nonzero(changes).to_pylist()]
    ends = [*starts[1:], len(run_ids)]
    return {
        run_ids[begin].as_py(): by_run.slice(begin, end - begin)
        for begin, end in zip(starts, ends, strict=True)
    }


def run_summary_ids(dst: str, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Run ids with a summary under DST/runs/, including runs that had nothing to do."""
    fs, root = filesystem(join(dst, "runs"), storage_options)
    try:
        if not fs.isdir(root):
            return []
        names = [path.rsplit("/", 1)[-1] for path in fs.ls(root, detail=False)]
    except OSError as err:
        raise StorageError(f"{redact_uri(dst)}: cannot list runs/ ({err})") from err
    return sorted(name[: -len(".json")] for name in names if name.endswith(".json"))


def _run_stats(run_id: str, rows: pa.Table, document: Mapping[str, Any] | None) -> RunStats:
    return _run_stats_from_counts(
        run_id,
        rows=rows.num_rows,
        started=pc.min(rows["started_at"]).as_py() if rows.num_rows else None,
        finished=pc.max(rows["finished_at"]).as_py() if rows.num_rows else None,
        statuses=_status_counts(rows),
        error_types=_counts(rows, "error_type"),
        models=_counts(rows, "model_id"),
        document=document,
    )


def _timing_totals(runs: list[RunStats]) -> tuple[float, float | None]:
    """Seconds over the runs that say how long they took, and rows per second over those."""
    timed = [run for run in runs if run.elapsed_s is not None]
    elapsed = sum(run.elapsed_s or 0.0 for run in timed)
    return elapsed, (sum(run.rows for run in timed) / elapsed if elapsed else None)


def summarize(
    table: pa.Table, dst: str, *, storage_options: Mapping[str, Any] | None = None
) -> ManifestSummary:
    """Counts by status, error types, models and throughput, per run and over all runs.

    Runs are those with manifest rows (a run that died has rows but maybe no summary) and
    those with a run summary (a nightly run with nothing new has a summary but no rows).
    """
    slices = _run_slices(table)
    empty = table.schema.empty_table()
    runs = [
        _run_stats(
            run_id,
            slices.get(run_id, empty),
            read_run_summary(dst, run_id, storage_options=storage_options),
        )
        for run_id in sorted({*slices, *run_summary_ids(dst, storage_options=storage_options)})
    ]
    latest = latest_rows(table, "source_uri")
    outputs, _ = current_outputs(table, dst)
    elapsed_total, rate = _timing_totals(runs)
    return ManifestSummary(
        dst=redact_uri(dst),
        runs=runs,
        rows=table.num_rows,
        statuses=_status_counts(table),
        sources=latest.num_rows,
        latest_statuses=_status_counts(latest),
        outputs=outputs.num_rows,
        error_types=_counts(latest, "error_type"),
        models=_counts(table, "model_id"),
        elapsed_s=elapsed_total,
        images_per_second=rate,
    )


def summarize_query(query: ManifestQuery) -> ManifestSummary:
    """``summarize`` as aggregate queries: memory holds counts, never the rows.

    Same figures as ``summarize`` over ``read_manifest``'s table, for manifests of any size.
    """
    dst, options = query.dst, query.storage_options

    def grouped(sql: str) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for run_id, name, count in query.pairs(sql):
            result.setdefault(run_id, {})[name] = int(count)
        return result

    def ordered(counts: dict[str, int]) -> dict[str, int]:
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    def statuses(counts: dict[str, int]) -> dict[str, int]:
        order = {status: index for index, status in enumerate(STATUSES)}
        return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))

    per_run = {
        run_id: (int(rows), started, finished)
        for run_id, rows, started, finished in query.pairs(
            "SELECT run_id, count(*), min(started_at), max(finished_at) FROM manifest "
            "WHERE run_id IS NOT NULL GROUP BY run_id"
        )
    }
    run_statuses = grouped(
        "SELECT run_id, status, count(*) FROM manifest WHERE run_id IS NOT NULL "
        "AND status IS NOT NULL GROUP BY ALL"
    )
    run_errors = grouped(
        "SELECT run_id, error_type, count(*) FROM manifest WHERE run_id IS NOT NULL "
        "AND error_type IS NOT NULL GROUP BY ALL"
    )
    run_models = grouped(
        "SELECT run_id, model_id, count(*) FROM manifest WHERE run_id IS NOT NULL "
        "AND model_id IS NOT NULL GROUP BY ALL"
    )
    runs = []
    for run_id in sorted({*per_run, *run_summary_ids(dst, storage_options=options)}):
        rows, started, finished = per_run.get(run_id, (0, None, None))
        runs.append(
            _run_stats_from_counts(
                run_id,
                rows=rows,
                started=started,
                finished=finished,
                statuses=statuses(run_statuses.get(run_id, {})),
                error_types=ordered(run_errors.get(run_id, {})),
                models=ordered(run_models.get(run_id, {})),
                document=read_run_summary(dst, run_id, storage_options=options),
            )
        )

    def counts(sql: str) -> dict[str, int]:
        return {name: int(count) for name, count in query.pairs(sql) if name is not None}

    latest_statuses = statuses(counts("SELECT status, count(*) FROM latest GROUP BY ALL"))
    reviews = counts("SELECT review, count(*) FROM outputs GROUP BY ALL")
    elapsed_total, rate = _timing_totals(runs)
    return ManifestSummary(
        dst=redact_uri(dst),
        runs=runs,
        rows=int(query.scalar("SELECT count(*) FROM manifest")),
        statuses=statuses(counts("SELECT status, count(*) FROM manifest GROUP BY ALL")),
        sources=sum(latest_statuses.values())
        + int(query.scalar("SELECT count(*) FROM latest WHERE status IS NULL")),
        latest_statuses=latest_statuses,
        outputs=int(query.scalar("SELECT count(*) FROM outputs")),
        error_types=ordered(counts("SELECT error_type, count(*) FROM latest GROUP BY ALL")),
        models=ordered(counts("SELECT model_id, count(*) FROM manifest GROUP BY ALL")),
        elapsed_s=elapsed_total,
        images_per_second=rate,
        reviews={state: reviews.get(state, 0) for state in REVIEW_STATES},
    )


def _run_stats_from_counts(
    run_id: str,
    *,
    rows: int,
    started: datetime | None,
    finished: datetime | None,
    statuses: dict[str, int],
    error_types: dict[str, int],
    models: dict[str, int],
    document: Mapping[str, Any] | None,
) -> RunStats:
    run = (document or {}).get("run") or {}
    if run.get("elapsed_s") is not None:
        elapsed: float | None = float(run["elapsed_s"])
        timing_from = "run summary"
        started_text = run.get("started_at") or _iso(started)
        finished_text = run.get("finished_at") or _iso(finished)
    else:
        elapsed = (finished - started).total_seconds() if started and finished else None
        timing_from = "manifest"
        started_text, finished_text = _iso(started), _iso(finished)
    if not models and run.get("model_id"):
        models = {str(run["model_id"]): 0}
    already_done = None
    if run.get("skipped") is not None:
        # The run summary counts inputs the ledger already had as skipped; they have no row.
        already_done = int(run["skipped"]) - statuses.get(STATUS_SKIPPED, 0)
    return RunStats(
        run_id=run_id,
        rows=rows,
        statuses=statuses,
        error_types=error_types,
        models=models,
        started_at=started_text,
        finished_at=finished_text,
        elapsed_s=elapsed,
        images_per_second=rows / elapsed if elapsed else None,
        timing_from=timing_from,
        listed=run.get("listed"),
        already_done=already_done,
    )


def select_rows(
    table: pa.Table,
    *,
    status: str | None = None,
    run_id: str | None = None,
    latest: bool = False,
) -> pa.Table:
    """The rows ``show`` prints, in (source, time) order; ``latest``: one per source."""
    if latest:
        table = latest_rows(table, "source_uri")
    if status is not None:
        table = table.filter(pc.equal(table["status"], status))
    if run_id is not None:
        table = table.filter(pc.equal(table["run_id"], run_id))
    return table.sort_by([("source_uri", "ascending"), ("finished_at", "ascending")])


def top(counts: Mapping[str, int], limit: int) -> list[tuple[str, int]]:
    """The ``limit`` largest counts, largest first (ties by name, so output is stable)."""
    return sorted(Counter(counts).items(), key=lambda item: (-item[1], item[0]))[:limit]
