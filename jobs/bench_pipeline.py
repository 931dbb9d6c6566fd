"""Side-by-side benchmark: the Ray colorize pipeline against a plain loop over the same code.

Both colour the same scans with the same model, batch size and precision, writing full-size
PNGs; the plain loop is one process calling prepare_one -> Colorizer.predict -> finalize_one,
which is what the Ray stages call. Runs alternate (plain, Ray, plain, Ray, ...) so that noise
on a shared machine falls on both.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import ray

from pipeline.colorize import (
    ColorizeConfig,
    Progress,
    colorizer_pool_size,
    run_colorize,
    with_output_paths,
)
from pipeline.listing import list_images
from pipeline.model_store import load_model
from pipeline.stages import Colorizer, StageOptions, finalize_one, prepare_one


@dataclass(frozen=True)
class PipelineBench:
    images: int
    plain_images_per_s: list[float]
    ray_images_per_s: list[float]  # whole run: listing, actor start-up and the last block
    # From the first arriving block to the last: the rate a long run settles at, without the
    # fixed start-up (Ray Data planning, actor processes importing torch, the model load).
    ray_steady_images_per_s: list[float]
    # The model alone, same batch size and precision: with the pipeline's actor threads, and
    # with every core (as the plain loop runs it).
    forward_images_per_s: float
    forward_all_cores_images_per_s: float
    actor_cpus: int
    actors: int  # colorizer actors the Ray runs used
    precision: str

    @property
    def ratio(self) -> float:
        """Ray over plain, medians of the rounds."""
        return float(np.median(self.ray_images_per_s) / np.median(self.plain_images_per_s))

    @property
    def steady_ratio(self) -> float:
        """Ray's settled rate over plain, medians of the rounds."""
        return float(np.median(self.ray_steady_images_per_s) / np.median(self.plain_images_per_s))

    @property
    def of_model(self) -> float:
        """Ray's settled rate over the model alone on every core: the compute limit."""
        return float(np.median(self.ray_steady_images_per_s) / self.forward_all_cores_images_per_s)


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


def forward_rate(
    model_url: str, *, batch_size: int, precision: str, repeats: int = 5,
    threads: int | None = None,
) -> float:  # fmt: skip
    """Images/s of Colorizer.predict alone; ``threads`` None keeps torch's setting as it is."""
    import torch

    model = load_model(model_url)
    before = torch.get_num_threads()
    colorizer = Colorizer(
        model_url=model_url, expected_sha256=model.sha256, precision=precision, threads=threads
    )
    size = model.config.image_size
    batch = np.random.default_rng(0).uniform(-1, 1, (batch_size, 1, size, size)).astype(np.float32)
    try:
        colorizer.predict(batch)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            colorizer.predict(batch)
        return batch_size * repeats / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)  # the Colorizer sets the process-wide thread count


def bench_pipeline(
    src: str, model_url: str, *, rounds: int, batch_size: int, precision: str, software: str,
    actors: int | None = None, actor_cpus: int = 1,
) -> PipelineBench:  # fmt: skip
    images = len(list_images(src))
    plain: list[float] = []
    ray_rates: list[float] = []
    steady: list[float] = []
    scratch = tempfile.mkdtemp(prefix="chromascan-bench-")
    # One config for every Ray round (each with its own DST), its pool resolved as the run
    # resolves it, so the report names the actors that ran.
    config = ColorizeConfig(src=src, dst="", model=model_url, batch_size=batch_size,
                            precision=precision, actors=actors, actor_cpus=actor_cpus)  # fmt: skip
    pool = colorizer_pool_size(config, ray.cluster_resources(), images)
    config = replace(config, actors=pool)
    try:
        for round_index in range(rounds):
            dst = f"{scratch}/plain-{round_index}"
            started = time.perf_counter()
            plain_loop(src, dst, model_url, batch_size=batch_size, precision=precision,
                       software=software)  # fmt: skip
            plain.append(images / (time.perf_counter() - started))
            shutil.rmtree(dst, ignore_errors=True)
            dst = f"{scratch}/ray-{round_index}"
            arrivals: list[tuple[float, int]] = []
            started = time.perf_counter()
            run_colorize(
                replace(config, dst=dst),
                software=software,
                progress=functools.partial(_note_arrival, arrivals),
            )
            ray_rates.append(images / (time.perf_counter() - started))
            steady.append(_steady_rate(arrivals))
            shutil.rmtree(dst, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return PipelineBench(
        images=images,
        plain_images_per_s=plain,
        ray_images_per_s=ray_rates,
        ray_steady_images_per_s=steady,
        forward_images_per_s=forward_rate(
            model_url, batch_size=batch_size, precision=precision, threads=actor_cpus
        ),
        forward_all_cores_images_per_s=forward_rate(
            model_url, batch_size=batch_size, precision=precision
        ),
        actor_cpus=actor_cpus,
        actors=pool,
        precision=precision,
    )


def _note_arrival(arrivals: list[tuple[float, int]], state: Progress) -> None:
    arrivals.append((time.perf_counter(), state.done))


def _steady_rate(arrivals: list[tuple[float, int]]) -> float:
    """Images/s from the first arriving block to the last (0 when only one block arrived)."""
    if len(arrivals) < 2 or arrivals[-1][0] <= arrivals[0][0]:
        return 0.0
    (first_time, first_done), (last_time, last_done) = arrivals[0], arrivals[-1]
    return (last_done - first_done) / (last_time - first_time)


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
