"""Lab colour science against scikit-image, the reference implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import color, data

from models import colour

REAL_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")


def _to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)


def _to_hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).double().numpy()


def _random_rgb(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.random((size, size, 3))
    # Include the exact corners of the cube and values around both piecewise switch points.
    image[0, :8] = [[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1],
                    [0.04045, 0.04046, 0.04044]]  # fmt: skip
    return image


def _real_rgb(name: str) -> np.ndarray:
    return getattr(data, name)().astype(np.float64) / 255.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rgb_to_lab_matches_skimage_on_random_colours(seed: int) -> None:
    rgb = _random_rgb(seed)
    ours = _to_hwc(colour.rgb_to_lab(_to_chw(rgb)))
    assert np.abs(ours - color.rgb2lab(rgb)).max() < 1e-3


@pytest.mark.parametrize("name", REAL_IMAGES)
def test_rgb_to_lab_matches_skimage_on_real_photos(name: str) -> None:
    rgb = _real_rgb(name)
    ours = _to_hwc(colour.rgb_to_lab(_to_chw(rgb)))
    assert np.abs(ours - color.rgb2lab(rgb)).max() < 1e-3


@pytest.mark.parametrize("name", REAL_IMAGES)
def test_lab_to_rgb_matches_skimage_on_real_photos(name: str) -> None:
    lab = color.rgb2lab(_real_rgb(name))
    ours = _to_hwc(colour.lab_to_rgb(_to_chw(lab)))
    assert np.abs(ours - color.lab2rgb(lab)).max() < 1 / 255


@pytest.mark.parametrize("source", ["random", *REAL_IMAGES])
def test_round_trip_is_within_one_level(source: str) -> None:
    rgb = _random_rgb(7) if source == "random" else _real_rgb(source)
    back = _to_hwc(colour.lab_to_rgb(colour.rgb_to_lab(_to_chw(rgb))))
    assert np.abs(back - rgb).max() < 1 / 255


def test_lab_to_rgb_clips_out_of_gamut_like_skimage() -> None:
    rng = np.random.default_rng(3)
    lab = np.stack(
        [rng.uniform(0, 100, (32, 32)), rng.uniform(-110, 110, (32, 32)),
         rng.uniform(-110, 110, (32, 32))], axis=-1,
    )  # fmt: skip
    ours = _to_hwc(colour.lab_to_rgb(_to_chw(lab)))
    assert ours.min() >= 0.0
    assert ours.max() <= 1.0
    with pytest.warns(UserWarning, match="out of range|negative Z"):  # skimage says it clipped
        reference = color.lab2rgb(lab)
    assert np.abs(ours - reference).max() < 1 / 255
    unclipped = colour.lab_to_rgb(_to_chw(lab), clip=False)
    assert unclipped.min() < 0.0 or unclipped.max() > 1.0


def test_batched_and_unbatched_agree() -> None:
    batch = torch.rand(4, 3, 16, 24)
    lab_batch = colour.rgb_to_lab(batch)
    assert lab_batch.shape == (4, 3, 16, 24)
    for index in range(4):
        torch.testing.assert_close(lab_batch[index], colour.rgb_to_lab(batch[index]))
    torch.testing.assert_close(colour.lab_to_rgb(lab_batch), batch, atol=2e-4, rtol=0)


def test_lightness_shortcuts_match_full_conversion() -> None:
    rgb = torch.rand(2, 3, 20, 20)
    lab = colour.rgb_to_lab(rgb)
    torch.testing.assert_close(colour.rgb_to_lightness(rgb), lab[:, :1], atol=1e-4, rtol=0)
    grey = torch.rand(20, 20)
    grey_lab = colour.rgb_to_lab(grey.expand(3, 20, 20))
    torch.testing.assert_close(colour.grey_to_lightness(grey), grey_lab[0], atol=1e-4, rtol=0)
    # A neutral grey has a = b = 0, up to the 6-digit matrix not summing exactly to the
    # D65 white (scikit-image shows the same 0.005).
    assert grey_lab[1:].abs().max() < 1e-2
    torch.testing.assert_close(colour.lightness_to_grey(colour.grey_to_lightness(grey)), grey,
                               atol=1e-5, rtol=0)  # fmt: skip


def test_gradients_are_finite_everywhere() -> None:
    # 0 and 1 and the switch points are where a naive pow() has an infinite or NaN gradient.
    values = torch.tensor([0.0, 1e-7, 0.0031308, 0.04045, 0.5, 1.0])
    rgb = values.view(1, -1, 1).expand(3, -1, 2).clone().requires_grad_(True)
    colour.rgb_to_lab(rgb).sum().backward()
    assert torch.isfinite(rgb.grad).all()
    lab = torch.tensor([[0.0, 0.0], [50.0, 100.0], [-20.0, 0.0]]).view(3, 1, 2)
    lab.requires_grad_(True)
    colour.lab_to_rgb(lab, clip=False).sum().backward()
    assert torch.isfinite(lab.grad).all()


def test_normalisation_round_trips_and_hits_the_range() -> None:
    lightness = torch.tensor([0.0, 50.0, 100.0])
    torch.testing.assert_close(colour.normalize_l(lightness), torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(colour.denormalize_l(colour.normalize_l(lightness)), lightness)
    ab = torch.tensor([-110.0, 0.0, 55.0])
    torch.testing.assert_close(colour.normalize_ab(ab), torch.tensor([-1.0, 0.0, 0.5]))
    torch.testing.assert_close(colour.denormalize_ab(colour.normalize_ab(ab)), ab)


def test_every_srgb_colour_fits_the_ab_scale() -> None:
    # The generator's tanh output covers ±AB_SCALE; sRGB's extreme ab must fit inside it.
    corners = torch.tensor(
        [[r, g, b] for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)]
    ).T.reshape(3, 8, 1)
    ab = colour.rgb_to_lab(corners)[1:]
    assert ab.abs().max() <= colour.AB_SCALE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    rgb = torch.rand(2, 3, 64, 64)
    on_gpu = colour.rgb_to_lab(rgb.cuda()).cpu()
    torch.testing.assert_close(on_gpu, colour.rgb_to_lab(rgb), atol=1e-3, rtol=0)
    torch.testing.assert_close(colour.lab_to_rgb(on_gpu.cuda()).cpu(), rgb, atol=1 / 255, rtol=0)


def test_gamut_fit_keeps_lightness_and_hue() -> None:
    rng = np.random.default_rng(5)
    lab = torch.from_numpy(
        np.stack([rng.uniform(1, 99, (40, 40)), rng.uniform(-110, 110, (40, 40)),
                  rng.uniform(-110, 110, (40, 40))]).astype(np.float32)
    )  # fmt: skip
    rgb = colour.lab_to_rgb_keep_lightness(lab)
    assert rgb.min() >= 0.0
    assert rgb.max() <= 1.0
    back = colour.rgb_to_lab(rgb)
    # Lightness kept to a small fraction of an 8-bit level; clipping would move it by tens.
    assert (back[0] - lab[0]).abs().max() < 0.05
    assert (colour.rgb_to_lab(colour.lab_to_rgb(lab))[0] - lab[0]).abs().max() > 5
    # Hue kept: the chroma only shrinks along the same direction in the ab plane.
    cosine = (back[1] * lab[1] + back[2] * lab[2]) / (
        back[1:].norm(dim=0) * lab[1:].norm(dim=0) + 1e-6
    )
    coloured = back[1:].norm(dim=0) > 2
    assert cosine[coloured].min() > 0.95


def test_gamut_fit_leaves_in_gamut_colours_alone() -> None:
    rgb = torch.rand(3, 30, 30)
    torch.testing.assert_close(
        colour.lab_to_rgb_keep_lightness(colour.rgb_to_lab(rgb)), rgb, atol=1e-4, rtol=0
    )
