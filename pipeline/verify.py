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
from pipeline.storage import filesystem, join

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
) -> VerifyResult:
    """Re-hash every output under DST/images against the manifest; report what differs.

    ``on_finding`` is called for each problem as it is found (in path order), so a caller can
    print progressively; the returned result has the counts.

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

    fs, root = filesystem(images, storage_options)
    root = root.rstrip("/")

    def check(row: dict[str, Any]) -> tuple[Finding | None, int]:
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

    def rows() -> Iterator[dict[str, Any]]:
        for batch in joined.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()

    for finding, size in ordered_map(check, rows(), workers=workers):
        result.bytes_hashed += size
        if finding is None:
            result.verified += 1
        else:
            report(finding)
    result.elapsed_s = time.perf_counter() - started
    return result
