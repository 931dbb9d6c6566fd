"""A DST with a synthetic manifest of any size: rows only, real files for a small subset.

The rows look like a long nightly history: ``runs`` runs, mostly ok, a quarter failed with a
handful of error types, a few skipped. Only ``with_files`` ok rows (the least and most
colourful and the newest, the ones a report samples first) get a real scan and output, so a
million rows take seconds to write and a few hundred KB of images.

Run as a module to make one for measuring: ``python -m jobs.synthetic_manifest
DST --rows 1000000``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.schema import MANIFEST_SCHEMA

ERROR_TYPES = ("UnidentifiedImageError", "DecompressionBombError", "TruncatedImage",
               "UnsupportedMode", "DecodeTimeout", "WorkerCrashed", "ImplausibleResolution",
               "OSError")  # fmt: skip
MODEL = "pix2pix@0123456789ab"
T0 = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)


def _image(seed: int, mode: str) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (24, 32) if mode == "L" else (24, 32, 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buffer, "PNG")
    return buffer.getvalue()


def write_synthetic_dst(
    root: Path, *, rows: int, runs: int = 10, with_files: int = 120, seed: int = 0
) -> dict[str, int]:
    """Write DST at ``root`` (scans under root/../scans); counts by status."""
    scans = root.parent / f"{root.name}-scans"
    rng = np.random.default_rng(seed)
    index = np.arange(rows)
    draw = rng.random(rows)
    status = np.where(draw < 0.70, "ok", np.where(draw < 0.95, "failed", "skipped"))
    colourfulness = rng.uniform(5, 95, rows)
    run_of = index * runs // rows
    ok_index = index[status == "ok"]
    chosen = np.unique(np.concatenate([
        ok_index[np.argsort(colourfulness[ok_index])[: with_files // 3]],
        ok_index[np.argsort(-colourfulness[ok_index])[: with_files // 3]],
        ok_index[-(with_files // 3):],  # the newest: the last run's last rows (.png sources
                                        # keep their name as outputs)
    ]))  # fmt: skip
    relative = [f"box{i // 1000:04d}/scan-{i:07d}.png" for i in range(rows)]
    source_uri = [f"{scans}/{path}" for path in relative]
    output_sha = np.array([f"{i:064x}" for i in range(rows)], dtype=object)
    for i in chosen:
        scan, output = _image(int(i), "L"), _image(int(i), "RGB")
        for folder, data in ((scans, scan), (root / "images", output)):
            path = folder / relative[i]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        output_sha[i] = hashlib.sha256(output).hexdigest()
    # One second per row, in order: run after run, the last rows the newest.
    started = np.datetime64(T0.replace(tzinfo=None), "ms") + index.astype("timedelta64[s]")
    is_ok = status == "ok"
    is_failed = status == "failed"
    error = np.where(is_failed, np.array(ERROR_TYPES)[index % len(ERROR_TYPES)], None)
    columns = {
        "run_id": [f"2026010{1 + r // 10}T{r % 10:02d}0000Z-{r:06x}" for r in run_of],
        "source_uri": source_uri,
        "relative_path": relative,
        "source_size": np.full(rows, 1000),
        "source_version": ["v1"] * rows,
        "source_sha256": [f"{i:064x}" for i in range(rows)],
        "source_format": ["PNG"] * rows,
        "source_mode": ["L"] * rows,
        "source_width": np.full(rows, 32, dtype=np.int32),
        "source_height": np.full(rows, 24, dtype=np.int32),
        "source_bits": np.full(rows, 8, dtype=np.int16),
        "status": status.tolist(),
        "error_type": error.tolist(),
        "error_message": np.where(is_failed, "synthetic failure", None).tolist(),
        "output_uri": [
            f"{root}/images/{path}" if ok else None
            for path, ok in zip(relative, is_ok, strict=True)
        ],
        "output_sha256": np.where(is_ok, output_sha, None).tolist(),
        "output_size": np.where(is_ok, 1000, None).tolist(),
        "model_id": [MODEL] * rows,
        "colorfulness": np.where(is_ok, colourfulness, np.nan),
        "started_at": pa.array(started).cast(pa.timestamp("ms", tz="UTC")),
        "finished_at": pa.array(started + np.timedelta64(2, "s")).cast(
            pa.timestamp("ms", tz="UTC")
        ),
        "duration_s": np.full(rows, 2.0),
    }

    def column(name: str) -> pa.Array:
        kind = MANIFEST_SCHEMA.field(name).type
        if name not in columns:
            return pa.nulls(rows, kind)
        values = columns[name]
        if isinstance(values, pa.Array):
            return values
        return pa.array(values, kind, from_pandas=True)

    table = pa.table({name: column(name) for name in MANIFEST_SCHEMA.names})
    for run in range(runs):
        part = table.filter(pa.array(run_of == run))
        folder = root / "manifest" / f"run={part['run_id'][0].as_py()}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(part, folder / "part-0.parquet", row_group_size=64 * 1024)
    values, counts = np.unique(status, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    arguments = parser.parse_args()
    print(write_synthetic_dst(arguments.dst, rows=arguments.rows))
