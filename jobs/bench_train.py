"""``chromascan bench train``: Ray Train's images/s per worker beside a plain PyTorch loop.

Both sides train the same model (``pipeline.training.Pix2Pix``) on the same prepared photos
(the decoded shards ``prepare_training_data`` writes), with the same crop, flip and Lab
conversion, the same batch size and the same torch threads per worker; what differs is only
what Ray adds: the streamed ingest, DDP wrapping, reporting. The rounds alternate (plain,
Ray, plain, Ray, ...) so that a slow moment of a shared machine hits both sides.

Each Ray round also reports the object store's peak use and the bytes Ray spilled to disk
while it ran, as Ray's raylets count them (the figures of ``ray memory --stats-only``).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import typer

_POLL_S = 0.2


@dataclass(frozen=True)
class StoreFigures:
    """The object store while something ran: its peak use and what was spilled to disk."""

    capacity_bytes: int
    peak_bytes: int  # highest object_store_bytes_used seen, polled every _POLL_S
    spilled_bytes: int  # spilled_bytes_total at the end minus at the start
    restored_bytes: int
    created_bytes: int  # bytes put into the store meanwhile (all objects, all nodes)


def store_stats() -> Any:
    """Ray's aggregate object store stats (a protobuf ObjectStoreStats), all nodes together.

    Ray has no public API for these figures; ``ray memory --stats-only`` prints them from
    this same call.
    """
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    # This driver's cluster by its GCS address: other Ray clusters may run on the machine.
    address = ray.get_runtime_context().gcs_address
    return get_memory_info_reply(get_state_from_address(address)).store_stats


class StoreWatch:
    """Polls the object store's use in a thread; the figures once the block is left."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start: Any = None
        self.peak = 0
        self.figures: StoreFigures | None = None

    def _run(self) -> None:
        while not self._stop.wait(_POLL_S):
            self.peak = max(self.peak, int(store_stats().object_store_bytes_used))

    def __enter__(self) -> StoreWatch:
        self._start = store_stats()
        self.peak = int(self._start.object_store_bytes_used)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        end = store_stats()
        start = self._start
        self.figures = StoreFigures(
            capacity_bytes=int(end.object_store_bytes_avail),
            peak_bytes=max(self.peak, int(end.object_store_bytes_used)),
            spilled_bytes=int(end.spilled_bytes_total - start.spilled_bytes_total),
            restored_bytes=int(end.restored_bytes_total - start.restored_bytes_total),
            created_bytes=int(end.cumulative_created_bytes - start.cumulative_created_bytes),
        )


def write_colour_photos(
    folder: str, count: int, *, size: tuple[int, int] = (400, 300), seed: int = 0
) -> None:
    """Write ``count`` colour JPEG photos of ``size``: random crops of scikit-image's samples."""
    from jobs.bench import sample_crops

    os.makedirs(folder, exist_ok=True)
    for index, crop in enumerate(sample_crops(count, size=size, seed=seed)):
        crop.save(os.path.join(folder, f"photo-{index:06d}.jpg"), quality=90)


def plain_epoch(data: Any, config: Any, *, threads: int, steps: int | None = None) -> float:
    """One single-process epoch over the prepared training photos; images/s.

    No Ray: the shards are read with pyarrow in this process, shuffled the same way (shard
    order, then a local buffer), and fed to the same model, crop, flip and Lab conversion.
    ``steps`` stops early, so the plain loop can take as many steps as a Ray worker does.
    """
    import torch

    from pipeline.train_data import random_crop_flip, read_shard_batch, to_model_lab
    from pipeline.training import Pix2Pix

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = Pix2Pix(config, "cpu")
    shards = list(data.shard_uris)
    rng = np.random.default_rng(config.seed)
    rng.shuffle(shards)
    taken, started = 0, time.perf_counter()
    buffer: list[np.ndarray] = []
    for uri in shards:
        rows = read_shard_batch(
            {"shard_uri": np.array([uri], dtype=object)},
            size=data.load_size,
            columns=("rgb",),
            storage_options=None,
        )["rgb"]
        buffer.extend(rows)
        rng.shuffle(buffer)  # type: ignore[arg-type]
        while len(buffer) >= config.batch_size:
            batch = np.stack([buffer.pop() for _ in range(config.batch_size)])
            rgb = random_crop_flip(torch.from_numpy(batch), size=config.image_size)
            model.train_step(*to_model_lab(rgb))
            taken += 1
            if steps is not None and taken >= steps:
                return taken * config.batch_size / (time.perf_counter() - started)
    return taken * config.batch_size / max(time.perf_counter() - started, 1e-9)


@dataclass(frozen=True)
class TrainBench:
    """One bench: the figures of every round, at one batch size."""

    batch_size: int
    workers: int
    threads: int
    steps_per_worker: int
    plain_images_per_s: list[float] = field(default_factory=list)
    ray_images_per_s: list[float] = field(default_factory=list)  # per worker
    ray_store: list[StoreFigures] = field(default_factory=list)
    materialized_images_per_s: list[float] = field(default_factory=list)  # per worker
    materialized_store: list[StoreFigures] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Ray per worker / plain, medians of the rounds."""
        return statistics.median(self.ray_images_per_s) / statistics.median(self.plain_images_per_s)

    @property
    def materialized_ratio(self) -> float | None:
        """Streamed / materialised per worker, medians; None when not measured."""
        if not self.materialized_images_per_s:
            return None
        return statistics.median(self.ray_images_per_s) / statistics.median(
            self.materialized_images_per_s
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "ratio": self.ratio,
            "materialized_ratio": self.materialized_ratio,
        }


def _ray_epoch(data: Any, config: Any, *, workers: int, threads: int, scratch: str) -> float:
    """One Ray Train epoch into a fresh output; the workers' images/s each."""
    from pipeline.training import run_training

    output = tempfile.mkdtemp(prefix="run-", dir=scratch)
    outcome = run_training(
        data,
        config,
        output_url=output,
        workers=workers,
        cpus_per_worker=threads,
        max_failures=0,
        keep_checkpoints=1,
    )
    return float(outcome.metrics["images_per_second"]) / workers


def bench_train(
    data: Any,
    config: Any,
    *,
    workers: int,
    threads: int,
    rounds: int,
    materialized: bool,
    scratch: str,
    progress: Callable[[str], None] = lambda line: None,
) -> TrainBench:
    """Alternate plain and Ray epochs over ``data`` (a prepared TrainingData) at one config."""
    steps = data.train_images // workers // config.batch_size
    bench = TrainBench(
        batch_size=config.batch_size, workers=workers, threads=threads, steps_per_worker=steps
    )
    one_epoch = dataclasses.replace(config, epochs=1, decay_epochs=0)

    def ray_epoch(prepared: Any) -> float:
        return _ray_epoch(prepared, one_epoch, workers=workers, threads=threads, scratch=scratch)

    for index in range(rounds):
        where = f"round {index + 1}/{rounds}, batch {config.batch_size}"
        progress(f"{where}: plain loop ...")
        bench.plain_images_per_s.append(plain_epoch(data, one_epoch, threads=threads, steps=steps))
        progress(f"{where}: Ray Train, streamed ...")
        with StoreWatch() as watch:
            rate = ray_epoch(data)
        bench.ray_images_per_s.append(rate)
        bench.ray_store.append(watch.figures)  # type: ignore[arg-type]
        if materialized:
            progress(f"{where}: Ray Train, materialised ...")
            with StoreWatch() as watch:
                # The pre-streaming ingest: every usable photo held in the object store.
                held = dataclasses.replace(data, train=data.train.materialize())
                rate = ray_epoch(held)
                del held
            bench.materialized_images_per_s.append(rate)
            bench.materialized_store.append(watch.figures)  # type: ignore[arg-type]
    # As each batch size finishes: a long bench still leaves figures if it is stopped.
    progress(f"batch {config.batch_size} done: {bench.as_dict()}")
    return bench


def bench_train_command(
    images: Annotated[int, typer.Option(min=2, help="Generated 400×300 colour JPEGs.")] = 64,
    src: Annotated[
        str | None, typer.Option(help="Train on these photos instead of generated ones.")
    ] = None,
    image_size: Annotated[int, typer.Option(min=32, help="Model input side.")] = 256,
    width: Annotated[int, typer.Option(min=1, help="Channels of the first U-Net block.")] = 64,
    depth: Annotated[
        int | None, typer.Option(min=2, help="U-Net down blocks; default: as train picks.")
    ] = None,
    batch_size: Annotated[
        list[int] | None,
        typer.Option("--batch-size", "-b", min=1, help="Per worker; repeatable (default 1, 4)."),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers.")] = 1,
    cpus_per_worker: Annotated[
        int, typer.Option(min=1, help="torch threads per worker, and of the plain loop.")
    ] = 1,
    rounds: Annotated[int, typer.Option(min=1, help="Alternating plain/Ray rounds.")] = 1,
    materialized: Annotated[
        bool,
        typer.Option(help="Also a Ray epoch over the photos held in the object store."),
    ] = False,
    object_store_mb: Annotated[
        int | None,
        typer.Option(
            min=80, help="Start a local cluster with this object store (MiB); RAY_ADDRESS unset."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Training images/s per Ray Train worker beside a plain PyTorch loop, same model and data."""
    import json
    import logging

    from jobs.runtime import ensure_ray
    from jobs.train import default_depth
    from models.config import DiscriminatorConfig, GeneratorConfig
    from pipeline.train_data import build_training_data
    from pipeline.training import TrainConfig

    sizes = batch_size or [1, 4]
    depth = depth or default_depth(image_size)
    if image_size % 2**depth:
        raise typer.BadParameter(
            f"{image_size} is not a multiple of 2**{depth}", param_hint="'--image-size'"
        )
    if object_store_mb is not None and os.environ.get("RAY_ADDRESS"):
        raise typer.BadParameter(
            "starts a local cluster of its own; unset RAY_ADDRESS", param_hint="'--object-store-mb'"
        )

    def progress(line: str) -> None:
        typer.echo(f"bench: {line}", err=True)

    with tempfile.TemporaryDirectory(prefix="chromascan-bench-") as scratch:
        if src is None:
            src = f"{scratch}/photos"
            progress(f"writing {images} sample colour photos (400×300 JPEG) ...")
            write_colour_photos(src, images)
        if object_store_mb is not None:
            import ray

            ray.init(
                object_store_memory=object_store_mb * 1024 * 1024,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        ensure_ray()
        logging.getLogger("pipeline.train_data").setLevel(logging.ERROR)
        progress("decoding the photos into shards ...")
        with StoreWatch() as preparing:
            data = build_training_data(
                src,
                image_size=image_size,
                prepared_url=f"{scratch}/data",
                min_train_images=workers * max(sizes),
            )
        results = []
        for size in sizes:
            config = TrainConfig(
                generator=GeneratorConfig.sized(width=width, depth=depth, image_size=image_size),
                discriminator=DiscriminatorConfig(width=width),
                batch_size=size,
            )
            results.append(
                bench_train(
                    data, config, workers=workers, threads=cpus_per_worker, rounds=rounds,
                    materialized=materialized, scratch=scratch, progress=progress,
                )
            )  # fmt: skip
    prepared = preparing.figures
    if as_json:
        figures = {
            "train_images": data.train_images,
            "image_size": image_size,
            "width": width,
            "depth": depth,
            "preparing_store": dataclasses.asdict(prepared) if prepared else None,
            "benches": [bench.as_dict() for bench in results],
        }
        typer.echo(json.dumps(figures, indent=2))
        return
    mib = 1024 * 1024
    typer.echo(
        f"{data.train_images} training photos, {image_size}², U-Net width {width} depth {depth}; "
        f"{workers} worker(s) × {cpus_per_worker} thread(s) vs a plain loop of "
        f"{cpus_per_worker} thread(s); medians of {rounds} round(s)"
    )
    if prepared is not None:
        typer.echo(
            f"decode once: object store peak {prepared.peak_bytes / mib:.0f} MiB of "
            f"{prepared.capacity_bytes / mib:.0f}, spilled {prepared.spilled_bytes / mib:.0f} MiB"
        )
    header = f"{'batch':>5} {'plain img/s':>11} {'ray img/s/worker':>16} {'ray/plain':>9}"
    if materialized:
        header += f" {'materialised':>12} {'streamed/mat':>12}"
    typer.echo(header + f" {'store peak MiB':>14} {'spilled MiB':>11}")
    for bench in results:
        line = (
            f"{bench.batch_size:>5} {statistics.median(bench.plain_images_per_s):>11.2f} "
            f"{statistics.median(bench.ray_images_per_s):>16.2f} {bench.ratio:>8.2f}×"
        )
        if materialized:
            line += (
                f" {statistics.median(bench.materialized_images_per_s):>12.2f} "
                f"{bench.materialized_ratio or 0.0:>11.2f}×"
            )
        peak = max(figures.peak_bytes for figures in bench.ray_store)
        spilled = sum(figures.spilled_bytes for figures in bench.ray_store)
        typer.echo(line + f" {peak / mib:>14.0f} {spilled / mib:>11.0f}")
