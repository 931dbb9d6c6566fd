"""The manifest at archive scale: DuckDB over the Parquet parts, in bounded memory.

``read_manifest`` loads every row of every run into one Arrow table: right for a nightly run's
ledger, wrong for a tool that answers "how many failed?" over ten million rows. Here the parts
under DST/manifest/ (and the curators' decisions under DST/review/) are DuckDB views over
``read_parquet``: a query reads only the columns it names, pushes its filters into the scan
(row groups whose statistics rule them out are skipped), and sorts, groups and ranks under a
fixed memory limit, spilling to a temporary folder past it. Object stores are read through the
same fsspec filesystem as the rest of chromascan (registered with DuckDB), so S3 settings come
from the usual environment and never appear in a query.

Views, all in MANIFEST_SCHEMA's column names:

- ``manifest``: every row (columns a part predates read as NULL: the contract only adds).
- ``latest``: each source's latest attempt (greatest finished_at, then run_id).
- ``outputs``: the latest ok row per output path (``output_path``: relative to DST/images),
  with its ``review`` state: the latest decision recorded for that exact output (source and
  output sha256), or ``pending``.
- ``unlocatable``: ok rows whose output_uri maps to no path under DST/images.
- ``decisions``: every review decision ever appended (DST/review/).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.manifest import manifest_part_uris
from pipeline.provenance import redact_uri
from pipeline.schema import MANIFEST_SCHEMA, STATUS_OK
from pipeline.storage import StorageError, filesystem, join

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = "256MB"  # DuckDB's working memory; past it, sorts and joins spill
REVIEW_FOLDER = "review"
APPROVED, REJECTED, PENDING = "approved", "rejected", "pending"
DECISIONS = (APPROVED, REJECTED)
REVIEW_STATES = (APPROVED, REJECTED, PENDING)

# DST/review/ parts (contract like the manifest's: add columns, never rename or drop one).
REVIEW_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),  # the scan decided on
        ("relative_path", pa.string()),  # its path under SRC, for people reading the dataset
        ("source_version", pa.string()),  # the scan's ETag or mtime when it was decided
        ("output_sha256", pa.string()),  # the colourised copy decided on: the decision's key
        ("decision", pa.string()),  # approved | rejected
        ("reason", pa.string()),  # why (required for a rejection)
        ("reviewer", pa.string()),  # the name given when the review app started
        ("decided_at", pa.timestamp("us", tz="UTC")),  # µs: two clicks never tie
        ("run_id", pa.string()),  # the run that wrote the output decided on
    ]
)

# Filters `show` and the review app accept; every one is pushed into the scan.
SORTS = {
    "source": "source_uri ASC, finished_at ASC NULLS FIRST",
    "newest": "finished_at DESC NULLS LAST, source_uri ASC",
    "colourfulness": "colorfulness ASC NULLS LAST, source_uri ASC",
    "-colourfulness": "colorfulness DESC NULLS LAST, source_uri ASC",
}


@dataclass(frozen=True)
class RowFilter:
    """Which rows: each field narrows; None means any."""

    status: str | None = None
    error_type: str | None = None
    run_id: str | None = None
    model_id: str | None = None
    path: str | None = None  # glob on relative_path (or source_uri when it has none)
    min_colourfulness: float | None = None
    max_colourfulness: float | None = None
    review: str | None = None  # approved | rejected | pending (rows with an output only)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sql_type(field: pa.Field) -> str:
    kinds = {
        pa.string(): "VARCHAR",
        pa.int64(): "BIGINT",
        pa.int32(): "INTEGER",
        pa.int16(): "SMALLINT",
        pa.float64(): "DOUBLE",
        pa.bool_(): "BOOLEAN",
    }
    if pa.types.is_timestamp(field.type):
        return "TIMESTAMPTZ"
    return kinds[field.type]


def _mirrored_output(uri: str, relative_path: str) -> str | None:
    # Imported here: pipeline.stages brings torch (2 s), which only a copied DST needs.
    from pipeline.stages import output_relative_path  # noqa: PLC0415

    for candidate in (f"{relative_path}.png", output_relative_path(relative_path)):
        if uri.endswith("/" + candidate) or uri == candidate:
            return candidate
    return None


class ManifestToolError(ValueError):
    """DST holds no manifest, or a manifest tool cannot do what was asked; a one-line message."""


def require_dst(dst: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """DST's shown (credential-free) name, once it is known to be a folder or prefix.

    Raises:
        StorageError: DST does not exist or cannot be listed.
    """
    fs, root = filesystem(dst, storage_options)
    shown = redact_uri(dst)
    try:
        exists = fs.isdir(root)
    except OSError as err:
        raise StorageError(f"{shown}: cannot open ({type(err).__name__}: {err})") from err
    if not exists:
        raise StorageError(f"{shown}: no such folder or prefix")
    return shown


def no_manifest_error(shown: str) -> ManifestToolError:
    """The one message for a DST that holds no manifest rows."""
    return ManifestToolError(
        f"{shown}: no manifest here (expected manifest/run=<run_id>/part-*.parquet; "
        "is this a chromascan colorize destination?)"
    )


class ManifestQuery:
    """DuckDB views over one DST's manifest and review decisions; use as a context manager.

    Raises (on construction):
        StorageError: DST does not exist or cannot be listed.
        ManifestToolError: DST holds no manifest parts.
    """

    def __init__(
        self,
        dst: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        memory_limit: str = DEFAULT_MEMORY_LIMIT,
        threads: int | None = None,
        require_rows: bool = True,
    ) -> None:
        self.dst = dst.rstrip("/") if "://" in dst else dst
        self.storage_options = storage_options
        shown = require_dst(dst, storage_options)
        fs, _ = filesystem(dst, storage_options)
        parts = manifest_part_uris(dst, storage_options=storage_options)
        if require_rows and not parts:
            raise no_manifest_error(shown)
        self._spill = tempfile.TemporaryDirectory(prefix="chromascan-duckdb-")
        self.connection = duckdb.connect(
            config={
                "memory_limit": memory_limit,
                "threads": threads or min(4, os.cpu_count() or 1),
                "temp_directory": self._spill.name,
                "preserve_insertion_order": False,  # lets scans stream instead of buffering
                # Object stores go through chromascan's fsspec filesystem, never an extension
                # fetched from the network at query time.
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
            }
        )
        self.connection.execute("SET TimeZone = 'UTC'")  # times come back as written
        self.connection.execute("SET enable_progress_bar = false")  # it would write to stdout
        self._fs = fs
        if "://" in dst and not any(p in ("file", "local") for p in _protocols(fs)):
            # DuckDB reads the bucket through chromascan's own fsspec filesystem: the same
            # credentials and endpoint as everything else, none of them in a query string.
            self.connection.register_filesystem(fs)
        self.connection.create_function(
            "chromascan_mirrored_output", _mirrored_output, ["VARCHAR", "VARCHAR"], "VARCHAR"
        )
        try:
            self._create_views(parts, self.review_part_uris())
        except duckdb.Error as err:
            raise StorageError(f"{shown}: unreadable manifest ({err})") from err

    # --- set-up ---------------------------------------------------------------------------

    def review_part_uris(self) -> list[str]:
        fs, root = filesystem(join(self.dst, REVIEW_FOLDER), self.storage_options)
        try:
            fs.invalidate_cache(root)
            if not fs.exists(root):
                return []
            paths = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
        except OSError as err:
            raise StorageError(f"{redact_uri(self.dst)}: cannot list review/ ({err})") from err
        if "://" in self.dst and not any(p in ("file", "local") for p in _protocols(fs)):
            return [f"{_protocols(fs)[0]}://{p}" for p in paths]
        return paths

    def _source(self, uris: list[str], schema: pa.Schema) -> str:
        """SELECT of ``schema``'s columns from the parts; columns they lack read as NULL."""
        if not uris:
            columns = ", ".join(
                f"CAST(NULL AS {_sql_type(field)}) AS {field.name}" for field in schema
            )
            return f"SELECT {columns} WHERE false"
        listing = "[" + ", ".join(_quote(uri) for uri in uris) + "]"
        scan = f"read_parquet({listing}, union_by_name = true)"
        present = {row[0] for row in self.connection.execute(f"DESCRIBE SELECT * FROM {scan}")
                   .fetchall()}  # fmt: skip
        columns = ", ".join(
            f"CAST({field.name} AS {_sql_type(field)}) AS {field.name}"
            if field.name in present
            else f"CAST(NULL AS {_sql_type(field)}) AS {field.name}"
            for field in schema
        )
        return f"SELECT {columns} FROM {scan}"

    def _create_views(self, parts: list[str], reviews: list[str]) -> None:
        prefix = redact_uri(join(self.dst, "images")) + "/"
        sql = self.connection.execute
        sql(f"CREATE OR REPLACE VIEW manifest AS {self._source(parts, MANIFEST_SCHEMA)}")
        sql(
            "CREATE OR REPLACE VIEW latest AS SELECT * FROM manifest WHERE source_uri IS NOT NULL "
            "QUALIFY row_number() OVER (PARTITION BY source_uri "
            "ORDER BY finished_at DESC NULLS LAST, run_id DESC NULLS LAST) = 1"
        )
        sql(
            "CREATE OR REPLACE VIEW ok_rows AS SELECT *, CASE "
            f"WHEN starts_with(output_uri, {_quote(prefix)}) "
            f"THEN substr(output_uri, {len(prefix) + 1}) "
            "WHEN output_uri IS NOT NULL AND relative_path IS NOT NULL "
            "THEN chromascan_mirrored_output(output_uri, relative_path) "
            f"END AS output_path FROM manifest WHERE status = {_quote(STATUS_OK)}"
        )
        sql(
            "CREATE OR REPLACE VIEW unlocatable AS SELECT * FROM ok_rows "
            "WHERE output_uri IS NOT NULL AND output_path IS NULL"
        )
        sql(f"CREATE OR REPLACE VIEW decisions AS {self._source(reviews, REVIEW_SCHEMA)}")
        # The latest decision per exact output: a re-colourised scan has a new sha256, so
        # the decision on its previous copy no longer applies to it.
        sql(
            "CREATE OR REPLACE VIEW current_decisions AS SELECT source_uri, output_sha256, "
            "decision, reason, reviewer, decided_at FROM decisions "
            "QUALIFY row_number() OVER (PARTITION BY source_uri, output_sha256 "
            "ORDER BY decided_at DESC) = 1"
        )
        sql(
            "CREATE OR REPLACE VIEW outputs AS SELECT o.*, "
            f"coalesce(d.decision, {_quote(PENDING)}) AS review, d.reason AS review_reason, "
            "d.reviewer AS reviewer, d.decided_at AS decided_at FROM ("
            "SELECT * FROM ok_rows WHERE output_path IS NOT NULL "
            "QUALIFY row_number() OVER (PARTITION BY output_path "
            "ORDER BY finished_at DESC NULLS LAST, run_id DESC NULLS LAST) = 1) o "
            "LEFT JOIN current_decisions d "
            "ON o.source_uri = d.source_uri AND o.output_sha256 = d.output_sha256"
        )
        # Every row with its review state (NULL when it has no output to decide on).
        sql(
            "CREATE OR REPLACE VIEW reviewed AS SELECT m.*, CASE WHEN m.status = "
            f"{_quote(STATUS_OK)} AND m.output_sha256 IS NOT NULL "
            f"THEN coalesce(d.decision, {_quote(PENDING)}) END AS review, "
            "d.reason AS review_reason FROM manifest m LEFT JOIN current_decisions d "
            "ON m.source_uri = d.source_uri AND m.output_sha256 = d.output_sha256"
        )
        sql(
            "CREATE OR REPLACE VIEW latest_reviewed AS SELECT m.*, CASE WHEN m.status = "
            f"{_quote(STATUS_OK)} AND m.output_sha256 IS NOT NULL "
            f"THEN coalesce(d.decision, {_quote(PENDING)}) END AS review, "
            "d.reason AS review_reason FROM latest m LEFT JOIN current_decisions d "
            "ON m.source_uri = d.source_uri AND m.output_sha256 = d.output_sha256"
        )

    def refresh_reviews(self) -> None:
        """Re-read DST/review/ (the review app appends to it while it runs)."""
        source = self._source(self.review_part_uris(), REVIEW_SCHEMA)
        self.connection.execute(f"CREATE OR REPLACE VIEW decisions AS {source}")

    # --- queries --------------------------------------------------------------------------

    # Relations, not execute(): DuckDB 2 refuses new work on a connection while an executed
    # statement's result is unfinished, and a relation's fetchall() always finishes it.
    def scalar(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        rows = self.pairs(sql, parameters)
        return rows[0][0] if rows else None

    def pairs(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.connection.sql(sql, params=list(parameters)).fetchall()

    def table(self, sql: str, parameters: Sequence[Any] = ()) -> pa.Table:
        return self.connection.sql(sql, params=list(parameters)).to_arrow_table()

    def batches(
        self, sql: str, parameters: Sequence[Any] = (), *, rows: int = 4096
    ) -> Iterator[pa.RecordBatch]:
        """The query's result streamed in batches: memory holds one batch, not the result."""
        # A relation streams; an executed statement's Arrow output would copy every row first.
        yield from self.connection.sql(sql, params=list(parameters)).to_arrow_reader(rows)

    def where(self, rows: RowFilter) -> tuple[str, list[Any]]:
        """SQL WHERE clause (or "") and its parameters for ``rows``."""
        clauses: list[str] = []
        values: list[Any] = []
        for column, value in (
            ("status", rows.status),
            ("error_type", rows.error_type),
            ("run_id", rows.run_id),
            ("model_id", rows.model_id),
            ("review", rows.review),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        if rows.path is not None:
            clauses.append("coalesce(relative_path, source_uri) GLOB ?")
            values.append(rows.path)
        if rows.min_colourfulness is not None:
            clauses.append("colorfulness >= ?")
            values.append(rows.min_colourfulness)
        if rows.max_colourfulness is not None:
            clauses.append("colorfulness <= ?")
            values.append(rows.max_colourfulness)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), values

    def select(
        self,
        rows: RowFilter,
        *,
        latest: bool = False,
        sort: str = "source",
        limit: int | None = None,
        offset: int = 0,
        columns: Sequence[str] | None = None,
    ) -> tuple[str, list[Any]]:
        """The query (and parameters) for the rows ``rows`` selects, a page at a time."""
        view = "latest_reviewed" if latest else "reviewed"
        where, values = self.where(rows)
        chosen = ", ".join(columns) if columns else "*"
        sql = f"SELECT {chosen} FROM {view}{where} ORDER BY {SORTS[sort]}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        if offset:
            sql += f" OFFSET {int(offset)}"
        return sql, values

    def count(self, rows: RowFilter, *, latest: bool = False) -> int:
        view = "latest_reviewed" if latest else "reviewed"
        where, values = self.where(rows)
        return int(self.scalar(f"SELECT count(*) FROM {view}{where}", values))

    def close(self) -> None:
        self.connection.close()
        self._spill.cleanup()

    def __enter__(self) -> ManifestQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _protocols(fs: Any) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
