"""Embedded ICC profiles are honoured: the output's L* is the one the scan's profile says."""

from __future__ import annotations

import io
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


def test_a_grey_scan_with_an_l_star_profile_keeps_the_profiles_lightness(tmp_path: Path) -> None:
    icc = L_STAR_GREY.read_bytes()
    grey = Image.fromarray(data.camera()).resize((256, 256))
    lightness, row = _output_lightness(tmp_path, "lstar.png", grey, icc)
    reference = _profile_lightness(grey, icc)
    assert np.abs(lightness - reference).mean() < 0.5
    # Read as sRGB, these samples would be off by several L* in the mid-tones.
    naive = rgb_to_lightness(torch.from_numpy(np.asarray(grey.convert("RGB"), np.float32) / 255)
                             .permute(2, 0, 1))[0].numpy()  # fmt: skip
    assert np.abs(naive - reference).mean() > 2
    assert row["source_icc"] == "Gray CIE*L"


def test_an_adobe_rgb_photo_keeps_the_profiles_lightness(tmp_path: Path) -> None:
    icc = ADOBE_RGB.read_bytes()
    photo = Image.fromarray(data.coffee()).resize((200, 150))
    lightness, row = _output_lightness(tmp_path, "adobe.png", photo, icc)
    reference = _profile_lightness(photo, icc)
    assert np.abs(lightness - reference).mean() < 0.5
    assert row["source_icc"].startswith("Compatible with Adobe RGB")
