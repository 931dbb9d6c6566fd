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


def make_corpus(root: Path, *, photos: int = 2) -> list[Entry]:
    """Write the corpus under ``root``; returns what each file is."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "good").mkdir(exist_ok=True)
    (root / "bad").mkdir(exist_ok=True)
    entries: list[Entry] = []
    astronaut, coffee, chelsea = data.astronaut(), data.coffee(), data.chelsea()

    # Real photos, as black-and-white scans.
    for index, (name, photo) in enumerate(
        [("astronaut", astronaut), ("coffee", coffee), ("rocket", data.rocket())][:photos]
    ):
        _grey(photo).save(root / "good" / f"{name}.jpg", quality=90)
        entries.append(Entry(f"good/{name}.jpg", ok=True))
        del index

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

    # Not listed at all: not an image suffix, or hidden.
    (root / "good" / "README.txt").write_text("scans from box 12\n")
    (root / "good" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return entries
