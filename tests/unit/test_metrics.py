"""Colourfulness (Hasler–Süsstrunk 2003) and PSNR: definitions, scales, sample types, batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data

from models.metrics import colorfulness, colorfulness_batch, psnr, psnr_batch


def _reference_colorfulness(rgb8: np.ndarray) -> float:
    """The paper's formula written out directly, on 8-bit values (independent of the module)."""
    r, g, b = (rgb8[..., i].astype(np.float64) for i in range(3))
    rg = r - g
    yb = 0.5 * (r + g) - b
    return math.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * math.sqrt(
        rg.mean() ** 2 + yb.mean() ** 2
    )


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()[::2, ::2].copy()  # (256, 256, 3) uint8


def test_grey_images_score_zero(astronaut: np.ndarray) -> None:
    grey = astronaut.mean(axis=2).astype(np.uint8)
    assert colorfulness(grey) == 0.0
    assert colorfulness(grey[..., None]) == 0.0
    assert colorfulness(np.repeat(grey[..., None], 3, axis=2)) == 0.0


def test_matches_the_papers_formula(astronaut: np.ndarray) -> None:
    assert colorfulness(astronaut) == pytest.approx(_reference_colorfulness(astronaut), rel=1e-12)
    # A sample photo is well into "moderately" to "quite" colourful territory.
    assert 40 < colorfulness(astronaut) < 110


def test_pure_red_has_no_spread_only_mean() -> None:
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = 255
    # rg = 255 and yb = 127.5 everywhere: σ = 0, M = 0.3 · |(255, 127.5)|.
    assert colorfulness(red) == pytest.approx(0.3 * math.hypot(255.0, 127.5))


def test_sample_type_does_not_change_the_score(astronaut: np.ndarray) -> None:
    expected = colorfulness(astronaut)
    assert colorfulness(astronaut.astype(np.uint16) * 257) == pytest.approx(expected, rel=1e-12)
    assert colorfulness(astronaut.astype(np.float32) / 255.0) == pytest.approx(expected, rel=1e-6)
    rgba = np.dstack((astronaut, np.full(astronaut.shape[:2], 7, dtype=np.uint8)))
    assert colorfulness(rgba) == pytest.approx(expected, rel=1e-12)  # alpha is ignored


def test_strips_give_the_same_result(astronaut: np.ndarray) -> None:
    assert colorfulness(astronaut, strip_rows=1) == pytest.approx(
        colorfulness(astronaut), rel=1e-10
    )


def test_batch_version_matches_numpy(astronaut: np.ndarray) -> None:
    coffee = data.coffee()[:256, :256]
    batch = torch.from_numpy(np.stack((astronaut, coffee))).permute(0, 3, 1, 2).float() / 255
    scores = colorfulness_batch(batch)
    assert scores.shape == (2,)
    assert scores[0].item() == pytest.approx(colorfulness(astronaut), rel=1e-4)
    assert scores[1].item() == pytest.approx(colorfulness(coffee), rel=1e-4)


@pytest.mark.parametrize("shape", [(4, 4, 5), (4,), (2, 4, 4, 3)])
def test_rejects_shapes_that_are_not_images(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected an image"):
        colorfulness(np.zeros(shape, dtype=np.uint8))


def test_rejects_unknown_sample_types() -> None:
    with pytest.raises(ValueError, match="unsupported sample type"):
        colorfulness(np.zeros((4, 4, 3), dtype=np.int32))


def test_psnr_of_identical_images_is_infinite(astronaut: np.ndarray) -> None:
    assert psnr(astronaut, astronaut.copy()) == math.inf


def test_psnr_known_value() -> None:
    reference = np.full((16, 16, 3), 100, dtype=np.uint8)
    estimate = reference + 1  # MSE 1 on a peak of 255
    assert psnr(reference, estimate) == pytest.approx(20 * math.log10(255.0))
    # The same error relative to the peak gives the same PSNR in 16-bit and float.
    assert psnr(reference.astype(np.uint16) * 257, estimate.astype(np.uint16) * 257) == (
        pytest.approx(20 * math.log10(255.0))
    )
    assert psnr(reference / 255.0, estimate / 255.0) == pytest.approx(20 * math.log10(255.0))
    assert psnr(reference, estimate, data_range=1.0) == pytest.approx(0.0)


def test_psnr_checks_its_inputs() -> None:
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(image, image[:2])
    with pytest.raises(ValueError, match="sample types differ"):
        psnr(image, image.astype(np.uint16))


def test_psnr_batch_matches_numpy(astronaut: np.ndarray) -> None:
    noisy = np.clip(astronaut.astype(np.int16) + 9, 0, 255).astype(np.uint8)
    batch_ref = torch.from_numpy(np.stack((astronaut, astronaut))).permute(0, 3, 1, 2) / 255.0
    batch_est = torch.from_numpy(np.stack((noisy, astronaut))).permute(0, 3, 1, 2) / 255.0
    values = psnr_batch(batch_ref, batch_est)
    assert values[0].item() == pytest.approx(psnr(astronaut, noisy), rel=1e-4)
    assert math.isinf(values[1].item())
