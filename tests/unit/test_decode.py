"""Decoding hostile scans: refused early with a named error, or decoded with honest metadata."""

from __future__ import annotations

import concurrent.futures
import io
import resource
import warnings

import numpy as np
import pytest
from PIL import Image

from models.colorize import lightness_to_model_input, merge_full_resolution
from pipeline.decode import DecodeError, decode_image
from tests.fuzz import generators as hostile


def _tiff(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_orientation_gives_the_upright_size_once(orientation: int) -> None:
    # Pillow's TIFF reader turns the pixels and reports the turned size itself.
    picture = hostile._photo(50, 30)
    decoded = decode_image(_tiff(picture, tiffinfo={0x0112: orientation}))
    upright = (30, 50) if orientation >= 5 else (50, 30)
    assert decoded.full_size == upright
    assert (decoded.width, decoded.height) == upright


def test_unwritable_exif_tags_are_dropped_one_by_one_and_noted() -> None:
    block = hostile._exif_block(sorted([
        hostile._orientation_entry(6),
        (0x010F, hostile._ASCII, 6, b"scan1\0"),  # Make: valid, kept
        *hostile._BAD_EXIF_TAGS["resolution-unit-70000"],
    ]))  # fmt: skip
    buffer = io.BytesIO()
    hostile._photo(50, 30).save(buffer, format="JPEG", exif=block)
    decoded = decode_image(buffer.getvalue())
    assert decoded.full_size == (30, 50)  # orientation 6 still applied
    assert decoded.notes == ("EXIF tags dropped (not writable as found): ResolutionUnit",)
    kept = Image.Exif()
    kept.load(decoded.exif)
    assert kept[0x010F] == "scan1"
    assert kept[0x0112] == 1
    assert 0x0128 not in kept


def test_an_implausible_resolution_is_dropped_and_noted() -> None:
    case = next(c for c in hostile.png_cases(0.001) if c.name == "phys-huge")
    decoded = decode_image(case.data)
    assert decoded.dpi is None
    assert "dpi dropped" in decoded.notes[0]


@pytest.mark.parametrize(
    ("name", "error_type", "words"),
    [
        ("declares-17000x17000", "ImplausibleSize", "need at least 564,453 bytes"),
        ("progressive-300-scans", "DecodeBudgetExceeded", "300 scans"),
    ],
)
def test_jpeg_headers_that_would_cost_minutes_are_refused_from_the_header(
    name: str, error_type: str, words: str
) -> None:
    case = next(c for c in hostile.jpeg_cases(0.001) if c.name == name)
    with pytest.raises(DecodeError) as caught:
        decode_image(case.data)
    assert caught.value.error_type == error_type
    assert words in str(caught.value)


def test_a_png_smaller_than_deflate_allows_is_refused() -> None:
    case = next(c for c in hostile.png_cases(0.001) if c.name == "declares-17000x17000")
    with pytest.raises(DecodeError) as caught:
        decode_image(case.data)
    assert caught.value.error_type == "ImplausibleSize"


def test_a_damaged_later_page_costs_only_the_page_count() -> None:
    case = next(c for c in hostile.tiff_cases() if c.name == "later-page-no-dimensions")
    decoded = decode_image(case.data)
    assert decoded.full_size == (96, 64)
    assert decoded.pages == 1
    assert decoded.notes[0].startswith("page count unknown")


def test_a_format_pillow_opens_but_cannot_decode_is_a_decode_error() -> None:
    case = next(c for c in hostile.other_cases() if c.name == "dds-unknown-pixel-format")
    with pytest.raises(DecodeError) as caught:
        decode_image(case.data)
    assert caught.value.error_type == "NotImplementedError"  # what Pillow raises for it


def test_scans_between_pillows_limit_and_ours_decode() -> None:
    # 182 MP: above Pillow's own 179 MP bomb limit (which it checks again at load), below
    # chromascan's 300 MP; a flat page compresses to a few hundred KB.
    data = _tiff(Image.new("L", (13_500, 13_500), 200), compression="tiff_adobe_deflate")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        decoded = decode_image(data)
    assert decoded.full_size == (13_500, 13_500)
    assert Image.MAX_IMAGE_PIXELS is not None  # the process-wide limit is restored


def test_overlapping_decodes_in_threads_leave_pillows_limit_as_it_was() -> None:
    # Ray Data decodes in a pool of threads; each thread's decode lifts the limit, and the
    # last one out must put back the value from before the first one came in.
    before = Image.MAX_IMAGE_PIXELS
    data = _tiff(Image.new("L", (640, 480), 90), compression="tiff_adobe_deflate")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda _: decode_image(data).full_size, range(64)))
    assert sizes == [(640, 480)] * 64
    assert Image.MAX_IMAGE_PIXELS == before is not None


@pytest.mark.parametrize("shape", [(2_000_000, 1), (1, 2_000_000), (2, 1_600_000)])
def test_extreme_shapes_cost_their_pixel_count_not_gigabytes(shape: tuple[int, int]) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lightness = np.full(shape, 50.0, np.float32)
    model_input = lightness_to_model_input(lightness, 256)
    rgb = merge_full_resolution(lightness, np.zeros((2, 256, 256), np.float32))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert model_input.shape == (1, 256, 256)
    assert rgb.shape == (*shape, 3)
    # Untiled, the resize alone needed 2 GB for 2,000,000 × 1 (a 2,000,000 × 256 buffer).
    assert grown_mib < 400, grown_mib


def test_column_tiles_give_the_untiled_merge_exactly() -> None:
    rng = np.random.default_rng(5)
    lightness = rng.uniform(0, 100, (123, 1001)).astype(np.float32)
    ab = rng.normal(0, 40, (2, 32, 32)).astype(np.float32)
    for dtype in (np.uint8, np.uint16):
        whole = merge_full_resolution(lightness, ab, dtype=dtype)
        tiled = merge_full_resolution(lightness, ab, dtype=dtype, column_tile=97)
        np.testing.assert_array_equal(whole, tiled)
