"""Honour a scan's embedded ICC profile (LittleCMS through Pillow's ImageCms).

Everything after decode treats samples as sRGB-encoded (grey with the sRGB curve, RGB in sRGB),
so a profiled scan is converted here, once:

- Grey scans (Gray Gamma 2.2, dot gain, L*-curve profiles): every grey level is sent through
  LittleCMS to linear luminance, with 16-bit precision, into a per-profile table; the samples
  become 16-bit sRGB-encoded grey, whose L* is the one the profile says.
- RGB photos (Adobe RGB, ProPhoto, ...) and CMYK print scans: converted to sRGB by LittleCMS,
  relative colorimetric. For training targets this gives the right colours; for colourising,
  the right lightness.

No profile, or an sRGB one: the samples are used as they are (sRGB assumed). A profile that
LittleCMS cannot read, or one for another colour space than the image's, is ignored and noted.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageCms

from models.colour import linear_to_srgb

_GREY_MODES = {"L": np.uint8, "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16}


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


@functools.cache
def _linear_grey_profile() -> ImageCms.ImageCmsProfile:
    """A minimal ICC v2 grey profile whose curve is the identity: output samples are Y.

    Pillow builds only sRGB, Lab and XYZ profiles, none of which has a 16-bit Pillow mode;
    this 180-byte profile (header, white point, identity kTRC) lets LittleCMS hand back
    luminance at 16 bits.
    """
    d50 = _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    tags = [(b"wtpt", b"XYZ \0\0\0\0" + d50), (b"kTRC", b"curv\0\0\0\0" + struct.pack(">I", 0))]
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for signature, body in tags:
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body + b"\0" * (-len(body) % 4)
    header = (
        struct.pack(">I", offset + len(data)) + b"\0" * 4 + struct.pack(">I", 0x02100000)
        + b"mntrGRAYXYZ " + b"\0" * 12 + b"acsp" + b"\0" * 28 + d50 + b"\0" * 48
    )  # fmt: skip
    return ImageCms.ImageCmsProfile(io.BytesIO(header + table + data))


@functools.lru_cache(maxsize=32)
def _profile(icc: bytes) -> tuple[ImageCms.ImageCmsProfile, str, str]:
    """(profile, description, colour space) of ICC bytes; raises ImageCms.PyCMSError."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    description = (ImageCms.getProfileDescription(profile) or "").strip() or "unnamed profile"
    space = profile.profile.xcolor_space.strip()
    return profile, description, space


@functools.lru_cache(maxsize=32)
def _grey_table(icc: bytes, mode: str) -> np.ndarray:
    """Every grey level of ``mode`` through the profile -> 16-bit sRGB-encoded grey."""
    profile, _, _ = _profile(icc)
    dtype = _GREY_MODES[mode]
    ramp = np.arange(np.iinfo(dtype).max + 1, dtype=dtype)[None, :]
    ramp_image = Image.fromarray(ramp) if dtype == np.uint8 else Image.fromarray(ramp, "I;16")
    transform = ImageCms.buildTransform(
        profile, _linear_grey_profile(), ramp_image.mode, "I;16",
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
    )  # fmt: skip
    luminance = np.asarray(ImageCms.applyTransform(ramp_image, transform), np.float64)[0]
    encoded = linear_to_srgb(torch.from_numpy(luminance / 65535.0)).numpy()
    table = np.rint(np.clip(encoded, 0.0, 1.0) * 65535).astype(np.uint16)
    table.setflags(write=False)
    return table


@dataclass(frozen=True)
class Managed:
    image: Image.Image  # in sRGB terms (grey scans are converted later, by grey_levels)
    description: str | None  # the embedded profile's name, if it has one
    # L* (H, W) float32 straight from the profile, for colour sources whose colours leave
    # sRGB: converting to sRGB clips them, and with them their lightness (~0.3-0.6 L* on
    # photos read as Adobe RGB); the colourised copy keeps this L*, not the clipped one.
    lightness: np.ndarray | None = None


def manage_colour(image: Image.Image, notes: list[str]) -> Managed:
    """The image in sRGB terms, its profile's name, and for colour sources their L*.

    The image comes back unchanged when it has no profile, an sRGB one, or one that cannot
    be used (noted).
    """
    icc = image.info.get("icc_profile")
    if not icc:
        return Managed(image, None)
    try:
        profile, description, space = _profile(bytes(icc))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as err:
        notes.append(f"embedded ICC profile unreadable ({err}); sRGB assumed")
        return Managed(image, None)
    if description.lower().startswith("srgb"):
        return Managed(image, description)
    wants = {"L": "GRAY", "I;16": "GRAY", "I;16L": "GRAY", "I;16B": "GRAY", "RGB": "RGB",
             "RGBA": "RGB", "CMYK": "CMYK"}.get(image.mode)  # fmt: skip
    if wants is None or space != wants:
        notes.append(f"embedded ICC profile {description!r} is for {space}, not this "
                     f"{image.mode} image; ignored")  # fmt: skip
        return Managed(image, description)
    if wants == "GRAY":
        return Managed(image, description)  # by table, on the samples: see grey_levels
    source = image.convert("RGB") if image.mode == "RGBA" else image
    try:
        converted, lab = (
            ImageCms.profileToProfile(
                source,
                profile,
                ImageCms.createProfile(target),
                renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                outputMode=mode,
            )
            for target, mode in (("sRGB", "RGB"), ("LAB", "LAB"))
        )
    except (ImageCms.PyCMSError, OSError, ValueError) as err:
        notes.append(f"embedded ICC profile {description!r} could not be applied ({err})")
        return Managed(image, description)
    lightness = np.asarray(lab.getchannel(0), np.float32) * np.float32(100.0 / 255.0)
    return Managed(converted, description, lightness)


def grey_levels(
    samples: np.ndarray, image_mode: str, icc: bytes | None, notes: list[str]
) -> np.ndarray:
    """Grey samples as 16-bit sRGB-encoded grey by the scan's own profile (if it is grey)."""
    if not icc or samples.ndim != 2 or image_mode not in _GREY_MODES:
        return samples
    try:
        _, description, space = _profile(bytes(icc))
        if space != "GRAY" or description.lower().startswith("srgb"):
            return samples
        return _grey_table(bytes(icc), image_mode)[samples]
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as err:
        notes.append(f"embedded ICC profile could not be applied ({err}); sRGB assumed")
        return samples
