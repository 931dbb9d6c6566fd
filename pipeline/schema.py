"""The manifest: one row per input a run attempted. Column names live here and nowhere else.

Contract (DESIGN.md): columns may be added, never renamed or dropped. The first block is the
contract's; the second holds additions, documented beside each.
"""

from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_SKIPPED = "skipped"

MANIFEST_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("source_uri", pa.string()),
        ("source_size", pa.int64()),
        ("source_version", pa.string()),  # ETag on object stores, mtime on file systems
        ("source_sha256", pa.string()),
        ("source_format", pa.string()),
        ("source_mode", pa.string()),
        ("source_width", pa.int32()),  # after EXIF orientation, like the output
        ("source_height", pa.int32()),
        ("source_bits", pa.int16()),
        ("status", pa.string()),  # ok | failed | skipped
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("output_uri", pa.string()),
        ("output_sha256", pa.string()),
        ("output_size", pa.int64()),
        ("output_width", pa.int32()),
        ("output_height", pa.int32()),
        ("model_id", pa.string()),
        ("model_sha256", pa.string()),
        ("colorfulness", pa.float64()),
        ("started_at", pa.timestamp("ms", tz="UTC")),
        ("finished_at", pa.timestamp("ms", tz="UTC")),
        ("duration_s", pa.float64()),
        ("worker", pa.string()),
        # Additions.
        ("relative_path", pa.string()),  # source path under SRC; the output mirrors it
        ("source_pages", pa.int32()),  # frames in the file; only the first is coloured
        ("notes", pa.string()),  # e.g. "multi-page file: first of 3 pages used"
        ("decode_s", pa.float64()),  # seconds in read + decode + prepare
        ("infer_s", pa.float64()),  # this input's share of its batch's forward pass
        ("finalize_s", pa.float64()),  # seconds in full-resolution merge + encode + write
        ("output_bits", pa.int16()),  # bits per channel of the PNG written: 8 or 16 (--bits)
        ("source_icc", pa.string()),  # the source's embedded ICC profile, by its description
        ("signed", pa.bool_()),  # the output carries signed C2PA content credentials
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)
