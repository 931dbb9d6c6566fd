"""The ``chromascan`` command: the only place that parses user input, prints and exits."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer

from jobs.bench_manifest import bench_manifest_command
from jobs.bench_train import bench_train_command
from jobs.colorize import colorize_command, nightly_command
from jobs.errors import is_user_error, own_error
from jobs.jobs_cli import jobs_app
from jobs.manifest_cli import manifest_app
from jobs.review_cli import review_command
from jobs.train import train_command

app = typer.Typer(
    name="chromascan",
    help="Colourise black-and-white photo archives at scale on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Create and inspect model artifacts.", no_args_is_help=True)
app.add_typer(model_app, name="model")
bench_app = typer.Typer(help="Measure speed, side by side, on this machine.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(jobs_app, name="jobs")
app.add_typer(manifest_app, name="manifest")
credentials_app = typer.Typer(help="C2PA signing credentials.", no_args_is_help=True)
app.add_typer(credentials_app, name="credentials")


def package_version() -> str:
    try:
        return version("chromascan")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"chromascan {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Colourise black-and-white photo archives at scale on Ray."""


@model_app.command("init")
def model_init(
    destination: Annotated[str, typer.Argument(help="Folder or URL (s3://bucket/prefix).")],
    name: Annotated[str, typer.Option(help="Model name, the first half of the model id.")] = (
        "chromascan-init"
    ),
    width: Annotated[int, typer.Option(min=1, help="Channels of the first U-Net block.")] = 64,
    depth: Annotated[int, typer.Option(min=2, help="Down blocks of the U-Net.")] = 8,
    image_size: Annotated[int, typer.Option(min=4, help="Model input side in pixels.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights.")] = 0,
) -> None:
    """Write an initialised, untrained model artifact (for smoke tests and benchmarks)."""
    import torch

    from models.config import GeneratorConfig
    from models.networks import UNetGenerator, init_weights
    from pipeline.model_store import save_model

    try:
        config = GeneratorConfig(width=width, depth=depth, image_size=image_size)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    torch.manual_seed(seed)
    generator = UNetGenerator(config)
    init_weights(generator)
    model_id = save_model(
        generator, destination, name=name, provenance={"trained": False, "seed": seed}
    )
    typer.echo(f"wrote {model_id} (untrained) to {destination}")


@model_app.command("info")
def model_info(
    source: Annotated[str, typer.Argument(help="Folder or URL of a model artifact.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print model.json as JSON.")] = False,
) -> None:
    """Verify a model artifact (hash, format, config) and describe it."""
    from pipeline.model_store import load_model

    loaded = load_model(source)
    if as_json:
        typer.echo(json.dumps(loaded.metadata, indent=2, sort_keys=True))
        return
    config = loaded.config
    typer.echo(f"model      {loaded.model_id}  (verified sha256 {loaded.sha256})")
    typer.echo(f"generator  U-Net width {config.width}, depth {config.depth}, ")
    typer.echo(f"           {loaded.metadata.get('parameters', '?'):,} parameters")
    typer.echo(f"input      {config.image_size}×{config.image_size} L -> ab")
    typer.echo(f"created    {loaded.metadata.get('created_at', '?')}")
    for key, value in sorted(loaded.metadata.get("provenance", {}).items()):
        typer.echo(f"provenance {key}: {value}")


@credentials_app.command("test-pki")
def credentials_test_pki(
    folder: Annotated[str, typer.Argument(help="Where to write chain.pem, key.pem and ca.pem.")],
    signer: Annotated[
        str, typer.Option(help="The signing certificate's common name.")
    ] = "chromascan test signer",
) -> None:
    """Make a private CA and a signing certificate it issued, to try signed runs out.

    Outputs signed with it validate as Trusted only for readers given ca.pem (e.g.
    `manifest verify --trust ca.pem`); publish with a certificate from a real CA.
    """
    from pathlib import Path

    from pipeline.credentials import make_test_pki

    chain, key, ca = make_test_pki(signer).write(Path(folder))
    key.chmod(0o600)
    typer.echo(f"wrote {chain} (leaf, then CA), {key} (private key) and {ca} (the CA to trust)")


def _check_precisions(precisions: list[str], known: Iterable[str]) -> None:
    """A one-line usage error for a precision the bench does not know."""
    names = list(known)
    for name in precisions:
        if name not in names:
            raise typer.BadParameter(
                f"unknown precision {name!r}; choose from {', '.join(names)}",
                param_hint="'--precision'",
            )


@bench_app.command("forward")
def bench_forward(
    source: Annotated[
        str | None, typer.Argument(help="Model artifact; default: the reference architecture.")
    ] = None,
    batch_size: Annotated[
        list[int] | None, typer.Option("--batch-size", "-b", min=1, help="Repeatable.")
    ] = None,
    precision: Annotated[
        list[str] | None, typer.Option("--precision", "-p", help="fp32, bf16 or fp16; repeatable.")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each combination.")] = 5,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
) -> None:
    """Time the generator's forward pass, side by side across batch sizes and precisions."""
    import torch

    from jobs.bench import PRECISIONS, time_forward
    from models.networks import UNetGenerator
    from pipeline.model_store import load_model

    precisions = precision or ["fp32", "bf16"]
    _check_precisions(precisions, PRECISIONS)
    if threads:
        torch.set_num_threads(threads)
    generator = load_model(source).generator if source else UNetGenerator()
    config = generator.config
    typer.echo(
        f"generator width {config.width}, depth {config.depth}, {config.image_size}² input; "
        f"cpu threads {torch.get_num_threads()}; median of {repeats}"
    )
    typer.echo(
        f"{'batch':>5} {'precision':>9} {'s/batch':>9} {'images/s':>9} {'|Δab| vs fp32':>14}"
    )
    for row in time_forward(
        generator, batch_sizes=batch_size or [1, 8], precisions=precisions, repeats=repeats
    ):
        typer.echo(
            f"{row.batch_size:>5} {row.precision:>9} {row.seconds_per_batch:>9.3f} "
            f"{row.images_per_second:>9.2f} {row.mean_abs_ab_diff:>14.4f}"
        )


@bench_app.command("finalize")
def bench_finalize_command(
    size: Annotated[
        list[str] | None,
        typer.Option("--size", help="WIDTHxHEIGHT of the 16-bit grey scan; repeatable."),
    ] = None,
    bits: Annotated[
        list[int] | None,
        typer.Option("--bits", help="Output bits per channel, 8 or 16; repeatable."),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each combination.")] = 3,
    sign: Annotated[
        bool,
        typer.Option(help="Also time each combination signed (C2PA, a throwaway test key)."),
    ] = True,
) -> None:
    """Time finalize (merge + PNG encode + write) per scan size, output depth and signing."""
    import tempfile

    from jobs.bench_finalize import time_finalize
    from jobs.bench_run import parse_size

    output_bits = bits or [8, 16]
    if any(b not in (8, 16) for b in output_bits):
        raise typer.BadParameter("--bits takes 8 or 16")
    try:
        sizes = [parse_size(text) for text in size or ["512x384", "6000x4000"]]
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(f"finalize of a 16-bit grey scan, one thread, median of {repeats}")
    typer.echo(
        f"{'size':>11} {'bits':>4} {'signed':>6} {'s/scan':>8} {'MP/s':>7} {'PNG MB':>8} "
        f"{'vs 8-bit unsigned':>17}"
    )
    with tempfile.TemporaryDirectory(prefix="chromascan-bench-") as folder:
        timings = time_finalize(
            folder, sizes=sizes, output_bits=output_bits, repeats=repeats,
            signing=[False, True] if sign else [False],
        )  # fmt: skip
    base = {(t.width, t.height): t.seconds for t in timings if t.output_bits == 8 and not t.signed}
    for t in timings:
        ratio = t.seconds / base[(t.width, t.height)] if (t.width, t.height) in base else 0
        typer.echo(
            f"{t.width:>5}x{t.height:<5} {t.output_bits:>4} {'yes' if t.signed else 'no':>6} "
            f"{t.seconds:>8.3f} {t.megapixels_per_second:>7.1f} {t.output_bytes / 1e6:>8.3f} "
            + (f"{ratio:>16.2f}×" if ratio else f"{'':>17}")
        )


def _reference_model(scratch: str) -> str:
    """An untrained reference-size artifact: speed does not depend on what the weights learned."""
    from models.networks import UNetGenerator, init_weights
    from pipeline.model_store import save_model

    generator = UNetGenerator()
    init_weights(generator)
    save_model(generator, f"{scratch}/model", name="reference-untrained")
    return f"{scratch}/model"


@bench_app.command("pipeline")
def bench_pipeline_command(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model artifact; default: reference.")
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="Generated 512×384 JPEG scans.")] = 128,
    src: Annotated[
        str | None, typer.Option(help="Use these scans instead of generated ones.")
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Alternating plain/Ray rounds.")] = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="Scans per forward pass.")] = 8,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
    actors: Annotated[
        int | None,
        typer.Option(
            min=1, show_default=False, help="Colorizer actors; default: as colorize picks them."
        ),
    ] = None,
    actor_cpus: Annotated[
        int, typer.Option(min=1, help="CPUs (threads) of each colorizer actor.")
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Ray pipeline vs a plain loop over the same functions, and the model alone."""
    import dataclasses
    import tempfile

    from jobs.bench import sample_jpegs
    from jobs.bench_pipeline import bench_pipeline
    from jobs.runtime import ensure_ray
    from pipeline.colorize import PRECISIONS

    _check_precisions([precision], PRECISIONS)
    with tempfile.TemporaryDirectory(prefix="chromascan-bench-") as scratch:
        model = model or _reference_model(scratch)
        if src is None:
            src = f"{scratch}/scans"
            typer.echo(f"writing {images} sample scans (512×384 JPEG) ...", err=True)
            sample_jpegs(src, images)
        ensure_ray()
        result = bench_pipeline(
            src, model, rounds=rounds, batch_size=batch_size, precision=precision,
            software=f"chromascan {package_version()}", actors=actors, actor_cpus=actor_cpus,
        )  # fmt: skip
    if as_json:
        figures = {
            **dataclasses.asdict(result),
            "ratio": result.ratio,
            "steady_ratio": result.steady_ratio,
            "of_model": result.of_model,
        }
        typer.echo(json.dumps(figures, indent=2))
        return

    def rates(values: list[float]) -> str:
        return ", ".join(f"{value:.2f}" for value in values)

    typer.echo(
        f"{result.images} scans, batch {batch_size}, precision {precision}, "
        f"{result.actors} colorizer actor(s) of {actor_cpus} thread(s)"
    )
    typer.echo(f"plain loop             {rates(result.plain_images_per_s)} images/s")
    typer.echo(f"ray pipeline, whole    {rates(result.ray_images_per_s)} images/s")
    typer.echo(f"ray pipeline, settled  {rates(result.ray_steady_images_per_s)} images/s")
    typer.echo(
        f"model alone            {result.forward_images_per_s:.2f} images/s with "
        f"{actor_cpus} thread(s), {result.forward_all_cores_images_per_s:.2f} on every core"
    )
    typer.echo(
        f"ray / plain            {result.ratio:.2f}× whole run, {result.steady_ratio:.2f}× settled"
    )
    typer.echo(f"settled / model alone  {result.of_model:.2f}× (model alone on every core)")


@bench_app.command("nightly")
def bench_nightly_command(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model artifact; default: reference.")
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="Generated 512×384 JPEG scans.")] = 2000,
) -> None:
    """An unchanged nightly re-run's time as a fraction of the first run's."""
    import tempfile

    from jobs.bench import sample_jpegs
    from jobs.bench_pipeline import bench_nightly
    from jobs.runtime import ensure_ray

    with tempfile.TemporaryDirectory(prefix="chromascan-bench-") as scratch:
        model = model or _reference_model(scratch)
        typer.echo(f"writing {images} sample scans (512×384 JPEG) ...", err=True)
        sample_jpegs(f"{scratch}/scans", images)
        ensure_ray()
        result = bench_nightly(
            f"{scratch}/scans", model, software=f"chromascan {package_version()}"
        )
    typer.echo(
        f"{result.images} scans: first run {result.first_run_s:.1f} s, unchanged re-run "
        f"{result.unchanged_rerun_s:.2f} s = {100 * result.fraction:.1f}% of the first"
    )


def _parse_size(text: str) -> tuple[int, int]:
    from jobs.bench_run import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="'--size'") from err


@bench_app.command("run")
def bench_run_command(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model artifact; default: reference.")
    ] = None,
    size: Annotated[
        str, typer.Option(help="Generated scans' WIDTHxHEIGHT, also the projection's size.")
    ] = "512x384",
    bits: Annotated[
        int, typer.Option(help="8: JPEG photos; 16: TIFF scans (e.g. --size 6000x4000).")
    ] = 8,
    images: Annotated[int, typer.Option(min=1, help="How many scans to generate.")] = 32,
    grain: Annotated[
        bool, typer.Option(help="Generated scans have film grain, as real ones (TIFF).")
    ] = False,
    before: Annotated[
        bool, typer.Option(help="Also time finalize with the merge and PNG writers before ISA-L.")
    ] = True,
    src: Annotated[
        str | None,
        typer.Option(help="Use these scans instead (a URL the cluster can read when remote)."),
    ] = None,
    dst: Annotated[
        str | None, typer.Option(help="Where the end-to-end run writes; default: a temp folder.")
    ] = None,
    precision: Annotated[
        list[str] | None,
        typer.Option("--precision", "-p", help="Model precisions to time; repeatable."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Scans per forward pass.")] = 8,
    actors: Annotated[
        int | None,
        typer.Option(
            min=1,
            show_default=False,
            help="Colorizer actors; default: one per GPU with --gpu, else about 3 per 4 CPUs.",
        ),
    ] = None,
    actor_cpus: Annotated[int, typer.Option(min=1, help="CPUs (threads) per actor.")] = 1,
    gpu: Annotated[bool, typer.Option(help="Run the model on GPUs.")] = False,
    scans: Annotated[int, typer.Option(min=1, help="Archive size for the projection.")] = (
        3_000_000
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Each stage alone and the whole pipeline on this cluster, the bottleneck and a projection."""
    import tempfile

    from jobs.bench_run import bench_run, report_lines, write_samples
    from jobs.runtime import ensure_ray
    from pipeline.colorize import PRECISIONS

    width, height = _parse_size(size)
    if bits not in (8, 16):
        raise typer.BadParameter(f"bits must be 8 or 16, got {bits}", param_hint="'--bits'")
    precisions = precision or ["fp32", "bf16"]
    _check_precisions(precisions, PRECISIONS)

    def progress(line: str) -> None:
        typer.echo(f"bench: {line}", err=True)

    with tempfile.TemporaryDirectory(prefix="chromascan-bench-") as scratch:
        model = model or _reference_model(scratch)
        if src is None:
            src = f"{scratch}/scans"
            kind = "JPEG" if bits == 8 and not grain else f"{bits}-bit TIFF"
            kind += ", grainy" if grain else ""
            progress(f"writing {images} sample scans ({width}×{height} {kind}) ...")
            write_samples(src, images, width=width, height=height, bits=bits, grain=grain)
        ensure_ray()
        report = bench_run(
            src, model, precisions=precisions, batch_size=batch_size, actors=actors,
            actor_cpus=actor_cpus, gpu=gpu, scans=scans, dst=dst, before=before,
            software=f"chromascan {package_version()}", progress=progress,
        )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    for line in report_lines(report):
        typer.echo(line)


@bench_app.command("memory")
def bench_memory_command(
    images: Annotated[
        list[int] | None,
        typer.Option("--images", min=1, help="Scans per run; repeatable (default 1000, 10000)."),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model artifact; default: a tiny one.")
    ] = None,
    size: Annotated[str, typer.Option(help="Generated scans' WIDTHxHEIGHT.")] = "64x48",
) -> None:
    """Driver and worker peak memory of colorize runs of growing size (should stay flat)."""
    import tempfile

    from jobs.bench_memory import bench_memory
    from jobs.bench_run import write_samples

    width, height = _parse_size(size)
    counts = images or [1000, 10000]
    with tempfile.TemporaryDirectory(prefix="chromascan-bench-") as scratch:
        if model is None:
            model = _tiny_model(scratch)
        typer.echo(
            f"bench: writing {max(counts)} sample scans ({width}×{height} JPEG) ...", err=True
        )
        write_samples(f"{scratch}/scans", max(counts), width=width, height=height, bits=8)
        typer.echo(f"{'images':>7} {'seconds':>8} {'driver peak MiB':>15} {'worker peak MiB':>15}")
        for count in counts:
            typer.echo(f"bench: colouring {count} scans in a fresh local cluster ...", err=True)
            (run,) = bench_memory(f"{scratch}/scans", model, counts=[count])
            typer.echo(
                f"{run.images:>7} {run.seconds:>8.1f} {run.driver_peak_mib:>15.0f} "
                f"{run.worker_peak_mib:>15.0f}"
            )


def _tiny_model(scratch: str) -> str:
    """A width-4 model: memory flatness is about the pipeline, and the run must be short."""
    from models.config import GeneratorConfig
    from models.networks import UNetGenerator, init_weights
    from pipeline.model_store import save_model

    generator = UNetGenerator(GeneratorConfig(width=4, depth=5, image_size=32))
    init_weights(generator)
    save_model(generator, f"{scratch}/tiny-model", name="tiny-untrained")
    return f"{scratch}/tiny-model"


@app.command("demo")
def demo(
    output: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path(
        "chromascan-demo"
    ),
    quick: Annotated[bool, typer.Option(help="A tiny model and short training, for CI.")] = False,
) -> None:
    """Train on sample photos, colour a sample archive, check it, and report: the whole product."""
    from jobs.demo import DemoError, run_demo

    try:
        run_demo(output, quick=quick, echo=typer.echo)
    except DemoError as err:
        typer.echo(f"chromascan: demo stopped: {err}", err=True)
        raise typer.Exit(1) from err


app.command("colorize")(colorize_command)
app.command("nightly")(nightly_command)
app.command("train")(train_command)
app.command("review")(review_command)
bench_app.command("manifest")(bench_manifest_command)
bench_app.command("train")(bench_train_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one line on stderr and a non-zero exit for anything the user can fix."""
    from jobs.submit import install_submission

    command = typer.main.get_command(app)
    args = argv if argv is not None else sys.argv[1:]
    # Job commands run here, or as a Ray job with --address http://HEAD:8265 (jobs/submit.py).
    install_submission(command, args)
    try:
        result = command.main(
            args=args,
            prog_name="chromascan",
            standalone_mode=False,
        )
    except typer.Abort:
        typer.echo("chromascan: aborted", err=True)
        return 130
    except typer.TyperException as err:
        # Typer vendors click: its usage errors are TyperExceptions with click's interface.
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError":
            return 0  # typer has printed the help already
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        typer.echo(f"chromascan: {message}{hint}", err=True)
        return int(getattr(err, "exit_code", 2))
    except Exception as err:
        if not is_user_error(err):
            raise
        typer.echo(f"chromascan: {own_error(err)}", err=True)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
