"""A generated archive: real photos as archives hold them, and the ways scans go wrong.

Each entry says whether chromascan must colour it (``ok``) or record it as failed with an
error type, so tests can check every row of the manifest against what the file really is.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from tests.fuzz import generators as hostile


@dataclass(frozen=True)
class Entry:
    relative_path: str
    ok: bool
    error_type: str | None = None  # expected error_type for a failed one
    note: str | None = None  # text the manifest's notes must contain


def _grey(photo: np.ndarray) -> Image.Image:
    return Image.fromarray(photo).convert("L")


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height (a decompression bomb's first bytes)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then IHDR's length and type
    raw[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(raw[12 : ihdr + 13]))
    raw[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(raw)


def _tiff_with_declared_size(width: int, height: int) -> bytes:
    """An uncompressed 8-bit grey TIFF header claiming width × height, with 8 bytes of strip."""
    entries = [  # (tag, type, count, value): type 3 SHORT, 4 LONG
        (256, 4, 1, width),  # ImageWidth
        (257, 4, 1, height),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression: none
        (262, 3, 1, 1),  # PhotometricInterpretation: black is zero
        (273, 4, 1, 0),  # StripOffsets, patched below
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, width * height),  # StripByteCounts: what the header promises
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    strip_offset = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, declared in entries:
        value = strip_offset if tag == 273 else declared
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(8)


def _jpeg_with_malformed_exif(image: Image.Image) -> bytes:
    """A JPEG whose EXIF points its Exif and GPS sub-IFDs past the end of the block.

    Camera firmware and careless editors write such blocks; the pixels are fine, so the scan
    must be coloured, not refused.
    """
    ifd0 = struct.pack("<H", 3)
    ifd0 += struct.pack("<HHIHH", 0x0112, 3, 1, 1, 0)  # Orientation: normal
    ifd0 += struct.pack("<HHII", 0x8769, 4, 1, 0xFFFF)  # Exif IFD far past the end
    ifd0 += struct.pack("<HHII", 0x8825, 4, 1, 0x7FFFFFF0)  # GPS IFD: nonsense offset
    ifd0 += struct.pack("<I", 0x00FFFFFF)  # "next IFD" past the end as well
    buffer = io.BytesIO()
    image.save(
        buffer, format="JPEG", quality=90, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + ifd0
    )
    return buffer.getvalue()


# File names archives really hold: spaces, '#', '%', accents and CJK (all UTF-8), and a long
# one. 200 bytes, not 255: an output is first written as ".<name>.<32 hex>.tmp" (38 bytes
# more) and local file systems refuse segments over 255 bytes.
UNUSUAL_NAMES = (
    "good/names/box 12 #3 — 50% grey, ünïcödé 東京.jpg",
    "good/names/" + "long-" * 38 + "long-name.jpg",
)


def _odd_but_valid(root: Path, small: Image.Image) -> list[Entry]:
    """Valid files that look odd: each must be coloured like any other scan."""
    entries: list[Entry] = []
    # A PNG named .jpg: the decoder goes by the bytes, not the name.
    small.save(root / "good" / "png_named.jpg", format="PNG")
    entries.append(Entry("good/png_named.jpg", ok=True))
    # A folder named like an image: only the scan inside it is an input.
    (root / "good" / "folder.jpg").mkdir(exist_ok=True)
    small.save(root / "good" / "folder.jpg" / "inside.png")
    entries.append(Entry("good/folder.jpg/inside.png", ok=True))
    # One pixel: smaller than any model input, still a picture.
    Image.new("L", (1, 1), 90).save(root / "good" / "one_pixel.png")
    entries.append(Entry("good/one_pixel.png", ok=True))
    (root / "good" / "bad_exif.jpg").write_bytes(_jpeg_with_malformed_exif(small))
    entries.append(Entry("good/bad_exif.jpg", ok=True))
    # An embedded ICC profile that no colour engine can parse: the grey samples are still
    # what they are, and the output carries its own sRGB profile.
    small.save(root / "good" / "bad_icc.png", icc_profile=b"not an ICC profile " * 8)
    entries.append(Entry("good/bad_icc.png", ok=True))
    (root / "good" / "names").mkdir(exist_ok=True)
    for name in UNUSUAL_NAMES:
        small.save(root / name, format="JPEG", quality=90)
        entries.append(Entry(name, ok=True))
    return entries


def _more_bad(root: Path, grey: Image.Image) -> list[Entry]:
    """Truncations, another bomb and a 0 × 0 image: each one failed row, naming the problem."""
    entries: list[Entry] = []
    # Truncated PNG and (uncompressed) TIFF: headers intact, pixel data cut off mid-way.
    for name, image_format in (("truncated.png", "PNG"), ("truncated.tif", "TIFF")):
        buffer = io.BytesIO()
        grey.save(buffer, format=image_format)
        whole = buffer.getvalue()
        (root / "bad" / name).write_bytes(whole[: len(whole) // 2])
        entries.append(Entry(f"bad/{name}", ok=False, error_type="OSError"))
    # The same kind of bomb in TIFF: 130 bytes of file claiming 60,000 × 60,000 pixels.
    (root / "bad" / "bomb.tif").write_bytes(_tiff_with_declared_size(60_000, 60_000))
    entries.append(Entry("bad/bomb.tif", ok=False, error_type="ImageTooLarge"))
    # A PNG whose header declares 0 × 0 pixels. Pillow refuses to open any 0-pixel image (and
    # cannot write one), so this is the only 0 × 0 image an archive can hold that reaches us.
    (root / "bad" / "zero.png").write_bytes(_png_with_declared_size(0, 0))
    entries.append(Entry("bad/zero.png", ok=False, error_type="EmptyImage"))
    return entries


def _hostile(root: Path) -> list[Entry]:
    """One file of every kind the fuzzer found stopping runs (issue 13), as an archive holds it.

    Most are pictures with metadata that cannot be carried over: coloured, the loss noted.
    """
    (root / "hostile").mkdir(exist_ok=True)
    picture = hostile._photo()
    cases: list[tuple[str, bytes, bool, str | None, str | None]] = []
    for tag in ("resolution-unit-70000", "string-xresolution", "rational-make",
                "negative-gps-ifd"):  # fmt: skip
        block = hostile._exif_block(
            sorted([hostile._orientation_entry(6), *hostile._BAD_EXIF_TAGS[tag]])
        )
        cases.append((f"exif-{tag}.jpg", hostile._save(picture, "JPEG", exif=block), True,
                      None, "EXIF"))  # fmt: skip
    tiffs = {case.name: case.data for case in hostile.tiff_cases()}
    cases += [
        ("damaged-next-page.tif", tiffs["next-page-past-end"], True, None, None),
        ("later-page-damaged.tif", tiffs["later-page-no-dimensions"], True, None, None),
        ("xmp-wrong-type.tif", tiffs["xmp-wrong-type"], True, None, None),
        ("zero-denominator-dpi.tif", tiffs["xresolution-zero-denominator"], True, None, None),
        ("rotated-6.tif", tiffs["orientation-6"], True, None, None),
        ("rotated-7-lzw.tif", tiffs["lzw-orientation-7"], True, None, None),
    ]
    pngs = {case.name: case.data for case in hostile.png_cases(scale=0.01)}
    jpegs = {case.name: case.data for case in hostile.jpeg_cases(scale=0.01)}
    cases += [
        ("huge-dpi.png", pngs["phys-huge"], True, None, "resolution"),
        ("one-by-200000.png", pngs["extreme-tall-1x200000"], True, None, None),
        ("160000-by-two.png", pngs["extreme-wide-160000x2"], True, None, None),
        (
            "declares-17000x17000.jpg",
            jpegs["declares-17000x17000"],
            False,
            "ImplausibleSize",
            None,
        ),
        ("300-scans.jpg", jpegs["progressive-300-scans"], False, "DecodeBudgetExceeded", None),
    ]
    entries = []
    for name, payload, ok, error_type, note in cases:
        (root / "hostile" / name).write_bytes(payload)
        entries.append(Entry(f"hostile/{name}", ok=ok, error_type=error_type, note=note))
    return entries


def crash_scan() -> bytes:
    """A valid scan that the test cluster's workers are told to die on (SIGKILL): the stand-in
    for a codec segfault or the OOM killer (pipeline.attempts.crash_if_asked)."""
    return hostile._save(hostile._photo(seed=99), "PNG")


def make_corpus(root: Path, *, photos: int = 2) -> list[Entry]:
    """Write the corpus under ``root``; returns what each file is."""
    for folder in ("good", "bad"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    entries: list[Entry] = []
    astronaut, coffee, chelsea = data.astronaut(), data.coffee(), data.chelsea()

    # Real photos, as black-and-white scans.
    real = [("astronaut", astronaut), ("coffee", coffee), ("rocket", data.rocket())]
    for name, photo in real[:photos]:
        _grey(photo).save(root / "good" / f"{name}.jpg", quality=90)
        entries.append(Entry(f"good/{name}.jpg", ok=True))

    # 16-bit greyscale TIFF: a real tonal range, not 8 bits stretched.
    grey16 = (np.asarray(_grey(chelsea), np.float64) / 255.0 * 65535).astype(np.uint16)
    grey16[:, :4] = np.arange(4, dtype=np.uint16) * 3  # values that 8-bit clipping would lose
    Image.fromarray(grey16).save(root / "good" / "chelsea16.tif")
    entries.append(Entry("good/chelsea16.tif", ok=True))

    # CMYK JPEG (print-shop scans).
    Image.fromarray(coffee).convert("CMYK").save(root / "good" / "cmyk.jpg", quality=90)
    entries.append(Entry("good/cmyk.jpg", ok=True))

    # Palette PNG and grey+alpha PNG.
    Image.fromarray(chelsea).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "good" / "palette.png"
    )
    entries.append(Entry("good/palette.png", ok=True))
    grey = _grey(coffee)
    grey_alpha = Image.merge("LA", (grey, Image.new("L", grey.size, 200)))
    grey_alpha.save(root / "good" / "grey_alpha.png")
    entries.append(Entry("good/grey_alpha.png", ok=True))

    # Bilevel TIFF (fax-style line art), with a DPI.
    _grey(astronaut).convert("1").save(root / "good" / "bilevel.tif", dpi=(300, 300))
    entries.append(Entry("good/bilevel.tif", ok=True))

    # EXIF-rotated JPEG: stored landscape, shown portrait (orientation 6 = rotate 90° CW).
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "chromascan test camera"  # Make: must survive into the output
    _grey(coffee).save(root / "good" / "rotated.jpg", exif=exif.tobytes(), dpi=(600, 600))
    entries.append(Entry("good/rotated.jpg", ok=True))

    # Multi-page TIFF: the first page is coloured, the manifest says so.
    pages = [_grey(chelsea), _grey(coffee).resize((451, 300)), _grey(astronaut).resize((451, 300))]
    pages[0].save(root / "good" / "multipage.tif", save_all=True, append_images=pages[1:])
    entries.append(Entry("good/multipage.tif", ok=True, note="first of 3 pages"))

    # Sepia-toned scan: colour already, reduced to its L.
    sepia = np.asarray(_grey(chelsea), np.float64)[..., None] * np.array([1.0, 0.85, 0.65])
    Image.fromarray(sepia.astype(np.uint8)).save(root / "good" / "sepia.png")
    entries.append(Entry("good/sepia.png", ok=True))

    # Odd suffix case: listing is case-insensitive.
    _grey(chelsea).save(root / "good" / "UPPER.JPEG", format="JPEG")
    entries.append(Entry("good/UPPER.JPEG", ok=True))

    entries += _odd_but_valid(root, _grey(coffee).resize((96, 64)))

    # The bad ones.
    buffer = io.BytesIO()
    _grey(astronaut).save(buffer, format="JPEG", quality=90)
    (root / "bad" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    entries.append(Entry("bad/truncated.jpg", ok=False, error_type="OSError"))
    (root / "bad" / "empty.png").write_bytes(b"")
    entries.append(Entry("bad/empty.png", ok=False, error_type="EmptyFile"))
    (root / "bad" / "notes.jpg").write_text("this is a text file with an image name\n")
    entries.append(Entry("bad/notes.jpg", ok=False, error_type="UnidentifiedImageError"))
    (root / "bad" / "bomb.png").write_bytes(_png_with_declared_size(100_000, 100_000))
    entries.append(Entry("bad/bomb.png", ok=False, error_type="ImageTooLarge"))
    (root / "bad" / "drawing.tif").write_bytes(
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    )
    entries.append(Entry("bad/drawing.tif", ok=False, error_type="UnidentifiedImageError"))
    entries += [*_more_bad(root, _grey(chelsea)), *_hostile(root)]

    # Not listed at all: not an image suffix, or hidden.
    (root / "good" / "README.txt").write_text("scans from box 12\n")
    (root / "good" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return entries
