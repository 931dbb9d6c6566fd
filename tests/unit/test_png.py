"""pipeline.png: the output writer decodes to the pixels of the writers before it, everywhere."""

from __future__ import annotations

import io
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
from PIL import Image
from skimage import data

from pipeline import png
from pipeline.provenance import Provenance, encode_png, read_png_provenance


def _photos() -> list[np.ndarray]:
    return [data.astronaut(), data.chelsea(), data.coffee()]


def _sixteen_bit(photo: np.ndarray) -> np.ndarray:
    """A 16-bit photo whose low byte is not a copy of the high one (grain in the low bits)."""
    noise = np.random.default_rng(1).integers(0, 256, photo.shape)
    return (photo.astype(np.uint16) * 256 + noise).astype(np.uint16)


def _chunks(encoded: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checking each length and CRC on the way."""
    assert encoded[:8] == png.SIGNATURE
    chunks, offset = [], 8
    while offset < len(encoded):
        (length,) = struct.unpack(">I", encoded[offset : offset + 4])
        kind = encoded[offset + 4 : offset + 8]
        body = encoded[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", encoded[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        offset += 12 + length
    assert offset == len(encoded)
    return chunks


def _inflate_by_hand(encoded: bytes) -> np.ndarray:
    """An independent reader: zlib and the PNG filter rules, nothing else (8- or 16-bit RGB)."""
    chunks = _chunks(encoded)
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (colour, interlace) == (2, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = width * 3 * depth // 8
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride + 1)
    assert set(np.unique(rows[:, 0])) <= {0, 2}  # None or Up: all this writer uses
    out = np.zeros((height, stride), np.uint8)
    previous = np.zeros(stride, np.uint8)
    for y in range(height):
        out[y] = rows[y, 1:] + (previous if rows[y, 0] == 2 else 0)
        previous = out[y]
    if depth == 16:
        return out.view(">u2").reshape(height, width, 3).astype(np.uint16)
    return out.reshape(height, width, 3)


@pytest.mark.parametrize("bits", [8, 16])
def test_new_writer_decodes_to_the_old_writers_pixels_on_real_photos(bits: int) -> None:
    for photo in _photos():
        rgb = photo if bits == 8 else _sixteen_bit(photo)
        new = png.encode(rgb)
        old = encode_png(rgb, _provenance(), encoder="reference")
        by_libpng = imagecodecs.png_decode(new)
        np.testing.assert_array_equal(by_libpng, imagecodecs.png_decode(old))
        np.testing.assert_array_equal(by_libpng, rgb)
        np.testing.assert_array_equal(_inflate_by_hand(new), rgb)
        with Image.open(io.BytesIO(new)) as image:
            image.load()
            assert image.size == (rgb.shape[1], rgb.shape[0])
            if bits == 8:  # Pillow reads 16-bit RGB PNGs as 8-bit: compare the 8-bit ones
                np.testing.assert_array_equal(np.asarray(image), rgb)


def test_the_file_is_no_bigger_than_the_old_writers() -> None:
    """Up-filtered and ISA-L level 1 against Pillow's adaptive filters and zlib level 1."""
    for photo in _photos():
        new = len(png.encode(photo))
        old = len(encode_png(photo, _provenance(), encoder="reference"))
        assert new < old * 1.05, (new, old)


def test_chunks_metadata_first_and_big_streams_in_several_idats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(png, "IDAT_BYTES", 4096)
    rgb = data.astronaut()
    encoded = encode_png(rgb, _provenance(), dpi=(300.0, 300.0))
    kinds = [kind for kind, _ in _chunks(encoded)]
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"
    first_idat = kinds.index(b"IDAT")
    assert {b"iCCP", b"pHYs", b"iTXt"} <= set(kinds[:first_idat])
    assert kinds.count(b"IDAT") > 10
    assert set(kinds[first_idat:-1]) == {b"IDAT"}  # one run of IDATs, as PNG requires
    np.testing.assert_array_equal(imagecodecs.png_decode(encoded), rgb)
    found = read_png_provenance(encoded)
    assert found["dpi"] == pytest.approx((300.0, 300.0), abs=0.01)
    assert found["icc_profile"]


def test_same_pixels_same_bytes() -> None:
    rgb = _sixteen_bit(data.coffee())
    assert png.encode(rgb) == png.encode(rgb.copy())


@pytest.mark.parametrize(
    "shape", [(1, 1, 3), (1, 517, 3), (333, 1, 3)], ids=["one pixel", "one row", "one column"]
)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_edge_shapes(shape: tuple[int, int, int], dtype: type) -> None:
    rgb = np.random.default_rng(2).integers(0, np.iinfo(dtype).max, shape).astype(dtype)
    encoded = png.encode(rgb)
    np.testing.assert_array_equal(imagecodecs.png_decode(encoded).reshape(shape), rgb)
    np.testing.assert_array_equal(_inflate_by_hand(encoded), rgb)


@pytest.mark.parametrize("level", [0, 1, 4, 9])
def test_every_level_decodes(level: int) -> None:
    rgb = data.chelsea()
    np.testing.assert_array_equal(imagecodecs.png_decode(png.encode(rgb, level=level)), rgb)


def test_what_png_cannot_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8 or uint16"):
        png.encode(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        png.encode(np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="0-9"):
        png.encode(np.zeros((2, 2, 3), np.uint8), level=10)


def _provenance() -> Provenance:
    return Provenance(
        source_uri="file:///scans/a.tif", source_sha256="0" * 64, model_id="m", software="t"
    )
