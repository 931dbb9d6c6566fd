"""Per-stage time and peak memory for one big scan (e.g. 6000×4000 or 60 MP, 16-bit TIFF).

Each measurement runs in a fresh spawned process so its peak resident memory (VmHWM) belongs
to that stage alone, as it would in a Ray task.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from typing import Any

import numpy as np


def make_scan(path: str, width: int, height: int, bits: int, *, grain: bool = False) -> None:
    """A smooth-plus-noise greyscale TIFF: compressible like a real scan, never constant.

    ``grain`` adds film grain as real scans have it: clumps a few pixels wide (noise summed
    over a 3×3 neighbourhood), strongest in the mid-tones. The encoder pays for it, so a bench
    of smooth scans flatters the finalize stage.
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    peak = 65535 if bits == 16 else 255
    x = np.linspace(0, 1, width, dtype=np.float32)
    rows = []
    for top in range(0, height, 1024):
        y = np.linspace(top / height, min(top + 1024, height) / height,
                        min(1024, height - top), dtype=np.float32)[:, None]  # fmt: skip
        band = (
            0.5 + 0.25 * np.sin(8 * x[None] + 5 * y) + 0.05 * rng.standard_normal((len(y), width))
        )
        if grain:
            noise = rng.standard_normal((len(y) + 2, width + 2)).astype(np.float32)
            clumps = sum(
                noise[dy : dy + len(y), dx : dx + width] for dy in range(3) for dx in range(3)
            ) / np.float32(3.0)  # unit variance, correlated over about 3 pixels
            band = band + 0.06 * clumps * (4 * band * (1 - band)).clip(0.2, 1)
        rows.append(np.clip(band, 0, 1) * peak)
    dtype = np.uint16 if bits == 16 else np.uint8
    Image.fromarray(np.concatenate(rows).astype(dtype)).save(path)


def _peak_kib() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over
    exec from the forking parent, so a spawned child would report the parent's peak."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _measure(stage: str, scan: str, options: Any, ab: np.ndarray, queue: Any) -> None:
    import torch

    from pipeline.stages import finalize_one, prepare_one

    torch.set_num_threads(1)  # as a 1-CPU Ray task
    row = {"source_uri": scan, "relative_path": "scan.tif", "output_path": "scan.png",
           "source_size": os.path.getsize(scan)}  # fmt: skip
    prepared = {**row, **prepare_one(row, options)} if stage == "finalize" else None
    baseline = _peak_kib()
    started = time.perf_counter()
    if stage == "prepare":
        result = prepare_one(row, options)
    else:
        assert prepared is not None
        result = finalize_one(prepared, ab, options)
    seconds = time.perf_counter() - started
    peak = _peak_kib()
    queue.put({"stage": stage, "seconds": seconds, "status": result["status"],
               "error": result.get("error_message"),
               "peak_mib": peak / 1024, "baseline_mib": baseline / 1024})  # fmt: skip


def bench_scan(model_url: str, *, width: int, height: int, bits: int) -> list[dict[str, Any]]:
    """Time and peak memory of prepare and finalize for one generated scan of this size.

    The model runs here, in the parent; the stage processes get its ab and never load torch
    weights, so their peak memory is the stage's own (plus the interpreter and libraries).
    """
    from pipeline.model_store import load_model
    from pipeline.stages import Colorizer, StageOptions, prepare_one

    context = multiprocessing.get_context("spawn")
    model = load_model(model_url)
    with tempfile.TemporaryDirectory(prefix="chromascan-scan-") as scratch:
        scan = os.path.join(scratch, "scan.tif")
        make_scan(scan, width, height, bits)
        options = StageOptions(
            run_id="bench", dst=os.path.join(scratch, "out"), model_url=model_url,
            model_id=model.model_id, model_sha256=model.sha256,
            image_size=model.config.image_size, software="bench",
        )  # fmt: skip
        row = {"source_uri": scan, "source_size": os.path.getsize(scan)}
        colorizer = Colorizer(model_url=model_url, expected_sha256=model.sha256)
        ab = colorizer.predict(prepare_one(row, options)["l_model"][None])[0]
        results = []
        for stage in ("prepare", "finalize"):
            queue = context.Queue()
            process = context.Process(target=_measure, args=(stage, scan, options, ab, queue))
            process.start()
            results.append({**queue.get(timeout=1800), "file_mib": os.path.getsize(scan) / 2**20})
            process.join()
        return results
