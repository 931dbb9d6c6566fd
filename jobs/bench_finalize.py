"""Finalize alone, side by side across scan sizes and output depths, in one process.

Finalize (full-resolution decode, merge, PNG encode with metadata, write) is the stage whose
cost grows with the scan; this times ``finalize_one`` itself, interleaved round-robin so a
slow moment on a shared machine hits every combination rather than one.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FinalizeTiming:
    width: int
    height: int
    output_bits: int
    seconds: float  # median per scan
    output_bytes: int

    @property
    def megapixels_per_second(self) -> float:
        return self.width * self.height / 1e6 / self.seconds if self.seconds > 0 else 0.0


def time_finalize(
    folder: str, *, sizes: list[tuple[int, int]], output_bits: list[int], repeats: int = 3
) -> list[FinalizeTiming]:
    """Median seconds of finalize_one per (size, output bits), on 16-bit grey scans."""
    from jobs.bench_scan import make_scan
    from pipeline.stages import StageOptions, finalize_one, prepare_one

    combos, rows = [], {}
    for width, height in sizes:
        path = os.path.join(folder, f"scan-{width}x{height}.tif")
        make_scan(path, width, height, 16)
        for bits in output_bits:
            options = StageOptions(
                run_id="bench", dst=os.path.join(folder, f"out-{bits}"), model_url="unused",
                model_id="bench@000000000000", model_sha256="0" * 64, image_size=256,
                software="chromascan bench", output_bits=str(bits),
            )  # fmt: skip
            row = {"source_uri": path, "source_size": os.path.getsize(path),
                   "output_path": f"{width}x{height}.png"}  # fmt: skip
            row = {**row, **prepare_one(row, options)}
            if row["status"] != "ok":
                raise RuntimeError(f"bench scan failed to prepare: {row['error_message']}")
            rows[(width, height, bits)] = (row, options)
            combos.append((width, height, bits))
    ab = np.random.default_rng(0).normal(0, 20, (2, 256, 256)).astype(np.float32)
    samples: dict[tuple[int, int, int], list[float]] = {combo: [] for combo in combos}
    sizes_out: dict[tuple[int, int, int], int] = {}
    for combo in combos:  # warm-up: numba's compiled merge, imports, first allocations
        finalize_one(rows[combo][0], ab, rows[combo][1])
    for _ in range(repeats):
        for combo in combos:
            row, options = rows[combo]
            started = time.perf_counter()
            result = finalize_one(row, ab, options)
            samples[combo].append(time.perf_counter() - started)
            if result["status"] != "ok":
                raise RuntimeError(f"finalize failed: {result['error_message']}")
            sizes_out[combo] = int(result["output_size"])
    return [
        FinalizeTiming(w, h, b, statistics.median(samples[(w, h, b)]), sizes_out[(w, h, b)])
        for w, h, b in combos
    ]
