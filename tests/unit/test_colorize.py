"""Colourise-one-image: any size in, same size out, the source's own L kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from torch.nn import functional as F

from models.colorize import (
    colorize_image,
    image_to_lightness,
    merge_full_resolution,
    predict_ab,
    prepare_image,
)
from models.colour import grey_to_lightness, lab_to_rgb_keep_lightness, lightness_to_grey
from models.networks import UNetGenerator


def _neutral(generator: UNetGenerator) -> UNetGenerator:
    """The same generator, made to predict a = b = 0 everywhere (tanh(0) = 0)."""
    last = generator.net.up[1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return generator


@pytest.mark.parametrize(
    "shape", [(37, 1003), (1, 1), (333, 17, 1), (64, 64, 3), (41, 29, 4), (256, 256)]
)
def test_output_has_the_input_size(small_generator: UNetGenerator, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    out = colorize_image(small_generator, image)
    assert out.shape == (shape[0], shape[1], 3)
    assert out.dtype == np.uint8


def test_sixteen_bit_scans_stay_sixteen_bit_and_are_scaled_not_clipped(
    small_generator: UNetGenerator,
) -> None:
    ramp = np.linspace(0, 65535, 200 * 300).reshape(200, 300).astype(np.uint16)
    out = colorize_image(_neutral(small_generator), ramp)
    assert out.dtype == np.uint16
    # Neutral colours: each channel reproduces the ramp (scaled, not clipped at 255).
    assert np.abs(out[..., 0].astype(np.int64) - ramp).max() <= 2
    assert out.max() > 60000


def test_neutral_prediction_reproduces_a_grey_scan_exactly(small_generator: UNetGenerator) -> None:
    grey = (data.camera()[::2, ::2]).copy()  # a real grey photo, 256×256
    out = colorize_image(_neutral(small_generator), grey)
    for channel in range(3):
        assert np.abs(out[..., channel].astype(int) - grey).max() <= 1


def test_the_output_keeps_the_source_lightness(small_generator: UNetGenerator) -> None:
    photo = data.coffee()
    grey_l = image_to_lightness(photo)
    out = colorize_image(small_generator, photo)
    out_l = image_to_lightness(out)
    # 8-bit rounding moves L by a fraction of a unit; gamut clipping only where colours clip.
    assert np.median(np.abs(out_l - grey_l)) < 0.5
    # ... and it did colour it: an untrained-but-random generator is not neutral.
    assert np.abs(out.astype(int) - out.mean(axis=2, keepdims=True)).max() > 0


def test_colour_input_is_reduced_to_its_lightness(small_generator: UNetGenerator) -> None:
    photo = data.astronaut()
    from_colour = colorize_image(small_generator, photo)
    # The same lightness as a float grey image gives the same colours: only L was used.
    grey = lightness_to_grey(torch.from_numpy(image_to_lightness(photo))).numpy()
    from_grey = colorize_image(small_generator, grey)
    assert np.abs(from_grey * 255 - from_colour).max() <= 1.0
    # RGBA: alpha ignored, same result as RGB.
    rgba = np.dstack([photo, np.full(photo.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(colorize_image(small_generator, rgba), from_colour)


def test_float_and_bool_inputs(small_generator: UNetGenerator) -> None:
    image = np.random.default_rng(1).random((50, 70)).astype(np.float32)
    out = colorize_image(small_generator, image)
    assert out.dtype == np.float32
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    assert colorize_image(small_generator, image > 0.5).dtype == np.uint8


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((4, 4, 2), np.uint8), "expected an image of shape"),
        (np.zeros((0, 4), np.uint8), "image is empty"),
        (np.zeros((4, 4), np.int32), "unsupported sample type"),
        (np.full((4, 4), 2.0, np.float32), "float images must be in"),
        (np.full((4, 4), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_arrays_raise_clear_errors(
    small_generator: UNetGenerator, image: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        colorize_image(small_generator, image)


def test_strip_merge_equals_one_whole_interpolation() -> None:
    rng = np.random.default_rng(2)
    lightness = rng.uniform(0, 100, (301, 457)).astype(np.float32)
    ab = rng.uniform(-60, 60, (2, 32, 32)).astype(np.float32)
    stripped = merge_full_resolution(lightness, ab, dtype=np.float32, strip_rows=7)
    # Reference: upsample the whole ab plane at once with torch.
    ab_full = F.interpolate(torch.from_numpy(ab)[None], size=(301, 457), mode="bilinear")[0]
    lab_full = torch.cat((torch.from_numpy(lightness)[None], ab_full))
    whole = lab_to_rgb_keep_lightness(lab_full).permute(1, 2, 0)
    # Float rounding of the two interpolation orders differs by ~1e-5 (0.003 of an 8-bit level);
    # at the gamut's edge that can flip a pixel into the chroma bisection, which is exact to
    # 2**-8 of the chroma: for these chromas (up to 85) that moves a channel by up to ~0.02.
    difference = np.abs(stripped - whole.numpy())
    assert np.mean(difference < 1e-4) > 0.999
    assert difference.max() < 0.02
    one_strip = merge_full_resolution(lightness, ab, dtype=np.float32, strip_rows=10_000)
    np.testing.assert_allclose(stripped, one_strip, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "chroma"), [((384, 512), 20.0), ((37, 1003), 80.0), ((1, 1), 40.0), ((517, 3), 120.0)]
)
def test_compiled_merge_gives_the_torch_merge_values_exactly(
    shape: tuple[int, int], chroma: float
) -> None:
    """The compiled 8-bit merge (models.merge_kernel) must not change a single output value."""
    rng = np.random.default_rng(7)
    lightness = rng.uniform(0, 100, shape).astype(np.float32)
    lightness[0, 0], lightness[-1, -1] = 0.0, 100.0  # the ends of the L* range
    ab = rng.normal(0, chroma, (2, 64, 64)).astype(np.float32)  # many colours outside sRGB
    compiled = merge_full_resolution(lightness, ab)
    reference = merge_full_resolution(lightness, ab, reference=True, strip_rows=5)
    assert compiled.dtype == np.uint8
    np.testing.assert_array_equal(compiled, reference)


@pytest.mark.parametrize(
    ("shape", "chroma"), [((384, 512), 20.0), ((37, 1003), 80.0), ((1, 1), 40.0), ((517, 3), 120.0)]
)
def test_compiled_16_bit_merge_gives_the_torch_values_to_one_level(
    shape: tuple[int, int], chroma: float
) -> None:
    """16 bits: libm's powf and torch's vector powf may differ in the last bit, so a value may
    round to the next of 65,535 levels; nothing else may change."""
    rng = np.random.default_rng(11)
    lightness = rng.uniform(0, 100, shape).astype(np.float32)
    lightness[0, 0], lightness[-1, -1] = 0.0, 100.0
    ab = rng.normal(0, chroma, (2, 64, 64)).astype(np.float32)
    compiled = merge_full_resolution(lightness, ab, dtype=np.uint16)
    reference = merge_full_resolution(lightness, ab, dtype=np.uint16, reference=True)
    assert compiled.dtype == np.uint16
    difference = np.abs(compiled.astype(np.int32) - reference.astype(np.int32))
    assert difference.max() <= 1
    assert np.mean(difference == 0) > 0.999


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_merge_threads_do_not_change_a_value(dtype: type) -> None:
    rng = np.random.default_rng(5)
    lightness = rng.uniform(0, 100, (1000, 300)).astype(np.float32)
    ab = rng.normal(0, 60, (2, 64, 64)).astype(np.float32)
    one = merge_full_resolution(lightness, ab, dtype=dtype)
    np.testing.assert_array_equal(one, merge_full_resolution(lightness, ab, dtype=dtype, threads=3))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(301, 457), (19, 23, 1)])
def test_grey_lightness_lookup_equals_the_computed_curve(
    dtype: type, shape: tuple[int, ...]
) -> None:
    peak = np.iinfo(dtype).max
    grey = np.random.default_rng(3).integers(0, peak + 1, shape).astype(dtype)
    grey.flat[:2] = (0, peak)
    looked_up = image_to_lightness(grey)
    computed = grey_to_lightness(torch.from_numpy(grey.astype(np.float32) / peak)).numpy()
    assert looked_up.shape == grey.shape[:2]
    # Equal to float32 rounding: torch's vector kernels round an array's tail elements a ulp
    # differently, so even the computed curve differs by a ulp between two array lengths.
    np.testing.assert_allclose(looked_up, computed.reshape(grey.shape[:2]), rtol=1e-6, atol=1e-5)


def test_strip_size_does_not_change_the_result(small_generator: UNetGenerator) -> None:
    photo = data.chelsea()
    np.testing.assert_array_equal(
        colorize_image(small_generator, photo, strip_rows=13),
        colorize_image(small_generator, photo, strip_rows=4096),
    )


def test_bfloat16_autocast_stays_close_to_float32(small_generator: UNetGenerator) -> None:
    prepared = prepare_image(data.astronaut(), 32)
    l_model = torch.from_numpy(prepared.l_model)[None]
    full = predict_ab(small_generator, l_model)
    reduced = predict_ab(small_generator, l_model, autocast_dtype=torch.bfloat16)
    assert reduced.dtype == torch.float32
    # Lab units; bfloat16 keeps ~3 significant digits through the U-Net.
    assert (full - reduced).abs().mean() < 1.0


def test_batch_prediction_equals_one_by_one(small_generator: UNetGenerator) -> None:
    batch = torch.rand(3, 1, 32, 32) * 2 - 1
    together = predict_ab(small_generator, batch)
    for index in range(3):
        torch.testing.assert_close(
            predict_ab(small_generator, batch[index : index + 1])[0], together[index],
            atol=1e-5, rtol=0,
        )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_colorize_matches_cpu(small_generator: UNetGenerator) -> None:
    photo = data.coffee()
    on_cpu = colorize_image(small_generator, photo)
    on_gpu = colorize_image(small_generator.cuda(), photo, device="cuda")
    assert np.abs(on_gpu.astype(int) - on_cpu).max() <= 2


def test_16_bit_lookup_is_the_computed_curve_exactly() -> None:
    """Every 7th float32 in [0, 1], and every value within 40 ulps of a level's threshold."""
    from models import merge_kernel

    thresholds, _ = merge_kernel.sixteen_bit_tables()
    one = np.array([1.0], np.float32).view(np.uint32)[0]
    spread = np.arange(0, one + 1, 7, dtype=np.uint32).view(np.float32)
    near = (thresholds[1:].view(np.uint32)[:, None].astype(np.int64) + np.arange(-40, 41)).clip(
        0, one
    )
    for values in (spread, near.astype(np.uint32).ravel().view(np.float32)):
        np.testing.assert_array_equal(
            merge_kernel.to16_looked_up(values), merge_kernel.to16_exact(values)
        )
    ends = np.array([-1.0, 2.0, np.nan, np.inf, -np.inf], np.float32)
    assert merge_kernel.to16_looked_up(ends).tolist() == [0, 65535, 0, 65535, 0]
