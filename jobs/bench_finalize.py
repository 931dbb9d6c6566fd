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
    signed: bool  # with C2PA content credentials (a private test PKI's key)
    seconds: float  # median per scan
    output_bytes: int

    @property
    def megapixels_per_second(self) -> float:
        return self.width * self.height / 1e6 / self.seconds if self.seconds > 0 else 0.0


Combo = tuple[int, int, int, bool]  # width, height, output bits, signed


def time_finalize(
    folder: str,
    *,
    sizes: list[tuple[int, int]],
    output_bits: list[int],
    signing: list[bool] | None = None,
    repeats: int = 3,
) -> list[FinalizeTiming]:
    """Median seconds of finalize_one per (size, output bits, signed), on 16-bit grey scans."""
    from jobs.bench_scan import make_scan
    from pipeline.credentials import load_signing_keys, make_test_pki
    from pipeline.stages import StageOptions, finalize_one, prepare_one

    pki = make_test_pki("chromascan bench")
    keys = load_signing_keys(pki.chain_pem.decode(), pki.key_pem.decode(), environ={})
    combos: list[Combo] = []
    rows = {}
    for width, height in sizes:
        path = os.path.join(folder, f"scan-{width}x{height}.tif")
        make_scan(path, width, height, 16)
        for bits in output_bits:
            for signed in signing or [False]:
                options = StageOptions(
                    run_id="bench", dst=os.path.join(folder, f"out-{bits}-{signed}"),
                    model_url="unused", model_id="bench@000000000000", model_sha256="0" * 64,
                    image_size=256, software="chromascan bench", output_bits=str(bits),
                    signing=keys if signed else None,
                )  # fmt: skip
                row = {"source_uri": path, "source_size": os.path.getsize(path),
                       "output_path": f"{width}x{height}.png"}  # fmt: skip
                row = {**row, **prepare_one(row, options)}
                if row["status"] != "ok":
                    raise RuntimeError(f"bench scan failed to prepare: {row['error_message']}")
                rows[(width, height, bits, signed)] = (row, options)
                combos.append((width, height, bits, signed))
    ab = np.random.default_rng(0).normal(0, 20, (2, 256, 256)).astype(np.float32)
    samples: dict[Combo, list[float]] = {combo: [] for combo in combos}
    sizes_out: dict[Combo, int] = {}
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
        FinalizeTiming(*combo, statistics.median(samples[combo]), sizes_out[combo])
        for combo in combos
    ]
