"""Decode scans robustly: whatever Pillow can open, reduced to grey or RGB samples.

Archives hold 16-bit greyscale TIFFs, bilevel scans, palette GIFs, CMYK JPEGs, EXIF-rotated
camera copies and the odd corrupt or hostile file. Everything here either returns a
DecodedImage with orientation applied and samples as uint8 or uint16 (16-bit stays 16-bit,
scaled, never clipped), or raises DecodeError naming the problem; it never returns half an
image, and no other exception leaves ``decode_image``.

Metadata is carried over only where it is valid: EXIF that cannot be written back, an
orientation outside 1-8 or an implausible resolution is dropped (only the faulty part where
possible) and said in ``notes``; the pixels are still coloured.

Work is bounded before the decoder starts: files whose header declares far more pixels than
their bytes can hold (``ImplausibleSize``) and progressive JPEGs with more scans than any
encoder writes (``DecodeBudgetExceeded``) are refused from their headers.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tifffile
from PIL import ExifTags, Image, UnidentifiedImageError

from models.colorize import image_to_lightness
from pipeline.icc import Managed, grey_levels, manage_colour
from pipeline.rights import SourceMetadata, read_source_metadata

# 300 megapixels: above any flatbed or camera scan (a 10,000 × 30,000 panorama), below what
# would exhaust a worker. The one pixel limit: Pillow's own bomb check (179 MP) is off during
# decode, or it would refuse real archive scans at open or at load.
DEFAULT_MAX_PIXELS = 300_000_000

# Progressive JPEG scans, at most. Each scan is a pass over every coefficient, so a file of
# 20,000 tiny scans costs minutes to decode (seen: 726 KB, ~50 s). libjpeg's default script
# writes 10 scans (6 for grey); one scan per coefficient and component is 192.
MAX_JPEG_SCANS = 256
# A Huffman-coded JPEG spends at least one bit on every 8×8 luma block (its DC difference),
# so a complete one holds at most 512 pixels a byte (a blank page, optimised, is ~256).
_JPEG_MAX_PIXELS_PER_BYTE = 512
# Deflate cannot compress better than 1032:1 (a 258-byte match in two bits per symbol), so a
# PNG smaller than its raw rows / 1032 is truncated or lies about its size.
_DEFLATE_MAX_RATIO = 1032
# Scanners resolve at most a few thousand dpi (microfilm: ~10,000); beyond this it is noise.
_MAX_DPI = 100_000.0

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_COLOUR_MODES_TO_RGB = ("RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "P", "PA", "La")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
_ORIENTATION = ExifTags.Base.Orientation
_SUB_IFDS = (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo)
# EXIF orientation -> the transpose that shows the picture upright (as ImageOps does).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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
    metadata: SourceMetadata = field(default_factory=SourceMetadata)  # rights XMP, IPTC-IIM
    icc_description: str | None = None  # the embedded ICC profile's name (applied if usable)
    # L* (H, W) float32 from the profile, for profiled colour sources (pipeline.icc.Managed);
    # None: L* is that of ``pixels`` as sRGB.
    lightness: np.ndarray | None = None

    def source_lightness(self) -> np.ndarray:
        """L* (H, W) float32 of the source, as its profile says (sRGB without one)."""
        if self.lightness is not None:
            return self.lightness
        return image_to_lightness(self.pixels)

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


# --- header checks: refuse from the first bytes what would cost minutes or gigabytes ------


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR, or None if not a PNG."""
    if data[:8] != _PNG_SIGNATURE or len(data) < 26 or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def _jpeg_scans(data: bytes) -> tuple[int, bool]:
    """(progressive scans, arithmetic-coded) of a JPEG; scans counted from the first SOS.

    Inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so every
    0xFFDA after the first scan's header is a real start-of-scan.
    """
    first = data.find(b"\xff\xda")
    scans = 0 if first < 0 else 1 + len(re.findall(b"\xff\xda", data[first + 2 :]))
    # SOF9-SOF15 (but not DHT's 0xC4, JPG's 0xC8, DAC's 0xCC) are arithmetic-coded frames.
    arithmetic = re.search(b"\xff[\xc9\xca\xcb\xcd\xce\xcf]", data[: first if first > 0 else None])
    return scans, arithmetic is not None


def _check_declared_size(data: bytes, image_format: str, width: int, height: int) -> None:
    """Refuse a file whose header declares more pixels than its bytes could ever encode."""
    pixels = width * height
    if image_format == "PNG" and (header := _png_header(data)) is not None:
        _, _, depth, colour = header
        row_bytes = 1 + math.ceil(width * _PNG_CHANNELS.get(colour, 1) * max(depth, 1) / 8)
        needed = height * row_bytes // _DEFLATE_MAX_RATIO
        if len(data) < needed:
            raise DecodeError(
                f"its header declares {width}×{height} pixels, which need at least "
                f"{needed:,} bytes of PNG data; the file has {len(data):,} (truncated, or a "
                "false header)",
                error_type="ImplausibleSize",
            )
    if image_format in ("JPEG", "MPO"):
        scans, arithmetic = _jpeg_scans(data)
        if scans > MAX_JPEG_SCANS:
            raise DecodeError(
                f"progressive JPEG with {scans:,} scans; more than {MAX_JPEG_SCANS} would make "
                "its decode cost grow without bound, and no encoder writes that many",
                error_type="DecodeBudgetExceeded",
            )
        needed = pixels // _JPEG_MAX_PIXELS_PER_BYTE
        if not arithmetic and len(data) < needed:
            raise DecodeError(
                f"its header declares {width}×{height} pixels, which need at least "
                f"{needed:,} bytes of JPEG data; the file has {len(data):,} (truncated, or a "
                "false header)",
                error_type="ImplausibleSize",
            )


# --- metadata: keep what is valid, say what was dropped ------------------------------------


def _serialises(exif: Image.Exif) -> bool:
    try:
        exif.tobytes()
    except Exception:  # Pillow raises many types for one unwritable tag
        return False
    return True


def _tag_name(tag: int) -> str:
    try:
        return ExifTags.TAGS.get(tag) or ExifTags.GPSTAGS.get(tag) or f"0x{tag:04X}"
    except TypeError:
        return repr(tag)


def _writable_sub_ifd(exif: Image.Exif, tag: int, dropped: list[str]) -> dict[int, Any]:
    """The entries of the Exif or GPS sub-IFD ``tag`` that serialise; names the others."""
    try:
        entries = dict(exif.get_ifd(tag))
    except Exception:
        dropped.append(_tag_name(tag))
        return {}
    kept = {}
    for sub_tag, sub_value in entries.items():
        probe = Image.Exif()
        probe[tag] = {sub_tag: sub_value}
        if _serialises(probe):
            kept[sub_tag] = sub_value
        else:
            dropped.append(_tag_name(sub_tag))
    return kept


def _writable_exif(exif: Image.Exif, notes: list[str]) -> bytes | None:
    """The source's EXIF as bytes to embed, orientation reset; faulty tags dropped, noted.

    Pillow reads EXIF that it cannot write back (a ResolutionUnit of 70,000, a string
    resolution, a sub-IFD at a negative offset): such tags are left out one by one, and
    everything that does serialise is kept.
    """
    try:
        if _ORIENTATION in exif:
            exif[_ORIENTATION] = 1  # orientation already applied to the pixels
        if not exif:
            return None
        return exif.tobytes()
    except Exception:  # rebuilt tag by tag below
        pass
    clean, dropped = Image.Exif(), []
    try:
        items = list(exif.items())
    except Exception:
        notes.append("EXIF dropped: it cannot be read back")
        return None
    for tag, value in items:
        if tag in _SUB_IFDS:
            kept = _writable_sub_ifd(exif, tag, dropped)
            if kept:
                clean[tag] = kept
            continue
        probe = Image.Exif()
        probe[tag] = value
        if _serialises(probe):
            clean[tag] = value
        else:
            dropped.append(_tag_name(tag))
    if dropped:
        notes.append(f"EXIF tags dropped (not writable as found): {', '.join(dropped[:20])}")
    if not clean or not _serialises(clean):
        if clean:
            notes.append("EXIF dropped: it cannot be written back")
        return None
    return clean.tobytes()


def _orientation(exif: Image.Exif | None, notes: list[str]) -> int:
    if exif is None:
        return 1
    try:
        value = exif.get(_ORIENTATION, 1)
    except Exception:
        value = None
    if isinstance(value, int) and 1 <= value <= 8:
        return value
    notes.append(f"EXIF orientation {value!r} is not 1-8: shown as stored")
    return 1


def _dpi(value: Any, notes: list[str]) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        x, y = (float(v) for v in value)
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        x = y = math.nan
    # TIFF writers often store 1×1 "dpi" meaning "unknown"; no scan is 1 dpi.
    if math.isfinite(x) and math.isfinite(y) and min(x, y) > 1 and max(x, y) <= _MAX_DPI:
        return (x, y)
    if not (math.isfinite(x) and math.isfinite(y) and max(x, y) <= 1):
        notes.append(f"resolution {value!r} dpi dropped: not a plausible scan resolution")
    return None


def _page_count(image: Image.Image, notes: list[str]) -> int:
    """Frames in the file. Counting reads every page header; a damaged later page (or
    next-page pointer) must not cost the first page, which is all we colour."""
    try:
        return max(1, int(getattr(image, "n_frames", 1)))
    except Exception as err:
        notes.append(f"page count unknown (a later page is damaged: {type(err).__name__})")
        return 1
    finally:
        with contextlib.suppress(Exception):  # the first page stays where open() put it
            image.seek(0)


def _drop_malformed_xmp(image: Image.Image, notes: list[str]) -> None:
    """An XMP that is not text (a TIFF tag 700 of the wrong type) makes Pillow's own
    orientation lookup raise during load: drop it, the pixels are fine."""
    for key in ("xmp", "XML:com.adobe.xmp"):
        value = image.info.get(key)
        if value is not None and not isinstance(value, bytes | str):
            del image.info[key]
            notes.append(f"source XMP dropped: stored as {type(value).__name__}, not text")


def _metadata(image: Image.Image, notes: list[str]) -> SourceMetadata:
    """The source's XMP and IPTC-IIM; a reader that chokes on them costs only the metadata."""
    try:
        return read_source_metadata(image, notes)
    except Exception as err:
        notes.append(f"source XMP and IPTC dropped: unreadable ({type(err).__name__})")
        return SourceMetadata()


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open, then the checks that need only the header: size limits and plausibility."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            f"{width}×{height} = {width * height / 1e6:.0f} MP exceeds the limit of "
            f"{max_pixels / 1e6:.0f} MP",
            error_type="ImageTooLarge",
        )
    if width == 0 or height == 0:
        raise DecodeError(f"image has no pixels ({width}×{height})", error_type="EmptyImage")
    _check_declared_size(data, image.format or "unknown", width, height)
    return image


# numpy versions of the EXIF-orientation transposes, for samples Pillow does not hold.
_NUMPY_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _deep_rgb_tiff(data: bytes, image: Image.Image) -> np.ndarray | None:
    """A 48-bit RGB TIFF's first page at full depth, upright, or None for any other file.

    Pillow opens 16-bit-per-channel RGB as 8-bit RGB, which would throw away the master's
    tonal range: tifffile reads the samples as stored, and the orientation is applied here.
    """
    if image.format != "TIFF" or image.mode != "RGB":
        return None
    if tuple(image.tag_v2.get(258, ())) != (16, 16, 16):
        return None
    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        samples = tiff.pages[0].asarray()
    if samples.ndim == 3 and samples.shape[0] == 3 and samples.shape[-1] != 3:
        samples = np.moveaxis(samples, 0, -1)  # planar configuration 2: (3, H, W)
    if samples.ndim != 3 or samples.shape[-1] != 3 or samples.dtype != np.uint16:
        return None
    orientation = image.tag_v2.get(274, 1)
    upright = _NUMPY_UPRIGHT.get(orientation, lambda a: a)(samples)
    return np.ascontiguousarray(upright)


def _load_upright(
    image: Image.Image, draft_size: int | None, notes: list[str]
) -> tuple[np.ndarray, Image.Exif | None, tuple[int, int], tuple[Any, Managed]]:
    """(samples upright and in sRGB terms, EXIF, full upright size, (dpi, colour management))
    of an opened image."""
    width, height = image.size
    drafted = bool(draft_size) and image.format == "JPEG"
    if drafted:
        image.draft(image.mode, (draft_size, draft_size))
    image.load()
    # Read after load: some readers (TIFF) turn the pixels upright while loading, by the
    # TIFF tag or an XMP tiff:Orientation, and then drop the tag themselves.
    try:
        exif: Image.Exif | None = image.getexif()
    except Exception as err:
        exif = None
        notes.append(f"EXIF dropped: unreadable ({type(err).__name__})")
    orientation = _orientation(exif, notes)
    dpi = _dpi(image.info.get("dpi"), notes)
    icc, mode = image.info.get("icc_profile"), image.mode
    if (transpose := _TRANSPOSE.get(orientation)) is not None:
        image = image.transpose(transpose)
    managed = manage_colour(image, notes)
    pixels = grey_levels(_samples(managed.image), mode, icc, notes)
    if drafted:  # decoded at 1/2-1/8 scale: the full size is the header's, upright
        full_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    else:  # the pixels themselves are the truth, whoever turned them
        full_size = (pixels.shape[1], pixels.shape[0])
    return pixels, exif, full_size, (dpi, managed)


class _PillowLimitOff:
    """Pillow's process-wide bomb limit off while any decode runs: our own max_pixels is the
    one limit. Counted under a lock, because decodes overlap in threads (Ray Data runs tasks
    and actors in a pool of threads in one process): a plain save-and-restore lets a thread
    that started inside another's window "restore" None and leave the limit off for good."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: int | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._inside == 0:
                self._saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None  # also silences DecompressionBombWarning
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    Image.MAX_IMAGE_PIXELS = self._saved


_pillow_unlimited = _PillowLimitOff()


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
        DecodeError: the bytes are not a decodable image, it is too large, or it would cost
            more than any real scan to decode. Nothing else: whatever a malformed file makes
            Pillow raise becomes a DecodeError named after it.
    """
    if not data:
        raise DecodeError("file is empty", error_type="EmptyFile")
    notes: list[str] = []
    try:
        with _pillow_unlimited():
            image = _open_checked(data, max_pixels)
            source_format = image.format or "unknown"
            source_mode = image.mode
            pages = _page_count(image, notes)
            _drop_malformed_xmp(image, notes)
            metadata = _metadata(image, notes)
            deep = _deep_rgb_tiff(data, image)
            pixels, exif, full_size, (dpi, managed) = _load_upright(image, draft_size, notes)
            icc, lightness = managed.description, managed.lightness
            if deep is not None:  # Pillow's 8-bit reading gave the EXIF, dpi and size
                pixels, bits, lightness = deep, 16, None
                if icc and not icc.lower().startswith("srgb"):
                    notes.append(
                        f"ICC profile {icc!r} not applied: LittleCMS through Pillow converts "
                        "8-bit RGB only, and 48-bit samples stay as stored"
                    )
            else:
                bits = _bits_for(source_mode)
    except DecodeError:
        raise
    except UnidentifiedImageError as err:
        # Pillow refuses any image with a zero side before our size check can see it, and
        # says only "cannot identify"; a PNG header that declares no pixels is worth naming.
        header = _png_header(data)
        if header is not None and 0 in header[:2]:
            raise DecodeError(
                f"image has no pixels (its PNG header declares {header[0]}×{header[1]})",
                error_type="EmptyImage",
            ) from err
        raise DecodeError(
            f"not an image format this installation can read (file starts with {data[:12]!r})",
            error_type=type(err).__name__,
        ) from err
    except MemoryError as err:
        raise DecodeError(
            "not enough memory to decode this image", error_type="OutOfMemory"
        ) from err
    except Exception as err:  # any reader error is this file's, not the run's
        # Pillow's plugins raise OSError, ValueError, SyntaxError, EOFError, struct.error,
        # IndexError, TypeError, KeyError, NotImplementedError... for malformed files.
        raise DecodeError(
            f"cannot decode: {err}" if str(err) else f"cannot decode ({type(err).__name__})",
            error_type=type(err).__name__,
        ) from err
    if pages > 1:
        notes.insert(0, f"multi-page file: first of {pages} pages used")
    exif_bytes = _writable_exif(exif, notes) if exif is not None else None
    return DecodedImage(
        pixels=pixels,
        format=source_format,
        mode=source_mode,
        bits=bits,
        pages=pages,
        exif=exif_bytes,
        dpi=dpi,
        full_size=full_size,
        notes=tuple(notes),
        metadata=metadata,
        icc_description=icc,
        lightness=lightness,
    )
