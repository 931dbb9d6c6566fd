"""Reading the manifest back: every run's rows under DST/manifest/, the ledger of work done."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.schema import MANIFEST_SCHEMA
from pipeline.storage import StorageError, filesystem, join


def manifest_part_uris(dst: str, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Every part file under DST/manifest/run=*/, oldest run first."""
    fs, root = filesystem(join(dst, "manifest"), storage_options)
    try:
        if not fs.exists(root):
            return []
        paths = sorted(p for p in fs.find(root) if p.endswith(".parquet") and "/run=" in p)
    except OSError as err:
        raise StorageError(f"{dst}: cannot list the manifest ({err})") from err
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if "://" in dst and protocol not in ("file", "local"):
        return [f"{protocol}://{p}" for p in paths]
    return paths


def read_manifest(
    dst: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """All manifest rows of every run under DST as one table in MANIFEST_SCHEMA (or ``columns``).

    Parts written by older versions (fewer columns) get nulls for the columns added since:
    the contract only ever adds columns.
    """
    schema = MANIFEST_SCHEMA if columns is None else pa.schema(
        [MANIFEST_SCHEMA.field(name) for name in columns]
    )  # fmt: skip
    tables = []
    for uri in manifest_part_uris(dst, storage_options=storage_options):
        fs, path = filesystem(uri, storage_options)
        try:
            with fs.open(path, "rb") as handle:
                data = handle.read()
            part = pq.read_table(io.BytesIO(data), columns=[
                name for name in schema.names if name in pq.read_schema(io.BytesIO(data)).names
            ])  # fmt: skip
        except (OSError, pa.ArrowInvalid) as err:
            raise StorageError(f"{uri}: unreadable manifest part ({err})") from err
        for name in schema.names:
            if name not in part.column_names:
                part = part.append_column(name, pa.nulls(part.num_rows, schema.field(name).type))
        tables.append(part.select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()
