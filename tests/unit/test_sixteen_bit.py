"""16-bit masters give 16-bit derivatives, with the source's own L and the same metadata."""

from __future__ import annotations

import io
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from models.colour import lightness_to_grey, rgb_to_lightness
from pipeline.provenance import read_png_provenance
from tests.unit.finalize_one_scan import colourise


def _grey16(width: int = 90, height: int = 60) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return (x * 700 + y * 9 + 37).astype(np.uint16)  # every level distinct, full 16-bit use


def test_a_16_bit_grey_tiff_gives_16_bit_rgb_with_its_own_lightness(tmp_path: Path) -> None:
    grey = _grey16()
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="TIFF", dpi=(600, 600))
    row = colourise(tmp_path, "master.tif", buffer.getvalue())
    png = Path(row["output_uri"]).read_bytes()
    rgb = imagecodecs.png_decode(png)  # libpng, as other tools read it
    assert rgb.dtype == np.uint16
    assert rgb.shape == (60, 90, 3)
    assert row["output_bits"] == 16
    assert len(np.unique(rgb[..., 1])) > 1000  # a real 16-bit tonal range, not 8 bits widened
    lightness = rgb_to_lightness(torch.from_numpy(rgb.astype(np.float32) / 65535).permute(2, 0, 1))
    levels = lightness_to_grey(lightness[0]).numpy() * 65535
    assert np.abs(levels - grey).max() <= 1.0
    # The same metadata as an 8-bit output: sRGB profile, DPI, XMP labelling.
    provenance = read_png_provenance(png)
    assert provenance["dpi"] == pytest.approx((600, 600), abs=0.1)
    assert provenance["icc_profile"]
    assert "compositeWithTrainedAlgorithmicMedia" in provenance["xmp"]


def test_eight_bit_sources_stay_eight_bit_and_bits_can_be_chosen(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray((_grey16() >> 8).astype(np.uint8)).save(buffer, format="PNG")
    eight = colourise(tmp_path, "scan.png", buffer.getvalue())
    assert eight["output_bits"] == 8
    assert imagecodecs.png_decode(Path(eight["output_uri"]).read_bytes()).dtype == np.uint8
    widened = colourise(tmp_path, "scan16.png", buffer.getvalue(), bits="16")
    assert imagecodecs.png_decode(Path(widened["output_uri"]).read_bytes()).dtype == np.uint16
    buffer = io.BytesIO()
    Image.fromarray(_grey16()).save(buffer, format="TIFF")
    narrowed = colourise(tmp_path, "master8.tif", buffer.getvalue(), bits="8")
    assert narrowed["output_bits"] == 8
    with Image.open(Path(narrowed["output_uri"])) as image:
        assert image.mode == "RGB"


def test_a_48_bit_rgb_tiff_is_read_at_full_depth(tmp_path: Path) -> None:
    grey = _grey16()
    rgb = np.stack([grey, grey, grey], axis=-1)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb, photometric="rgb", metadata=None)
    row = colourise(tmp_path, "colour-master.tif", buffer.getvalue())
    assert row["source_bits"] == 16
    out = imagecodecs.png_decode(Path(row["output_uri"]).read_bytes())
    lightness = rgb_to_lightness(torch.from_numpy(out.astype(np.float32) / 65535).permute(2, 0, 1))
    levels = lightness_to_grey(lightness[0]).numpy() * 65535
    assert np.abs(levels - grey).max() <= 1.0  # 8-bit reading would be ~128 levels off
