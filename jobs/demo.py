"""The README's main command: the whole product on a sample archive, in a few minutes.

It runs the very commands the README shows for real use, printing each before it runs:
build a sample archive from photos that installed packages ship, train a small colouriser
with Ray Train, colour the archive with the Ray Data pipeline (nightly semantics, so a second
demo run redoes nothing), summarise and verify the manifest, and write the HTML report. It
ends with where everything is and how the colours compare with the held-out originals.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.sample_archive import ArchiveScan, build_sample_archive


class DemoError(RuntimeError):
    """A step of the demo failed; the message names the step and the command to rerun."""


@dataclass(frozen=True)
class DemoSettings:
    image_size: int  # model input side
    width: int  # U-Net width
    epochs: int  # bounds the training time: ~2-3 minutes on 2 CPU cores at the full size
    batch_size: int


FULL = DemoSettings(image_size=128, width=32, epochs=60, batch_size=4)
QUICK = DemoSettings(image_size=32, width=8, epochs=2, batch_size=4)


@dataclass(frozen=True)
class Score:
    scan: ArchiveScan
    psnr_colour: float  # dB, the colourised output against the held-out colour original
    psnr_grey: float  # dB, the plain grey scan against the same original
    colorfulness: float  # of the output
    colorfulness_original: float


def _already_trained(model_dir: Path, settings: DemoSettings) -> str | None:
    """The model id when model_dir holds a finished training of these settings."""
    try:
        metadata = json.loads((model_dir / "model.json").read_text())
    except (OSError, ValueError):
        return None
    provenance = metadata.get("provenance", {})
    config = provenance.get("config", {})
    if (
        provenance.get("trained")
        and provenance.get("epochs") == settings.epochs
        and config.get("generator", {}).get("image_size") == settings.image_size
        and config.get("generator", {}).get("width") == settings.width
    ):
        return str(metadata.get("model_id"))
    return None


def _score(scan: ArchiveScan, output: Path, original: Path) -> Score:
    import torch

    from models.colorize import image_to_lightness
    from models.colour import lightness_to_grey
    from models.metrics import colorfulness, psnr

    coloured = np.asarray(Image.open(output).convert("RGB"))
    truth = np.asarray(Image.open(original).convert("RGB"))
    # The grey baseline: the scan as it is, a neutral grey of the same lightness.
    lightness = torch.from_numpy(image_to_lightness(coloured))
    grey = np.rint(lightness_to_grey(lightness).numpy() * 255).astype(np.uint8)
    grey_rgb = np.repeat(grey[..., None], 3, axis=2)
    return Score(
        scan=scan,
        psnr_colour=psnr(truth, coloured),
        psnr_grey=psnr(truth, grey_rgb),
        colorfulness=colorfulness(coloured),
        colorfulness_original=colorfulness(truth),
    )


def run_demo(output: Path, *, quick: bool, echo: Callable[[str], None]) -> dict[str, float]:
    """Run the demo into ``output``; returns the headline figures it printed."""
    from jobs.cli import main

    settings = QUICK if quick else FULL
    started = time.perf_counter()
    samples, training, coloured = output / "samples", output / "training", output / "colour"
    report = output / "report.html"

    def run(*argv: str, ok_codes: tuple[int, ...] = (0,)) -> None:
        echo(f"\n$ chromascan {shlex.join(argv)}")
        code = main(list(argv))
        if code not in ok_codes:
            raise DemoError(f"`chromascan {shlex.join(argv)}` exited {code}")

    echo(f"sample archive in {samples}")
    scans = build_sample_archive(samples, quick=quick)
    photos = len(list((samples / "train").glob("*.jpg")))
    echo(f"  {photos} colour photos to train on (crops and flips of scikit-image/-learn samples)")
    echo(f"  {len(scans)} scans to colour: " + ", ".join(s.kind for s in scans))

    model_id = _already_trained(training / "model", settings)
    if model_id:
        echo(f"\nmodel {model_id} is already trained with these settings: not training again")
    else:
        run(
            "train", str(samples / "train"), "--output", str(training),
            "--epochs", str(settings.epochs), "--image-size", str(settings.image_size),
            "--width", str(settings.width), "--batch-size", str(settings.batch_size),
            "--cpus-per-worker", str(os.cpu_count() or 1), "--name", "demo",
        )  # fmt: skip
    # Nightly semantics: a second demo run finds every scan done and colours nothing.
    run("nightly", str(samples / "archive"), str(coloured), "--model", str(training / "model"),
        "--allow-failures")  # fmt: skip
    run("manifest", "summary", str(coloured))
    run("manifest", "verify", str(coloured))
    run("manifest", "report", str(coloured), "--out", str(report))

    scores = []
    for scan in scans:
        if scan.original is None:
            continue
        result = coloured / "images" / Path(scan.relative_path).with_suffix(".png")
        if result.exists():
            scores.append(_score(scan, result, samples / "originals" / scan.original))
    if not scores:
        raise DemoError(f"no colourised scans under {coloured / 'images'}")
    echo("\nagainst the held-out colour originals (PSNR: higher is closer):")
    echo(f"  {'scan':<28} {'grey scan':>10} {'colourised':>11} {'colourfulness':>14}")
    for score in scores:
        echo(
            f"  {score.scan.relative_path:<28} {score.psnr_grey:>8.2f} dB "
            f"{score.psnr_colour:>8.2f} dB {score.colorfulness:>6.1f} "
            f"(orig. {score.colorfulness_original:.1f})"
        )
    figures = {
        "psnr_grey_db": float(np.mean([s.psnr_grey for s in scores])),
        "psnr_colour_db": float(np.mean([s.psnr_colour for s in scores])),
        "colorfulness": float(np.mean([s.colorfulness for s in scores])),
        "colorfulness_original": float(np.mean([s.colorfulness_original for s in scores])),
        "seconds": time.perf_counter() - started,
    }
    echo(
        f"  {'mean':<28} {figures['psnr_grey_db']:>8.2f} dB {figures['psnr_colour_db']:>8.2f} dB "
        f"{figures['colorfulness']:>6.1f} (orig. {figures['colorfulness_original']:.1f})"
    )
    echo(f"\ndone in {figures['seconds']:.0f} s. Everything is under {output}/:")
    echo(f"  model     {training / 'model'}  (training log: {training / 'train.json'})")
    echo(f"  outputs   {coloured / 'images'}")
    echo(f"  manifest  {coloured / 'manifest'}  (Parquet: pandas, DuckDB, pyarrow)")
    echo(f"  report    {report}  (open it in a browser)")
    echo("Run it again: finished work is not redone.")
    return figures
