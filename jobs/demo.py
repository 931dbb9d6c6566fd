"""The README's main command: what exists of chromascan, run end to end on sample photos.

Today: builds the reference generator, writes and re-verifies its artifact, turns sample colour
photos (shipped with scikit-image) into grey scans and colourises them at full resolution.
The model is untrained until `chromascan train` lands, so the colours are not yet meaningful;
the demo says so rather than pretending.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.colorize import colorize_image, image_to_lightness
from models.colour import lightness_to_grey
from models.config import GeneratorConfig
from models.networks import UNetGenerator, count_parameters, init_weights
from pipeline.model_store import load_model, save_model

SAMPLE_NAMES = ("astronaut", "coffee", "chelsea", "rocket")


def sample_photos(names: tuple[str, ...] = SAMPLE_NAMES) -> dict[str, np.ndarray]:
    """Colour photos that scikit-image ships inside its wheel (no download)."""
    try:
        from skimage import data
    except ImportError as err:
        raise RuntimeError(
            "the demo needs scikit-image's sample photos: pip install 'chromascan[demo]'"
        ) from err
    return {name: getattr(data, name)() for name in names}


def run_demo(output: Path, *, quick: bool, echo: Callable[[str], None]) -> dict[str, float]:
    """Run the demo into ``output``; returns the headline figures it printed."""
    output.mkdir(parents=True, exist_ok=True)
    config = GeneratorConfig(width=8, depth=6, image_size=64) if quick else GeneratorConfig()
    torch.manual_seed(0)
    generator = UNetGenerator(config)
    init_weights(generator)
    model_url = str(output / "model")
    model_id = save_model(generator, model_url, provenance={"trained": False, "seed": 0})
    loaded = load_model(model_url)  # reload: proves the artifact verifies
    echo(
        f"model    {loaded.model_id}: U-Net {count_parameters(loaded.generator):,} parameters, "
        f"{config.image_size}² input, written to {model_url} and verified"
    )
    if loaded.model_id != model_id:
        raise RuntimeError(f"reloaded {loaded.model_id}, wrote {model_id}")

    photos = sample_photos(SAMPLE_NAMES[:2] if quick else SAMPLE_NAMES)
    for folder in ("scans", "colorized"):
        (output / folder).mkdir(exist_ok=True)
    worst_l_error = 0.0
    started = time.perf_counter()
    pixels = 0
    for name, photo in photos.items():
        # A black-and-white scan of the photo: its lightness as an sRGB grey level.
        lightness = image_to_lightness(photo)
        grey = np.rint(lightness_to_grey(torch.from_numpy(lightness)).numpy() * 255)
        scan = grey.astype(np.uint8)
        Image.fromarray(scan).save(output / "scans" / f"{name}.png")
        coloured = colorize_image(loaded.generator, scan)
        Image.fromarray(coloured).save(output / "colorized" / f"{name}.png")
        # The output keeps the scan's lightness; only 8-bit rounding and gamut clipping move it.
        l_error = np.abs(image_to_lightness(coloured) - image_to_lightness(scan))
        worst_l_error = max(worst_l_error, float(np.median(l_error)))
        pixels += scan.size
        echo(
            f"coloured {name}: {scan.shape[1]}×{scan.shape[0]} -> {output / 'colorized' / name}.png"
        )
    elapsed = time.perf_counter() - started
    echo(
        f"done     {len(photos)} scans, {pixels / 1e6:.2f} MP in {elapsed:.1f} s "
        f"({len(photos) / elapsed:.2f} images/s on CPU); median |ΔL| ≤ {worst_l_error:.2f}"
    )
    echo("note     the model is untrained: colours are not meaningful until it is trained")
    return {"images": len(photos), "seconds": elapsed, "median_l_error": worst_l_error}
