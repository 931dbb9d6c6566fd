"""Hostile and malformed scans, by kind: what archives (and attackers) actually hold.

Every generator yields ``Case``s: the file's bytes, its kind, and where it is known, the
upright size an ok row must report (so a wrong width/height is caught, not just a crash).
``scale`` shrinks the memory-heavy shapes for a quick run; 1.0 is the issue's full size.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.png import chunk as _chunk


@dataclass(frozen=True)
class Case:
    kind: str  # exif, png, tiff, jpeg, other, mutation
    name: str  # what the case is, for the report
    data: bytes
    # (width, height) upright, for a valid picture (it must be coloured, at this size)
    size: tuple[int, int] | None = None
    error_type: str | None = None  # the failed row's error type it must give, when known


def _photo(width: int = 96, height: int = 64, *, mode: str = "L", seed: int = 0) -> Image.Image:
    """A small picture with structure (gradients plus noise), not a flat field."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    grey = (x * 255 / max(1, width - 1) * 0.6 + y * 255 / max(1, height - 1) * 0.4).astype(float)
    grey = np.clip(grey + rng.normal(0, 12, grey.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(grey)
    if mode == "RGB":
        image = Image.merge("RGB", (image, image.rotate(90, expand=False), image))
    return image


def _save(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _upright(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


# --- EXIF: blocks Pillow reads but cannot write back -------------------------------------

_SHORT, _LONG, _ASCII, _RATIONAL, _SLONG = 3, 4, 2, 5, 9


def _ifd(entries: list[tuple[int, int, int, bytes]], next_ifd: int = 0) -> bytes:
    """A little-endian IFD at offset 8 whose values are inline (4 bytes) or appended."""
    count = len(entries)
    data_offset = 8 + 2 + 12 * count + 4
    head, tail = struct.pack("<H", count), b""
    for tag, kind, n, value in entries:
        if len(value) <= 4:
            head += struct.pack("<HHI", tag, kind, n) + value.ljust(4, b"\0")
        else:
            head += struct.pack("<HHII", tag, kind, n, data_offset + len(tail))
            tail += value
    return head + struct.pack("<I", next_ifd) + tail


def _exif_block(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    return b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + _ifd(entries)


def _orientation_entry(orientation: int) -> tuple[int, int, int, bytes]:
    return (0x0112, _SHORT, 1, struct.pack("<H", orientation))


_BAD_EXIF_TAGS: dict[str, list[tuple[int, int, int, bytes]]] = {
    "resolution-unit-70000": [(0x0128, _LONG, 1, struct.pack("<I", 70_000))],
    "string-xresolution": [(0x011A, _ASCII, 8, b"300 dpi\0")],
    "rational-make": [(0x010F, _RATIONAL, 1, struct.pack("<II", 3, 2))],
    "negative-exif-ifd": [(0x8769, _SLONG, 1, struct.pack("<i", -64))],
    "negative-gps-ifd": [(0x8825, _SLONG, 1, struct.pack("<i", -8))],
    "exif-ifd-past-end": [(0x8769, _LONG, 1, struct.pack("<I", 0x7FFFFFF0))],
    "zero-denominator-xresolution": [
        (0x011A, _RATIONAL, 1, struct.pack("<II", 300, 0)),
        (0x0128, _SHORT, 1, struct.pack("<H", 2)),
    ],
    "huge-xresolution": [(0x011A, _RATIONAL, 1, struct.pack("<II", 0xFFFFFFFF, 1))],
    "orientation-as-string": [(0x0112, _ASCII, 4, b"six\0")],
    "orientation-99": [(0x0112, _SHORT, 1, struct.pack("<H", 99))],
}


def exif_cases() -> Iterator[Case]:
    """Each bad tag, alone and with every orientation, in JPEG, PNG and WebP."""
    image = _photo()
    for tag_name, tags in _BAD_EXIF_TAGS.items():
        for orientation in range(1, 9):
            entries = [_orientation_entry(orientation)] if "orientation" not in tag_name else []
            block = _exif_block(sorted(entries + tags))
            rotated = orientation if "orientation" not in tag_name else 1
            for image_format in ("JPEG", "PNG", "WEBP"):
                try:
                    data = _save(image, image_format, exif=block)
                except Exception:  # a writer that refuses the block: not a case
                    continue
                yield Case(
                    "exif",
                    f"{image_format.lower()}-{tag_name}-o{orientation}",
                    data,
                    _upright(image.size, rotated),
                )


# --- PNG ----------------------------------------------------------------------------------


def _png(width: int, height: int, rows: bytes, *, extra: bytes = b"", depth: int = 8) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + extra
        + _chunk(b"IDAT", zlib.compress(rows, 9))
        + _chunk(b"IEND", b"")
    )


def _flat_png(width: int, height: int, *, extra: bytes = b"") -> bytes:
    """A grey PNG of any shape, streamed through zlib (never the whole raw image in memory)."""
    row = b"\x00" + b"\x80" * width
    compressor = zlib.compressobj(9)
    chunks = []
    rows_per_piece = max(1, (1 << 22) // len(row))
    for top in range(0, height, rows_per_piece):
        chunks.append(compressor.compress(row * min(rows_per_piece, height - top)))
    chunks.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + extra
        + _chunk(b"IDAT", b"".join(chunks))
        + _chunk(b"IEND", b"")
    )


def png_cases(scale: float) -> Iterator[Case]:
    tall = max(2, int(20_000_000 * scale))
    wide = max(2, int(16_000_000 * scale))
    yield Case("png", f"extreme-tall-1x{tall}", _flat_png(1, tall), (1, tall))
    yield Case("png", f"extreme-wide-{wide}x2", _flat_png(wide, 2), (wide, 2))
    line = max(2, int(4_000_000 * scale))
    yield Case("png", f"extreme-line-{line}x1", _flat_png(line, 1), (line, 1))
    for name, ppm in (("phys-zero", 0), ("phys-huge", 0xFFFFFFFF), ("phys-one", 1)):
        phys = _chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1))
        yield Case("png", name, _flat_png(40, 30, extra=phys), (40, 30))
    # Headers declaring far more than the bytes hold (decompression bombs, truncations).
    for width, height in ((17_000, 17_000), (100_000, 2_000), (5_000, 5_000)):
        yield Case(
            "png",
            f"declares-{width}x{height}",
            _png(width, height, b"\x00" * 64),
            error_type="ImplausibleSize" if width * height <= 300_000_000 else "ImageTooLarge",
        )
    valid = _save(_photo(), "PNG")
    yield Case("png", "truncated-half", valid[: len(valid) // 2])
    yield Case("png", "no-iend", valid[:-12], (96, 64))
    bad_crc = bytearray(valid)
    bad_crc[29] ^= 0xFF  # IHDR's CRC
    yield Case("png", "bad-ihdr-crc", bytes(bad_crc))
    yield Case("png", "bad-icc", _save(_photo(), "PNG", icc_profile=b"junk" * 40), (96, 64))
    yield Case("png", "16-bit", _save(Image.fromarray(np.full((20, 30), 4000, np.uint16)),
                                      "PNG"), (30, 20))  # fmt: skip
    yield Case("png", "interlaced-rgb", _save(_photo(mode="RGB"), "PNG", interlace=1), (96, 64))


# --- TIFF ---------------------------------------------------------------------------------


def _with_tag_type(tiff: bytes, tag: int, kind: int) -> bytes:
    """The little-endian TIFF with the first IFD's entry for ``tag`` retyped to ``kind``."""
    first_ifd = struct.unpack("<I", tiff[4:8])[0]
    entries = struct.unpack("<H", tiff[first_ifd : first_ifd + 2])[0]
    patched = bytearray(tiff)
    for index in range(entries):
        at = first_ifd + 2 + 12 * index
        if struct.unpack("<H", tiff[at : at + 2])[0] == tag:
            patched[at + 2 : at + 4] = struct.pack("<H", kind)
    return bytes(patched)


def tiff_cases() -> Iterator[Case]:
    image = _photo()
    for orientation in range(1, 9):
        data = _save(image, "TIFF", tiffinfo={0x0112: orientation})
        yield Case("tiff", f"orientation-{orientation}", data, _upright(image.size, orientation))
        data = _save(image, "TIFF", tiffinfo={0x0112: orientation}, compression="tiff_lzw")
        upright = _upright(image.size, orientation)
        yield Case("tiff", f"lzw-orientation-{orientation}", data, upright)
    pages = [_photo(seed=i) for i in range(3)]
    multi = _save(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    # Damage the second page: its IFD offset is the first IFD's "next" pointer.
    first_ifd = struct.unpack("<I", multi[4:8])[0]
    entries = struct.unpack("<H", multi[first_ifd : first_ifd + 2])[0]
    pointer = first_ifd + 2 + 12 * entries
    for name, value in (("past-end", 0x7FFFFFF0), ("into-pixels", 9), ("self", first_ifd)):
        broken = bytearray(multi)
        broken[pointer : pointer + 4] = struct.pack("<I", value)
        yield Case("tiff", f"next-page-{name}", bytes(broken), image.size)
    second = struct.unpack("<I", multi[pointer : pointer + 4])[0]
    broken = bytearray(multi)
    broken[second : second + 2] = b"\x01\x00"  # page 2 keeps one tag: no dimensions
    yield Case("tiff", "later-page-no-dimensions", bytes(broken), image.size)
    yield Case("tiff", "xmp-wrong-type", _with_tag_type(_save(image, "TIFF", tiffinfo={
        700: b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"}), 700, _SHORT), image.size)  # fmt: skip
    for name, tags in (
        ("xresolution-zero-denominator", {282: (300, 0), 283: (300, 0), 296: 2}),
        ("xresolution-huge", {282: (4_000_000_000, 1), 283: (1, 4_000_000_000), 296: 2}),
    ):
        try:
            yield Case("tiff", name, _save(image, "TIFF", tiffinfo=tags), image.size)
        except Exception:  # Pillow refused to write it: not a case
            continue
    yield Case("tiff", "16-bit", _save(Image.fromarray(np.full((20, 30), 900, np.uint16)),
                                       "TIFF"), (30, 20))  # fmt: skip
    truncated = _save(image, "TIFF")
    yield Case("tiff", "truncated", truncated[: len(truncated) * 2 // 3])


# --- JPEG ---------------------------------------------------------------------------------


def _with_sof_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0/SOF2) declaring width × height."""
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = jpeg.find(marker)
        if at >= 0:
            patched = bytearray(jpeg)
            patched[at + 5 : at + 9] = struct.pack(">HH", height, width)
            return bytes(patched)
    raise ValueError("no SOF0/SOF2 marker")


def _many_scans(jpeg: bytes, scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has ``scans`` scans."""
    last = jpeg.rfind(b"\xff\xda")
    body, end = jpeg[last:-2], jpeg[-2:]
    have = jpeg.count(b"\xff\xda")
    return jpeg[:last] + body * (scans - have + 1) + end


def jpeg_cases(scale: float) -> Iterator[Case]:
    small = _save(_photo(), "JPEG", quality=90)
    yield Case("jpeg", "declares-17000x17000", _with_sof_size(small, 17_000, 17_000),
               error_type="ImplausibleSize")  # fmt: skip
    yield Case("jpeg", "declares-0x64", _with_sof_size(small, 0, 64))
    progressive = _save(_photo(), "JPEG", quality=90, progressive=True)
    scans = max(300, int(20_000 * scale))
    yield Case("jpeg", f"progressive-{scans}-scans", _many_scans(progressive, scans),
               error_type="DecodeBudgetExceeded")  # fmt: skip
    yield Case("jpeg", "progressive", progressive, (96, 64))
    yield Case("jpeg", "truncated", small[: len(small) // 2])
    yield Case("jpeg", "cmyk", _save(_photo(mode="RGB").convert("CMYK"), "JPEG"), (96, 64))
    yield Case("jpeg", "no-eoi", small[:-2], (96, 64))


# --- other formats Pillow opens -------------------------------------------------------------


def other_cases() -> Iterator[Case]:
    grey, rgb = _photo(), _photo(mode="RGB")
    for image_format, image, options in (
        ("GIF", grey, {}),
        ("BMP", rgb, {}),
        ("ICO", rgb, {}),
        ("PPM", grey, {}),
        ("TGA", rgb, {}),
        ("PCX", grey, {}),
        ("SGI", rgb, {}),
        ("IM", grey, {}),
        ("WEBP", grey, {"lossless": True}),
        ("TIFF", rgb.convert("CMYK"), {}),
        ("TIFF", grey.convert("1"), {"compression": "group4"}),
        ("PDF", grey, {}),
        ("JPEG2000", grey, {}),
        ("EPS", grey, {}),
        ("DDS", rgb.convert("RGBA"), {}),
        ("QOI", rgb, {}),
    ):
        try:
            data = _save(image, image_format, **options)
        except Exception:  # a codec this Pillow lacks: not a case here
            continue
        yield Case("other", image_format.lower(), data)
    # Pillow opens a DDS whose pixel-format flags it does not know, then cannot decode it
    # (NotImplementedError, which no list of "decode errors" used to name).
    dds = bytearray(_save(rgb.convert("RGBA"), "DDS"))
    dds[80:84] = struct.pack("<I", 0x80000000)
    yield Case("other", "dds-unknown-pixel-format", bytes(dds), error_type="NotImplementedError")
    yield Case("other", "text", b"not an image at all\n" * 10)
    yield Case("other", "zeros", bytes(4096))
    yield Case("other", "svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>')


# --- seeded byte mutations of valid files ---------------------------------------------------

_MUTATION_SEEDS: dict[str, Callable[[], bytes]] = {
    "jpeg": lambda: _save(
        _photo(),
        "JPEG",
        quality=85,
        exif=_exif_block([_orientation_entry(6), (0x010F, _ASCII, 6, b"scan1\0")]),
    ),
    "jpeg-progressive": lambda: _save(_photo(mode="RGB"), "JPEG", progressive=True),
    "png": lambda: _save(_photo(), "PNG", dpi=(300, 300)),
    "png-rgb": lambda: _save(_photo(mode="RGB"), "PNG"),
    "tiff": lambda: _save(_photo(), "TIFF", tiffinfo={0x0112: 6}, dpi=(600, 600)),
    "tiff-multipage": lambda: _save(
        _photo(), "TIFF", save_all=True, append_images=[_photo(seed=1), _photo(seed=2)]
    ),
    "tiff-16bit": lambda: _save(Image.fromarray(np.full((40, 60), 3000, np.uint16)), "TIFF"),
    "webp": lambda: _save(_photo(), "WEBP"),
}


def _mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    buffer = bytearray(data)
    how = rng.choice(("flip", "byte", "truncate", "insert", "duplicate", "zero-run"))
    if how == "flip":
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(buffer))
            buffer[at] ^= 1 << rng.randrange(8)
    elif how == "byte":
        for _ in range(rng.randint(1, 8)):
            buffer[rng.randrange(len(buffer))] = rng.choice(
                (0, 0xFF, 0x7F, 0x80, rng.randrange(256))
            )
    elif how == "truncate":
        del buffer[rng.randrange(1, len(buffer)) :]
    elif how == "insert":
        at = rng.randrange(len(buffer))
        buffer[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif how == "duplicate":
        start = rng.randrange(len(buffer))
        piece = buffer[start : start + rng.randint(1, 512)]
        at = rng.randrange(len(buffer))
        buffer[at:at] = piece
    else:
        at = rng.randrange(len(buffer))
        buffer[at : at + rng.randint(1, 128)] = bytes(min(128, len(buffer) - at))
    return how, bytes(buffer)


def mutation_cases(count: int, seed: int) -> Iterator[Case]:
    rng = random.Random(seed)
    seeds = {name: make() for name, make in _MUTATION_SEEDS.items()}
    names = sorted(seeds)
    for index in range(count):
        name = names[index % len(names)]
        how, data = _mutate(seeds[name], rng)
        yield Case("mutation", f"{name}-{how}-{index}", data)


def all_cases(*, mutations: int, seed: int = 0, scale: float = 1.0) -> Iterator[Case]:
    """Every generated kind, then ``mutations`` seeded mutants."""
    yield from exif_cases()
    yield from png_cases(scale)
    yield from tiff_cases()
    yield from jpeg_cases(scale)
    yield from other_cases()
    yield from mutation_cases(mutations, seed)
