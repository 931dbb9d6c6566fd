"""``chromascan colorize``: colour every scan under SRC into DST on Ray."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from jobs.runtime import ensure_ray

if TYPE_CHECKING:
    from pipeline.colorize import Progress

# pipeline.decode.DEFAULT_MAX_PIXELS, repeated so that `--help` need not import the pipeline
# (Ray and torch); tests/unit/test_cli.py checks that the two agree.
DEFAULT_MAX_PIXELS = 300_000_000
DEFAULT_STORAGE_TIMEOUT_S = 120.0  # pipeline.storage.DEFAULT_TIMEOUT_S, checked the same way

EXIT_INPUTS_FAILED = 3  # some inputs failed; the run itself completed


class _ProgressPrinter:
    """One line at most every few seconds, on stderr so stdout stays the summary."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self.last = 0.0

    def __call__(self, state: Progress) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and state.done < state.total:
            return
        self.last = now
        rate = state.images_per_second
        remaining = (state.total - state.done) / rate if rate > 0 else float("nan")
        eta = f", about {remaining:.0f} s left" if state.done < state.total and rate > 0 else ""
        typer.echo(
            f"colorize: {state.done}/{state.total} ({state.ok} ok, {state.failed} failed) "
            f"{rate:.2f} images/s{eta}",
            err=True,
        )


# Options colorize and nightly share, declared once.
Src = Annotated[str, typer.Argument(help="Folder or URL of the scans (s3://bucket/prefix).")]
Dst = Annotated[str, typer.Argument(help="Folder or URL for images/, manifest/ and runs/.")]
ModelUrl = Annotated[str, typer.Option("--model", "-m", help="Model artifact folder or URL.")]
Gpu = Annotated[bool, typer.Option(help="One colorizer actor per GPU, in bf16/fp16.")]
Actors = Annotated[
    int | None,
    typer.Option(
        min=1,
        show_default=False,
        help="Colorizer actors; default: one per GPU with --gpu, else about 3 per 4 CPUs.",
    ),
]
BatchSize = Annotated[int, typer.Option(min=1, help="Scans per forward pass.")]
ActorCpus = Annotated[int, typer.Option(min=1, help="CPUs (torch threads) per colorizer actor.")]
MaxPixels = Annotated[
    int, typer.Option(min=1, help="Scans larger than this (width × height) fail.")
]
Bits = Annotated[
    str,
    typer.Option(
        metavar="8|16|source",
        help="Output bits per channel; source: 16-bit masters give 16-bit PNGs, others 8-bit.",
    ),
]
SignCert = Annotated[
    str | None,
    typer.Option(
        metavar="PEM",
        help="Sign every output's C2PA content credentials with this certificate chain "
        "(PEM file, leaf first; or env CHROMASCAN_SIGN_CERT, PEM text or path).",
    ),
]
SignKey = Annotated[
    str | None,
    typer.Option(
        metavar="PEM",
        help="The certificate's private key (unencrypted PEM file; or env CHROMASCAN_SIGN_KEY).",
    ),
]
FinalizeThreads = Annotated[
    int,
    typer.Option(
        min=1,
        help="Threads (and reserved CPUs) per scan's merge and encode: more when a node has "
        "fewer huge scans at a time than cores.",
    ),
]
AllowFailures = Annotated[
    bool, typer.Option(help="Exit 0 even when some scans failed (they stay in the manifest).")
]
StorageTimeout = Annotated[
    float,
    typer.Option(
        metavar="SECONDS",
        help="Longest wait for one storage read or write (+1 s per MiB) before the store "
        "counts as down and the run stops; run again to finish.",
    ),
]


def colorize_command(
    src: Src,
    dst: Dst,
    model: ModelUrl,
    gpu: Gpu = False,
    actors: Actors = None,
    batch_size: BatchSize = 8,
    actor_cpus: ActorCpus = 1,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    bits: Bits = "source",
    limit: Annotated[
        int | None, typer.Option(min=0, help="Colour at most N scans (listing order).")
    ] = None,
    precision: Annotated[
        str, typer.Option(help="auto, fp32, bf16 or fp16 (auto: bf16 where native).")
    ] = "auto",
    png_level: Annotated[
        int, typer.Option(min=0, max=9, help="PNG deflate level: 1 fastest, 9 smallest.")
    ] = 1,
    incremental: Annotated[
        bool,
        typer.Option(help="Skip scans DST's manifests already have done (resumes a crashed run)."),
    ] = True,
    retry_failed: Annotated[
        bool, typer.Option(help="With --incremental, try scans that failed before again.")
    ] = True,
    any_model: Annotated[
        bool, typer.Option(help="With --incremental, scans done by another model count as done.")
    ] = False,
    finalize_threads: FinalizeThreads = 1,
    sign_cert: SignCert = None,
    sign_key: SignKey = None,
    allow_failures: AllowFailures = False,
    storage_timeout: StorageTimeout = DEFAULT_STORAGE_TIMEOUT_S,
    flush_seconds: Annotated[
        float, typer.Option(min=0.0, hidden=True, help="Manifest flush interval (tuning).")
    ] = 30.0,
) -> None:
    """Colour every scan under SRC; write PNGs, a Parquet manifest and a run summary to DST."""
    # --address is the generic job option (jobs/submit.py); ensure_ray reads RAY_ADDRESS.
    _execute(
        allow_failures=allow_failures, sign_cert=sign_cert, sign_key=sign_key,
        src=src, dst=dst, model=model, gpu=gpu, actors=actors,
        batch_size=batch_size, actor_cpus=actor_cpus, max_pixels=max_pixels, limit=limit,
        precision=precision, png_compress_level=png_level, incremental=incremental,
        retry_failed=retry_failed, any_model=any_model, flush_seconds=flush_seconds,
        storage_timeout_s=storage_timeout, bits=bits, finalize_threads=finalize_threads,
    )  # fmt: skip


def _execute(
    *, allow_failures: bool, sign_cert: str | None, sign_key: str | None, **settings: Any
) -> None:
    """Check the settings, run, print the summary, exit 3 when inputs failed (unless allowed)."""
    from jobs.cli import package_version
    from pipeline.colorize import ColorizeConfig, ColorizeError, run_colorize
    from pipeline.credentials import CredentialsError, load_signing_keys

    try:
        config = ColorizeConfig(**settings)
    except ColorizeError as err:
        raise typer.BadParameter(str(err)) from err
    try:  # before any scan is read: a bad certificate or key is one line, at once
        signing = load_signing_keys(sign_cert, sign_key)
    except CredentialsError as err:
        raise typer.BadParameter(str(err), param_hint="'--sign-cert'/'--sign-key'") from err

    summary = run_colorize(
        config,
        software=f"chromascan {package_version()}",
        progress=_ProgressPrinter(),
        connect=ensure_ray,
        signing=signing,
    )
    not_attempted = summary.listed - summary.attempted - summary.skipped
    typer.echo(
        f"run {summary.run_id}: {summary.ok} ok, {summary.failed} failed, "
        f"{summary.skipped} already done, {not_attempted} not attempted, "
        f"of {summary.listed} listed; "
        f"{summary.images_per_second:.2f} images/s over {summary.elapsed_s:.1f} s"
    )
    for error_type, count in summary.error_types.items():
        typer.echo(f"  failed: {count} × {error_type}")
    typer.echo(f"model    {summary.model_id}")
    if signing is not None:
        typer.echo(f"signed   C2PA content credentials, by {signing.subject}")
    typer.echo(f"images   {config.dst.rstrip('/')}/images/")
    typer.echo(f"manifest {summary.manifest_uri}/")
    typer.echo(f"summary  {summary.summary_uri}")
    sys.stdout.flush()
    if summary.failed and not allow_failures:
        typer.echo(
            f"chromascan: {summary.failed} of {summary.attempted} scans failed "
            "(see the manifest; --allow-failures exits 0)",
            err=True,
        )
        raise typer.Exit(EXIT_INPUTS_FAILED)


def nightly_command(
    src: Src,
    dst: Dst,
    model: ModelUrl,
    gpu: Gpu = False,
    actors: Actors = None,
    batch_size: BatchSize = 8,
    actor_cpus: ActorCpus = 1,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    bits: Bits = "source",
    retry_failed: Annotated[
        bool, typer.Option(help="Try scans that failed in earlier runs again.")
    ] = True,
    any_model: Annotated[
        bool, typer.Option(help="Scans done by another model count as done (no re-colouring).")
    ] = False,
    finalize_threads: FinalizeThreads = 1,
    sign_cert: SignCert = None,
    sign_key: SignKey = None,
    allow_failures: AllowFailures = False,
    storage_timeout: StorageTimeout = DEFAULT_STORAGE_TIMEOUT_S,
) -> None:
    """Colour only what is new since the last run: new, changed and previously failed scans.

    The ledger is every manifest under DST. A scan is done when it has an ok row for its current
    version (ETag or mtime) by this model; a new model re-colours everything unless --any-model.
    """
    _execute(
        allow_failures=allow_failures, sign_cert=sign_cert, sign_key=sign_key,
        src=src, dst=dst, model=model, gpu=gpu, actors=actors, actor_cpus=actor_cpus,
        batch_size=batch_size, max_pixels=max_pixels, incremental=True,
        retry_failed=retry_failed, any_model=any_model, storage_timeout_s=storage_timeout,
        bits=bits, finalize_threads=finalize_threads,
    )  # fmt: skip
