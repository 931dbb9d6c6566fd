"""Capacity planning: each colorize stage alone on a cluster worker, then the whole pipeline.

    prepare   read + hash + decode to model-size L     (prepare_one, as the Ray CPU tasks)
    model     Colorizer.predict per precision          (as the colorizer actors)
    finalize  full-size merge + PNG encode + write     (finalize_one, as the Ray CPU tasks)
    end to end  run_colorize over the same inputs through Ray Data

A stage's single-worker rate is measured inside one Ray actor, so it is a cluster node's speed
and not the driver's. Its cluster rate is that rate times the workers the pipeline gives the
stage (CPU tasks: one per cluster CPU; the model: one per colorizer actor). On a CPU-only
cluster the stages also share the same cores, so the estimate is further capped by the cluster's
CPUs divided by the CPU-seconds one image costs across all stages.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch and Ray load only when a bench runs, not for `chromascan --help`
    from pipeline.colorize import ColorizeConfig, Progress

BEFORE = "before"  # the finalize stage timed with the writer before pipeline.png
METHOD = (
    "single-worker rate measured in one Ray actor on the cluster; cluster rate = single-worker "
    "rate x workers (prepare, finalize: one per cluster CPU; model: one per colorizer actor); "
    "estimate = min(slowest stage's cluster rate, cluster CPUs / CPU-seconds per image summed "
    "over the stages that run on CPUs)"
)


def parse_size(text: str) -> tuple[int, int]:
    """'6000x4000' (or 6000×4000) -> (6000, 4000); ValueError with the reason otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*[x×X]\s*(\d+)\s*", text)
    if match is None:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x384 or 6000x4000")
    width, height = int(match[1]), int(match[2])
    if width < 1 or height < 1:
        raise ValueError(f"size {text!r}: width and height must both be at least 1")
    return width, height


def write_samples(
    folder: str, count: int, *, width: int, height: int, bits: int, grain: bool = False
) -> None:
    """8-bit: JPEG photos (sample_jpegs); 16-bit or grainy: TIFF scans (make_scan), one copied
    count times.

    Copies are as costly to decode as distinct scans, and generating one 6000×4000 scan
    already takes seconds.
    """
    from jobs.bench import sample_jpegs
    from jobs.bench_scan import make_scan

    if bits == 8 and not grain:
        sample_jpegs(folder, count, size=(width, height))
        return
    os.makedirs(folder, exist_ok=True)
    first = os.path.join(folder, "scan-00000.tif")
    make_scan(first, width, height, bits, grain=grain)
    for index in range(1, count):
        shutil.copyfile(first, os.path.join(folder, f"scan-{index:05d}.tif"))


class StageTimer:
    """Runs as one Ray actor: times each stage over the same inputs, keeping what it made.

    Methods are called in order (prepare, model per precision, finalize) so the driver can
    print progress between them; the prepared rows and ab stay in the actor, not the driver.
    """

    def __init__(self, model_url: str, *, use_gpu: bool, threads: int) -> None:
        import torch

        from pipeline.model_store import load_model
        from pipeline.stages import StageOptions

        model = load_model(model_url)
        self.model_url = model_url
        self.sha256 = model.sha256
        self.use_gpu = use_gpu
        self.threads = threads
        self.scratch = tempfile.mkdtemp(prefix="chromascan-bench-stages-")
        self.options = StageOptions(
            run_id="bench", dst=self.scratch, model_url=model_url, model_id=model.model_id,
            model_sha256=model.sha256, image_size=model.config.image_size, software="bench",
        )  # fmt: skip
        self.prepared: list[dict[str, Any]] = []
        self.ab: np.ndarray | None = None
        # CPU tasks of the pipeline reserve one CPU each; measure them single-threaded too.
        torch.set_num_threads(1)

    def prepare(self, uris: list[str]) -> dict[str, Any]:
        """Seconds to prepare every input (after one untimed warm-up call), the first input's
        width, height and bits (given scans are described by what was decoded), and the first
        failure's message, if any: a bench of partly unreadable inputs would time the wrong work.
        """
        from pipeline.stages import prepare_one

        rows = [
            {"source_uri": uri, "source_size": 0, "output_path": f"{index:05d}.png"}
            for index, uri in enumerate(uris)
        ]
        prepare_one(rows[0], self.options)  # imports and first-call setup are not the rate
        started = time.perf_counter()
        self.prepared = [{**row, **prepare_one(row, self.options)} for row in rows]
        seconds = time.perf_counter() - started
        failed = [row for row in self.prepared if row["status"] != "ok"]
        first = self.prepared[0]
        return {
            "seconds": seconds,
            "width": first["source_width"],
            "height": first["source_height"],
            "bits": first["source_bits"],
            "error": (
                f"{failed[0]['source_uri']}: {failed[0]['error_type']}: "
                f"{failed[0]['error_message']}"
                if failed
                else None
            ),
        }

    def model(self, precision: str, batch_size: int) -> float:
        """Seconds to colour every prepared input in batches at this precision."""
        import torch

        from pipeline.stages import Colorizer

        colorizer = Colorizer(
            model_url=self.model_url, expected_sha256=self.sha256, use_gpu=self.use_gpu,
            precision=precision, threads=self.threads,
        )  # fmt: skip
        l_model = np.stack([row["l_model"] for row in self.prepared])  # (N, 1, S, S)
        colorizer.predict(l_model[:batch_size])  # warm-up: allocator, oneDNN kernels, CUDA
        started = time.perf_counter()
        ab = np.concatenate(
            [
                colorizer.predict(l_model[start : start + batch_size])
                for start in range(0, len(l_model), batch_size)
            ]
        )  # (N, 2, S, S)
        seconds = time.perf_counter() - started
        self.ab = ab
        torch.set_num_threads(1)  # back to a CPU task's single thread for finalize
        return seconds

    def finalize(self, encoder: str = "isal", *, last: bool = True) -> dict[str, Any]:
        """Seconds to finalize every input with the last model stage's ab; first failure.

        ``encoder``: "reference" times the merge and PNG writers before pipeline.png (the
        bench's "before"). ``last`` removes the outputs afterwards.
        """
        from pipeline.stages import finalize_one

        assert self.ab is not None, "the model stage runs before finalize"
        options = replace(self.options, png_encoder=encoder)
        finalize_one(self.prepared[0], self.ab[0], options)  # warm-up, as for prepare
        started = time.perf_counter()
        results = [
            finalize_one(row, self.ab[index], options) for index, row in enumerate(self.prepared)
        ]
        seconds = time.perf_counter() - started
        if last:
            shutil.rmtree(self.scratch, ignore_errors=True)
        failed = [result for result in results if result["status"] != "ok"]
        return {"seconds": seconds, "error": failed[0]["error_message"] if failed else None}


@dataclass(frozen=True)
class StageRate:
    stage: str  # prepare, model or finalize
    precision: str | None  # model stage only
    images: int
    seconds: float  # single worker, all images
    workers: int  # how many the pipeline runs side by side on this cluster
    cpus_per_worker: float  # CPUs one worker keeps busy (0: the model on a GPU)

    @property
    def single_worker_images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def cluster_images_per_s(self) -> float:
        return self.single_worker_images_per_s * self.workers

    @property
    def cpu_s_per_image(self) -> float:
        return self.cpus_per_worker * self.seconds / self.images

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "single_worker_images_per_s": self.single_worker_images_per_s,
            "cluster_images_per_s": self.cluster_images_per_s,
            "cpu_s_per_image": self.cpu_s_per_image,
        }


@dataclass(frozen=True)
class EndToEnd:
    precision: str
    images: int
    seconds: float  # the whole run_colorize call: Ray Data start-up and model loads included
    # From the first output to the last (None: one block): start-up left out, an upper bound.
    steady_images_per_s: float | None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


@dataclass(frozen=True)
class BenchReport:
    width: int
    height: int
    bits: int
    images: int
    cluster_cpus: float
    cluster_gpus: float
    actors: int
    batch_size: int
    stages: list[StageRate]
    end_to_end: EndToEnd
    scans: int
    method: str = METHOD
    notes: list[str] = field(default_factory=list)

    def _for_run(self, *, before: bool = False) -> list[StageRate]:
        """The stage rates for the precision the end-to-end run used (``before``: with the
        finalize writer before pipeline.png, for the side-by-side projection)."""
        return [
            s
            for s in self.stages
            if (s.stage != "model" or s.precision == self.end_to_end.precision)
            and (s.stage != "finalize" or (s.precision == BEFORE) == before)
        ]

    def _cpu_bound(self, stages: list[StageRate]) -> float:
        cpu_s = sum(s.cpu_s_per_image for s in stages)
        return self.cluster_cpus / cpu_s if cpu_s > 0 else float("inf")

    def _estimate(self, stages: list[StageRate]) -> float:
        return min(*(s.cluster_images_per_s for s in stages), self._cpu_bound(stages))

    @property
    def estimate_before_images_per_s(self) -> float | None:
        """The stage estimate with the earlier finalize, when it was timed."""
        stages = self._for_run(before=True)
        if not any(s.stage == "finalize" for s in stages):
            return None
        return self._estimate(stages)

    @property
    def bottleneck(self) -> StageRate:
        return min(self._for_run(), key=lambda s: s.cluster_images_per_s)

    @property
    def cpu_bound_images_per_s(self) -> float:
        return self._cpu_bound(self._for_run())

    @property
    def estimate_images_per_s(self) -> float:
        return self._estimate(self._for_run())

    def hours(self, images_per_s: float) -> float:
        return self.scans / images_per_s / 3600

    def as_dict(self) -> dict[str, Any]:
        e2e = self.end_to_end
        e2e_rate = e2e.steady_images_per_s or e2e.images_per_s
        return {
            "size": {"width": self.width, "height": self.height, "bits": self.bits},
            "images": self.images,
            "cluster": {"cpus": self.cluster_cpus, "gpus": self.cluster_gpus},
            "actors": self.actors,
            "batch_size": self.batch_size,
            "stages": [s.as_dict() for s in self.stages],
            "bottleneck": {
                "stage": self.bottleneck.stage,
                "precision": self.bottleneck.precision,
                "cluster_images_per_s": self.bottleneck.cluster_images_per_s,
            },
            "cpu_bound_images_per_s": self.cpu_bound_images_per_s,
            "estimate_images_per_s": self.estimate_images_per_s,
            "end_to_end": {**asdict(e2e), "images_per_s": e2e.images_per_s},
            "projection": {
                "scans": self.scans,
                "width": self.width,
                "height": self.height,
                "hours_at_end_to_end": self.hours(e2e_rate),
                "hours_at_estimate": self.hours(self.estimate_images_per_s),
                "hours_at_estimate_before": (
                    self.hours(before) if (before := self.estimate_before_images_per_s) else None
                ),
            },
            "method": self.method,
            "notes": self.notes,
        }


def _steady_rate(samples: Sequence[tuple[float, int]]) -> float | None:
    """Images/s from the first arriving output to the last: start-up (actor model load, Ray
    Data planning), which a run of millions of scans pays once, is left out. An upper bound
    on the steady rate: work finished before the first output arrived counts in the rate."""
    if len(samples) < 2:
        return None
    (first_s, first_done), (last_s, last_done) = samples[0], samples[-1]
    if last_s <= first_s or last_done <= first_done:
        return None
    return (last_done - first_done) / (last_s - first_s)


def _end_to_end(
    config: ColorizeConfig, *, software: str, progress: Callable[[str], None]
) -> EndToEnd:
    """One run_colorize over config.src (into a temp folder when config.dst is empty)."""
    from pipeline.colorize import ColorizeError, run_colorize

    samples: list[tuple[float, int]] = []
    last_print = [0.0]

    def on_progress(state: Progress) -> None:
        samples.append((state.elapsed_s, state.done))
        if state.elapsed_s - last_print[0] >= 5 or state.done == state.total:
            last_print[0] = state.elapsed_s
            progress(f"end to end: {state.done}/{state.total} in {state.elapsed_s:.1f} s")

    scratch = None if config.dst else tempfile.mkdtemp(prefix="chromascan-bench-e2e-")
    if scratch:
        config = replace(config, dst=f"{scratch}/out")
    try:
        summary = run_colorize(config, software=software, progress=on_progress)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if summary.failed:
        raise ColorizeError(f"end-to-end run failed {summary.failed} inputs: {summary.error_types}")
    return EndToEnd(config.precision, summary.ok, summary.elapsed_s, _steady_rate(samples))


def _time_stages(
    timer: Any,
    uris: list[str],
    *,
    precisions: Sequence[str],
    batch_size: int,
    task_workers: int,
    actors: int,
    model_cpus: float,
    before: bool,
    progress: Callable[[str], None],
) -> tuple[list[StageRate], tuple[int, int, int]]:
    """Every stage on the StageTimer actor, in order; the rates and the first input's size."""
    import ray

    from pipeline.colorize import ColorizeError

    count = len(uris)
    progress(f"prepare: {count} images on one worker ...")
    prepared = ray.get(timer.prepare.remote(uris))
    if prepared["error"]:
        raise ColorizeError(f"cannot bench on inputs that fail: {prepared['error']}")
    stages = [StageRate("prepare", None, count, prepared["seconds"], task_workers, 1.0)]
    progress(f"prepare: {stages[-1].single_worker_images_per_s:.2f} images/s")
    for precision in precisions:
        progress(f"model {precision}: batch {batch_size} ...")
        seconds = ray.get(timer.model.remote(precision, batch_size))
        stages.append(StageRate("model", precision, count, seconds, actors, model_cpus))
        progress(f"model {precision}: {stages[-1].single_worker_images_per_s:.2f} images/s")
    runs = [(BEFORE, "reference"), (None, "isal")] if before else [(None, "isal")]
    for label, encoder in runs:
        name = f"finalize {label}" if label else "finalize"
        progress(f"{name}: ...")
        finalized = ray.get(timer.finalize.remote(encoder, last=label is None))
        if finalized["error"]:
            raise ColorizeError(f"{name} failed: {finalized['error']}")
        stages.append(StageRate("finalize", label, count, finalized["seconds"], task_workers, 1.0))
        progress(f"{name}: {stages[-1].single_worker_images_per_s:.2f} images/s")
    return stages, (prepared["width"], prepared["height"], prepared["bits"])


def bench_run(
    src: str,
    model_url: str,
    *,
    precisions: Sequence[str],
    batch_size: int,
    actors: int | None,
    actor_cpus: int,
    gpu: bool,
    scans: int,
    software: str,
    dst: str | None = None,
    before: bool = True,
    progress: Callable[[str], None] = lambda line: None,
) -> BenchReport:
    """Measure every stage, then the pipeline end to end; Ray must be initialised.

    The size in the report is the first input's (scans of mixed sizes: pass a sample of them).

    ``src`` must be readable from the cluster's nodes (local on a one-node cluster, else a URL).
    The end-to-end run uses the precision whose model stage was fastest.
    """
    import ray

    from pipeline.colorize import ColorizeConfig, ColorizeError, colorizer_actors
    from pipeline.listing import list_images

    uris = list_images(src).column("source_uri").to_pylist()
    if not uris:
        raise ColorizeError(f"{src}: no images found (looked for jpg, png, tif, ...)")
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0))
    gpus = float(resources.get("GPU", 0))
    task_workers = max(1, int(cpus))
    # The end-to-end run's settings; its precision is picked once the model stage is timed.
    config = ColorizeConfig(
        src=src, dst=dst or "", model=model_url, gpu=gpu, actors=actors, batch_size=batch_size,
        actor_cpus=actor_cpus, incremental=False,
    )  # fmt: skip
    # The pool a large run gets on this cluster: what the projection scales the model by.
    actors = colorizer_actors(config, resources)
    timer_class = ray.remote(num_cpus=0 if gpu else actor_cpus, num_gpus=1 if gpu else 0)(
        StageTimer
    )
    timer = timer_class.remote(model_url, use_gpu=gpu, threads=actor_cpus)
    count = len(uris)
    try:
        stages, (width, height, bits) = _time_stages(
            timer, uris, precisions=precisions, batch_size=batch_size, task_workers=task_workers,
            actors=actors, model_cpus=0.0 if gpu else actor_cpus, before=before,
            progress=progress,
        )  # fmt: skip
    finally:
        ray.kill(timer)  # its CPU is the pipeline's now, and a failed bench leaves nothing behind

    fastest = max((s for s in stages if s.stage == "model"), key=lambda s: s.cluster_images_per_s)
    precision = fastest.precision or "fp32"
    progress(f"end to end: {count} images through the Ray pipeline, {precision} ...")
    end_to_end = _end_to_end(
        replace(config, precision=precision), software=software, progress=progress
    )
    notes = []
    if count < 4 * max(1, task_workers):
        notes.append(
            f"{count} images for {task_workers} CPUs: end-to-end is mostly start-up; "
            "use more images for a steadier rate"
        )
    return BenchReport(
        width=width, height=height, bits=bits, images=count, cluster_cpus=cpus,
        cluster_gpus=gpus, actors=actors, batch_size=batch_size, stages=stages,
        end_to_end=end_to_end, scans=scans, notes=notes,
    )  # fmt: skip


def report_lines(report: BenchReport) -> list[str]:
    """The report as the lines the CLI prints: a stage table, end to end, bottleneck, projection."""
    e2e = report.end_to_end
    lines = [
        f"{report.images} scans of {report.width}×{report.height} ({report.bits}-bit), batch "
        f"{report.batch_size}, {report.actors} actor(s); cluster {report.cluster_cpus:g} CPUs, "
        f"{report.cluster_gpus:g} GPUs",
        f"{'stage':<14} {'1 worker/s':>10} {'workers':>7} {'cluster/s':>10} {'CPU s/img':>9}",
    ]
    for stage in report.stages:
        name = f"{stage.stage} {stage.precision}" if stage.precision else stage.stage
        lines.append(
            f"{name:<14} {stage.single_worker_images_per_s:>10.2f} {stage.workers:>7} "
            f"{stage.cluster_images_per_s:>10.2f} {stage.cpu_s_per_image:>9.3f}"
        )
    steady = e2e.steady_images_per_s
    lines.append(
        f"end to end ({e2e.precision}): {e2e.images_per_s:.2f} images/s over {e2e.seconds:.1f} s"
        + (f", {steady:.2f} images/s from the first output to the last" if steady else "")
    )
    bottleneck = report.bottleneck
    name = (
        f"{bottleneck.stage} {bottleneck.precision}" if bottleneck.precision else bottleneck.stage
    )
    lines.append(
        f"bottleneck: {name} at {bottleneck.cluster_images_per_s:.2f} images/s on this cluster; "
        f"CPU-bound {report.cpu_bound_images_per_s:.2f}; estimate "
        f"{report.estimate_images_per_s:.2f} images/s"
    )
    rate = steady or e2e.images_per_s
    lines.append(
        f"projection: {report.scans:,} scans of {report.width}×{report.height} at this rate: "
        f"{report.hours(rate):,.1f} hours on this cluster end to end "
        f"({report.hours(report.estimate_images_per_s):,.1f} hours at the stage estimate)"
    )
    before = report.estimate_before_images_per_s
    # before -> after, whatever order they were timed in
    finalize = sorted(
        (s for s in report.stages if s.stage == "finalize"), key=lambda s: s.precision != BEFORE
    )
    if before:
        lines.append(
            f"before pipeline.png's writer: {report.hours(before):,.1f} hours at the stage "
            f"estimate ({before:.2f} images/s); finalize CPU s/img "
            + " -> ".join(f"{s.cpu_s_per_image:.3f}" for s in finalize)
        )
    lines.append(f"method: {METHOD}")
    lines.extend(f"note: {note}" for note in report.notes)
    return lines
