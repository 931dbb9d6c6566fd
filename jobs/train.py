"""``chromascan train``: train the colouriser on a folder or bucket of colour photos, on Ray Train.

Also a Ray job entrypoint: ``python -m jobs.train SRC --output URI ...`` takes the same
arguments as ``chromascan train``.

Flags are checked and the photos listed before Ray starts, so a typo, an empty folder or an
unreachable bucket costs a second, not a cluster start. Progress goes to stderr; the summary
(where the model is, its metrics) to stdout.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from models.config import DEFAULT_MODEL_NAME

MAX_DEPTH = 8  # the reference U-Net's depth; deeper adds nothing at 256²
MIN_DEFAULT_DEPTH = 5  # shallower U-Nets see too little context to colour anything
_SKIPPED_SHOWN = 20  # skipped photos listed on the terminal; train.json has them all


def default_depth(image_size: int) -> int:
    """The deepest U-Net (at most 8) whose innermost feature map is still whole: 8 at 256²."""
    depth = 0
    while depth < MAX_DEPTH and image_size % 2 ** (depth + 1) == 0:
        depth += 1
    return depth


class ProgressPrinter:
    """Turns the workers' progress events into lines on stderr."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "initial":
            self.echo(
                f"start    untrained generator: validation L1 {event['val_l1']:.4f}, "
                f"PSNR {event['val_psnr']:.2f} dB"
            )
        elif kind == "resumed":
            self.echo(
                f"resume   continuing after epoch {event['epoch']}, step {event['step']} "
                f"({event['world_size']} workers)"
            )
        elif kind == "step":
            self.echo(
                f"epoch {event['epoch']} step {event['step']}: G {event['g_loss']:.3f} "
                f"(adversarial {event['g_adv_loss']:.3f}, L1 {event['g_l1_loss']:.4f}) "
                f"D {event['d_loss']:.3f}"
            )
        elif kind == "epoch":
            self.echo(
                f"epoch {event['epoch']}/{event['epochs']} step {event['step']}: "
                f"G {event['g_loss']:.3f} D {event['d_loss']:.3f} | validation "
                f"L1 {event['val_l1']:.4f} (untrained {event['val_l1_initial']:.4f}) "
                f"PSNR {event['val_psnr']:.2f} dB colourfulness {event['val_colorfulness']:.1f} "
                f"(photos {event['val_colorfulness_target']:.1f}) | "
                f"{event['images_per_second']:.2f} images/s, {event['epoch_seconds']:.1f} s"
            )


def _echo_err(line: str) -> None:
    typer.echo(line, err=True)


def train_command(
    src: Annotated[
        str,
        typer.Argument(help="Folder or URL of colour photos (s3://bucket/prefix), recursive."),
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="Folder or URL for checkpoints/, model/ and train.json. "
            "Running again with the same output continues that run.",
        ),
    ],
    workers: Annotated[int, typer.Option(min=1, help="Data-parallel Ray Train workers.")] = 1,
    gpu: Annotated[bool, typer.Option(help="One GPU per worker.")] = False,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs in total, decay included.")] = 200,
    decay_epochs: Annotated[
        int | None,
        typer.Option(min=0, help="The last N epochs decay the LR to zero; default: half."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Photos per step per worker.")] = 1,
    image_size: Annotated[
        int, typer.Option(min=4, help="Model input side; photos load at 286/256 of it.")
    ] = 256,
    width: Annotated[int, typer.Option(min=1, help="Channels of the first U-Net block.")] = 64,
    depth: Annotated[
        int | None, typer.Option(min=2, help="U-Net down blocks; default: 8, or fewer if small.")
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(help="Share of SRC held out for validation (default 0.1)."),
    ] = None,
    val: Annotated[
        str | None, typer.Option("--val", help="Separate folder or URL of validation photos.")
    ] = None,
    bf16: Annotated[
        bool, typer.Option(help="bfloat16 autocast where the device computes it natively.")
    ] = True,
    lr: Annotated[float, typer.Option(help="Adam learning rate, both networks.")] = 2e-4,
    max_failures: Annotated[
        int, typer.Option(min=0, help="Restarts from the latest checkpoint after a failure.")
    ] = 2,
    keep_checkpoints: Annotated[
        int, typer.Option(min=1, help="Checkpoints kept (the latest always is).")
    ] = 3,
    export: Annotated[
        str, typer.Option(help="Checkpoint to export: latest, or best (lowest val L1).")
    ] = "latest",
    name: Annotated[
        str, typer.Option(help="Model name, the first half of the model id.")
    ] = DEFAULT_MODEL_NAME,
    seed: Annotated[int, typer.Option(help="Initial weights, RNG streams, held-out split.")] = 0,
    cpus_per_worker: Annotated[
        int, typer.Option(min=1, help="CPUs (torch threads) per CPU worker.")
    ] = 1,
    min_colorfulness: Annotated[
        float, typer.Option(min=0.0, help="Photos less colourful than this count as grey.")
    ] = 5.0,
) -> None:
    """Train the pix2pix colouriser on colour photos; export a model artifact to OUTPUT/model."""
    from models.artifact import validate_model_name
    from models.config import DiscriminatorConfig, GeneratorConfig
    from pipeline.train_data import DEFAULT_VAL_FRACTION, list_training_photos
    from pipeline.training import EXPORT_CHOICES, TrainConfig

    # 1. Flags, all before any I/O.
    if val is not None and val_fraction is not None:
        raise typer.BadParameter(
            "give either --val or --val-fraction, not both", param_hint="'--val-fraction'"
        )
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    if val is None and not 0.0 < fraction < 1.0:
        raise typer.BadParameter(
            f"{fraction:g} is not between 0 and 1 (exclusive)", param_hint="'--val-fraction'"
        )
    if export not in EXPORT_CHOICES:
        raise typer.BadParameter(
            f"{export!r} is not one of {', '.join(EXPORT_CHOICES)}", param_hint="'--export'"
        )
    if not (lr > 0 and math.isfinite(lr)):
        raise typer.BadParameter(f"{lr:g} is not a positive number", param_hint="'--lr'")
    try:
        validate_model_name(name)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="'--name'") from err
    if depth is None:
        depth = default_depth(image_size)
        if depth < MIN_DEFAULT_DEPTH:
            raise typer.BadParameter(
                f"{image_size} allows a U-Net of depth {depth} only (the side must be a multiple "
                f"of 2**depth); use a multiple of {2**MIN_DEFAULT_DEPTH} such as 64, 128 or 256, "
                "or set --depth",
                param_hint="'--image-size'",
            )
    try:
        config = TrainConfig(
            generator=GeneratorConfig.sized(width=width, depth=depth, image_size=image_size),
            discriminator=DiscriminatorConfig(width=width),
            epochs=epochs,
            decay_epochs=decay_epochs,
            batch_size=batch_size,
            lr=lr,
            bf16=bf16,
            seed=seed,
        )
    except ValueError as err:  # TrainingConfigError and the network configs
        raise typer.BadParameter(str(err)) from err

    # 2. The photos: listed and split on this machine, before Ray starts.
    listing = list_training_photos(
        src,
        val_url=val,
        val_fraction=fraction,
        seed=seed,
        min_train_images=workers * batch_size,
    )
    run_train_job(
        listing,
        config,
        output=output,
        workers=workers,
        gpu=gpu,
        cpus_per_worker=cpus_per_worker,
        max_failures=max_failures,
        keep_checkpoints=keep_checkpoints,
        export=export,
        name=name,
        min_colorfulness=min_colorfulness,
        address=None,  # --address is the generic job option (jobs/submit.py)
    )


def _warn_if_short_of_resources(
    workers: int, *, gpu: bool, cpus_per_worker: int, note: Callable[[str], None]
) -> None:
    """Say so when the cluster cannot place the workers now: Ray Train would wait silently.

    Only a note, not an error: an autoscaling cluster adds nodes (GPU ones from zero) when
    the workers ask for them.
    """
    import ray

    have = ray.cluster_resources()
    needs = {"CPU": float(workers * cpus_per_worker)}
    if gpu:
        needs["GPU"] = float(workers)
    short = [
        f"{need:g} {name} (it has {have.get(name, 0.0):g})"
        for name, need in needs.items()
        if have.get(name, 0.0) < need
    ]
    if short:
        note(
            f"waiting  the workers need {' and '.join(short)}; training starts when the "
            "cluster has them (an autoscaler may add nodes)"
        )


def run_train_job(
    listing: Any,
    config: Any,
    *,
    output: str,
    workers: int,
    gpu: bool,
    cpus_per_worker: int,
    max_failures: int,
    keep_checkpoints: int,
    export: str,
    name: str,
    min_colorfulness: float,
    address: str | None,
    echo: Callable[[str], None] = typer.echo,
    progress: Callable[[str], None] = _echo_err,
) -> Any:
    """Prepare the photos and train on Ray; print progress and a summary. Returns the outcome.

    Args:
        listing: a pipeline.train_data.PhotoListing.
        config: a pipeline.training.TrainConfig.
        echo: where the summary goes (stdout); progress: where progress lines go (stderr).
    """
    from jobs.runtime import ensure_ray
    from pipeline.storage import join
    from pipeline.train_data import PREPARED_FOLDER, STATUS_FAILED, prepare_training_data
    from pipeline.training import run_training

    # 3. Decode the photos once, on the cluster, into OUTPUT/data (a rerun finds them there).
    ensure_ray(address)
    # The skipped photos are printed below; the library's own warnings would repeat them.
    logging.getLogger("pipeline.train_data").setLevel(logging.ERROR)
    progress(
        f"data     {listing.train.num_rows + listing.val.num_rows} images listed under "
        f"{listing.source_url}; decoding at {config.image_size}² (+ crop margin)"
    )
    data = prepare_training_data(
        listing,
        image_size=config.image_size,
        prepared_url=join(output, PREPARED_FOLDER),
        min_colorfulness=min_colorfulness,
        min_train_images=workers * config.batch_size,
        seed=config.seed,
    )
    held_out = (
        f"from {data.val_url}" if data.val_url else f"held out ({data.val_fraction:g} of SRC)"
    )
    progress(
        f"data     {data.train_images} training photos, {data.val_images} validation {held_out}; "
        f"skipped {data.grey} grey, {data.failed} unreadable ({data.prepare_seconds:.1f} s"
        f"{', decoded copy reused' if data.reused else ''})"
    )
    failed = [photo for photo in data.skipped if photo.status == STATUS_FAILED]
    for photo in failed[:_SKIPPED_SHOWN]:
        progress(f"skipped  {photo.source_uri}: {photo.message} ({photo.error_type})")
    if len(failed) > _SKIPPED_SHOWN:
        progress(f"skipped  ... and {len(failed) - _SKIPPED_SHOWN} more (see train.json)")
    device = f"{workers} GPU worker(s)" if gpu else f"{workers} CPU worker(s)"
    _warn_if_short_of_resources(workers, gpu=gpu, cpus_per_worker=cpus_per_worker, note=progress)
    progress(
        f"train    U-Net width {config.generator.width}, depth {config.generator.depth}, "
        f"{config.image_size}²; {config.epochs} epochs, batch {config.batch_size} per worker, "
        f"{device}"
    )

    # 4. Train (continuing OUTPUT's run if there is one), then export.
    outcome = run_training(
        data,
        config,
        output_url=output,
        workers=workers,
        use_gpu=gpu,
        cpus_per_worker=cpus_per_worker,
        max_failures=max_failures,
        keep_checkpoints=keep_checkpoints,
        export=export,
        model_name=name,
        on_progress=ProgressPrinter(progress),
    )

    # 5. The summary.
    metrics = outcome.metrics
    echo(
        f"model    {outcome.model_id} ({outcome.selected} checkpoint, {outcome.checkpoint}) "
        f"-> {outcome.model_url}"
    )
    echo(
        f"metrics  validation L1 {metrics['val_l1']:.4f} (untrained "
        f"{metrics['val_l1_initial']:.4f}), PSNR {metrics['val_psnr']:.2f} dB, colourfulness "
        f"{metrics['val_colorfulness']:.1f} (photos {metrics['val_colorfulness_target']:.1f}); "
        f"G {metrics['g_loss']:.3f}, D {metrics['d_loss']:.3f}"
    )
    resumed = outcome.resumed_from
    continued = f"; continued after epoch {resumed['epoch']}" if resumed else ""
    echo(
        f"trained  {metrics['epoch']} epochs, {metrics['step']} steps, "
        f"{metrics['images_seen']} images; this run {outcome.elapsed_s:.1f} s{continued}"
    )
    echo(f"summary  {outcome.summary_url}")
    sys.stdout.flush()
    return outcome


if __name__ == "__main__":
    from jobs.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
