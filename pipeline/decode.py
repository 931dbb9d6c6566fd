"""Decode scans robustly: whatever Pillow can open, reduced to grey or RGB samples.

Archives hold 16-bit greyscale TIFFs, bilevel scans, palette GIFs, CMYK JPEGs, EXIF-rotated
camera copies and the odd corrupt file. Everything here either returns a DecodedImage with
orientation applied and samples as uint8 or uint16 (16-bit stays 16-bit, scaled, never
clipped), or raises DecodeError naming the problem; it never returns half an image.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 300 megapixels: above any flatbed or camera scan (a 10,000 × 30,000 panorama), below what
# would exhaust a worker. Pillow's own default (179 MP hard limit) refuses real archive scans.
DEFAULT_MAX_PIXELS = 300_000_000

# What a malformed file makes Pillow's plugins raise; anything else is a bug and propagates.
_DECODE_ERRORS = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_COLOUR_MODES_TO_RGB = ("RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA", "La")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None when ``data`` is not a PNG."""
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


class DecodeError(ValueError):
    """A file that is not a decodable image; ``error_type`` says why in one word."""

    def __init__(self, message: str, *, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (H, W) grey or (H, W, 3) RGB, uint8 or uint16, orientation applied
    format: str  # the file's format as Pillow names it: JPEG, TIFF, PNG, ...
    mode: str  # the source's Pillow mode before any conversion: L, I;16, 1, P, CMYK, ...
    bits: int  # bits per sample in the source (1, 8, 16, 32)
    pages: int  # frames in the file; only the first is used
    exif: bytes | None  # the source's EXIF with the orientation tag reset (already applied)
    dpi: tuple[float, float] | None
    full_size: tuple[int, int]  # (width, height) at full scale after orientation
    notes: tuple[str, ...] = ()  # what a reader of the manifest should know, e.g. pages dropped

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def _bits_for(mode: str) -> int:
    if mode == "1":
        return 1
    if mode in _SIXTEEN_BIT_MODES:
        return 16
    if mode in ("I", "F"):
        return 32
    return 8


def _samples(image: Image.Image) -> np.ndarray:
    """Pillow image in any mode -> (H, W) or (H, W, 3) uint8 / uint16."""
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8)
    if mode == "1":
        return np.asarray(image.convert("L"), dtype=np.uint8)
    if mode == "LA":
        return np.asarray(image.getchannel("L"), dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.uint16)  # native byte order whatever the file's
    if mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise DecodeError("image has NaN or infinite samples", error_type="InvalidSamples")
        low, high = float(values.min()), float(values.max())
        if mode == "I" and low >= 0 and high <= 65535:
            # 16-bit data that Pillow widened to 32-bit integers (some PNG and TIFF variants).
            return values.astype(np.uint16)
        if mode == "F" and low >= 0.0 and high <= 1.0:
            return np.rint(values * 65535).astype(np.uint16)
        # Unknown range: stretch to 16 bits rather than clip away the picture.
        span = high - low or 1.0
        return np.rint((values - low) / span * 65535).astype(np.uint16)
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in _COLOUR_MODES_TO_RGB:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    raise DecodeError(f"unsupported image mode {mode!r}", error_type="UnsupportedMode")


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> DecodedImage:
    """Decode the first page of an image file.

    Args:
        data: the file's bytes.
        max_pixels: refuse larger images (width × height) with error type ImageTooLarge.
        draft_size: if set, JPEGs may be decoded at a reduced scale (1/2, 1/4, 1/8) as long as
            both sides stay at least this large: much faster when only a model-size copy is
            needed. Other formats decode at full size.

    Raises:
        DecodeError: the bytes are not a decodable image, or it is too large.
    """
    if not data:
        raise DecodeError("file is empty", error_type="EmptyFile")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check replaces Pillow's process-wide bomb heuristics.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                image = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = previous_limit
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError(
                    f"{width}×{height} = {width * height / 1e6:.0f} MP exceeds the limit of "
                    f"{max_pixels / 1e6:.0f} MP",
                    error_type="ImageTooLarge",
                )
            if width == 0 or height == 0:
                raise DecodeError(
                    f"image has no pixels ({width}×{height})", error_type="EmptyImage"
                )
            source_format = image.format or "unknown"
            source_mode = image.mode
            pages = int(getattr(image, "n_frames", 1))
            orientation = image.getexif().get(0x0112, 1)
            # Orientations 5-8 turn the picture by 90°: width and height swap.
            full_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            if draft_size and source_format == "JPEG":
                image.draft(image.mode, (draft_size, draft_size))
            image.load()
            exif = image.getexif()
            dpi = image.info.get("dpi")
            image = ImageOps.exif_transpose(image)
            pixels = _samples(image)
    except DecodeError:
        raise
    except UnidentifiedImageError as err:
        # Pillow refuses any image with a zero side before our size check can see it, and
        # says only "cannot identify"; a PNG header that declares no pixels is worth naming.
        declared = _png_declared_size(data)
        if declared is not None and 0 in declared:
            raise DecodeError(
                f"image has no pixels (its PNG header declares {declared[0]}×{declared[1]})",
                error_type="EmptyImage",
            ) from err
        raise DecodeError(
            f"not an image format this installation can read (file starts with {data[:12]!r})",
            error_type=type(err).__name__,
        ) from err
    except _DECODE_ERRORS as err:
        raise DecodeError(f"cannot decode: {err}", error_type=type(err).__name__) from err
    notes = (f"multi-page file: first of {pages} pages used",) if pages > 1 else ()
    if exif:
        exif[0x0112] = 1  # orientation already applied to the pixels
    return DecodedImage(
        pixels=pixels,
        format=source_format,
        mode=source_mode,
        bits=_bits_for(source_mode),
        pages=pages,
        exif=exif.tobytes() if exif else None,
        # TIFF writers often store 1×1 "dpi" meaning "unknown"; no scan is 1 dpi.
        dpi=(float(dpi[0]), float(dpi[1])) if dpi and min(dpi) > 1 else None,
        full_size=full_size,
        notes=notes,
    )
