"""Side-by-side benchmark: the Ray colorize pipeline against a plain loop over the same code.

Both colour the same scans with the same model, batch size and precision, writing full-size
PNGs; the plain loop is one process calling prepare_one -> Colorizer.predict -> finalize_one,
which is what the Ray stages call. Runs alternate (plain, Ray, plain, Ray, ...) so that noise
on a shared machine falls on both.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from pipeline.colorize import ColorizeConfig, run_colorize, with_output_paths
from pipeline.listing import list_images
from pipeline.model_store import load_model
from pipeline.stages import Colorizer, StageOptions, finalize_one, prepare_one


@dataclass(frozen=True)
class PipelineBench:
    images: int
    plain_images_per_s: list[float]
    ray_images_per_s: list[float]
    forward_images_per_s: float  # the model alone, same batch size and precision
    precision: str

    @property
    def ratio(self) -> float:
        """Ray over plain, medians of the rounds."""
        return float(np.median(self.ray_images_per_s) / np.median(self.plain_images_per_s))


def plain_loop(src: str, dst: str, model_url: str, *, batch_size: int, precision: str,
               software: str) -> int:  # fmt: skip
    """Colour every scan under src into dst in this process, in batches; returns the count."""
    model = load_model(model_url)
    colorizer = Colorizer(model_url=model_url, expected_sha256=model.sha256, precision=precision)
    options = StageOptions(
        run_id="plain", dst=dst, model_url=model_url, model_id=model.model_id,
        model_sha256=model.sha256, image_size=model.config.image_size, software=software,
    )  # fmt: skip
    rows = with_output_paths(list_images(src)).to_pylist()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prepared = [{**row, **prepare_one(row, options)} for row in chunk]
        ab = colorizer.predict(np.stack([p["l_model"] for p in prepared]))
        for index, row in enumerate(prepared):
            finalize_one(row, ab[index], options)
    return len(rows)


def forward_rate(model_url: str, *, batch_size: int, precision: str, repeats: int = 5) -> float:
    model = load_model(model_url)
    colorizer = Colorizer(model_url=model_url, expected_sha256=model.sha256, precision=precision)
    size = model.config.image_size
    batch = np.random.default_rng(0).uniform(-1, 1, (batch_size, 1, size, size)).astype(np.float32)
    colorizer.predict(batch)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        colorizer.predict(batch)
    return batch_size * repeats / (time.perf_counter() - started)


def bench_pipeline(
    src: str, model_url: str, *, rounds: int, batch_size: int, precision: str, software: str,
    actors: int = 1, actor_cpus: int = 1,
) -> PipelineBench:  # fmt: skip
    images = len(list_images(src))
    plain: list[float] = []
    ray_rates: list[float] = []
    scratch = tempfile.mkdtemp(prefix="chromascan-bench-")
    try:
        for round_index in range(rounds):
            dst = f"{scratch}/plain-{round_index}"
            started = time.perf_counter()
            plain_loop(src, dst, model_url, batch_size=batch_size, precision=precision,
                       software=software)  # fmt: skip
            plain.append(images / (time.perf_counter() - started))
            shutil.rmtree(dst, ignore_errors=True)
            dst = f"{scratch}/ray-{round_index}"
            started = time.perf_counter()
            run_colorize(
                ColorizeConfig(src=src, dst=dst, model=model_url, batch_size=batch_size,
                               precision=precision, actors=actors,
                               actor_cpus=actor_cpus),
                software=software,
            )  # fmt: skip
            ray_rates.append(images / (time.perf_counter() - started))
            shutil.rmtree(dst, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return PipelineBench(
        images=images,
        plain_images_per_s=plain,
        ray_images_per_s=ray_rates,
        forward_images_per_s=forward_rate(model_url, batch_size=batch_size, precision=precision),
        precision=precision,
    )


@dataclass(frozen=True)
class NightlyBench:
    images: int
    first_run_s: float
    unchanged_rerun_s: float

    @property
    def fraction(self) -> float:
        return self.unchanged_rerun_s / self.first_run_s


def bench_nightly(src: str, model_url: str, *, software: str) -> NightlyBench:
    """A first incremental run over src, then the same run again with nothing new."""
    images = len(list_images(src))
    scratch = tempfile.mkdtemp(prefix="chromascan-bench-")
    try:
        config = ColorizeConfig(src=src, dst=f"{scratch}/out", model=model_url, incremental=True)
        started = time.perf_counter()
        run_colorize(config, software=software)
        first = time.perf_counter() - started
        started = time.perf_counter()
        summary = run_colorize(config, software=software)
        again = time.perf_counter() - started
        if summary.attempted:
            raise RuntimeError(f"the unchanged re-run coloured {summary.attempted} scans")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return NightlyBench(images=images, first_run_s=first, unchanged_rerun_s=again)
