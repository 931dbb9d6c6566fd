"""Embedded ICC profiles are honoured: the output's L* is the one the scan's profile says."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms
from skimage import data

from models.colour import rgb_to_lightness
from pipeline.stages import StageOptions, finalize_one, prepare_one

PROFILES = Path("/usr/share/color/icc")  # Debian's icc-profiles-free (scripts/test installs it)
L_STAR_GREY = PROFILES / "Gray-CIE_L.icc"
ADOBE_RGB = PROFILES / "compatibleWithAdobeRGB1998.icc"

pytestmark = pytest.mark.skipif(
    not (L_STAR_GREY.exists() and ADOBE_RGB.exists()), reason="scripts/test installs them"
)


def _profile_lightness(image: Image.Image, icc: bytes) -> np.ndarray:
    """L* of every pixel by LittleCMS straight to Lab: the reference."""
    transform = ImageCms.buildTransform(
        ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("LAB"),
        image.mode, "LAB",
    )  # fmt: skip
    lab = ImageCms.applyTransform(image, transform)
    return np.asarray(lab.getchannel(0), np.float64) * 100 / 255


def _output_lightness(tmp_path: Path, name: str, image: Image.Image, icc: bytes) -> tuple:
    source = tmp_path / name
    image.save(source, format="PNG", icc_profile=icc)
    options = StageOptions(
        run_id="icc", dst=str(tmp_path / "dst"), model_url="unused", model_id="m@abc",
        model_sha256="0" * 64, image_size=32, software="chromascan test",
    )  # fmt: skip
    row = {"source_uri": str(source), "source_size": 1, "output_path": f"{name}.png"}
    prepared = {**row, **prepare_one(row, options)}
    ab = np.random.default_rng(4).normal(0, 25, (2, 32, 32)).astype(np.float32)
    final = {**prepared, **finalize_one(prepared, ab, options)}
    assert final["status"] == "ok", final
    rgb = np.asarray(Image.open(final["output_uri"]).convert("RGB"), np.float32) / 255
    lightness = rgb_to_lightness(torch.from_numpy(rgb).permute(2, 0, 1))[0].numpy()
    return lightness, final


@pytest.mark.parametrize(
    ("profile", "picture", "name"),
    [
        (L_STAR_GREY, lambda: Image.fromarray(data.camera()).resize((256, 256)), "Gray CIE*L"),
        (ADOBE_RGB, lambda: Image.fromarray(data.coffee()).resize((200, 150)),
         "Compatible with Adobe RGB (1998)"),
    ],
    ids=["grey-l-star-curve", "adobe-rgb-photo"],
)  # fmt: skip
def test_the_output_keeps_the_lightness_the_profile_says(
    tmp_path: Path, profile: Path, picture: Callable[[], Image.Image], name: str
) -> None:
    icc, image = profile.read_bytes(), picture()
    lightness, row = _output_lightness(tmp_path, "scan.png", image, icc)
    reference = _profile_lightness(image, icc)
    assert np.abs(lightness - reference).mean() < 0.5
    # Read as sRGB (the profile ignored), the same samples are L* units off on average.
    rgb = np.asarray(image.convert("RGB"), np.float32) / 255
    naive = rgb_to_lightness(torch.from_numpy(rgb).permute(2, 0, 1))[0].numpy()
    assert np.abs(naive - reference).mean() > 1.5
    assert row["source_icc"] == name
