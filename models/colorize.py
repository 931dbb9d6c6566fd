"""Colourise one image, no Ray: the three steps every later stage calls.

1. ``prepare_lightness`` — full-resolution L* of a grey or colour image, and the model-size
   normalised L the generator sees (this is what travels between pipeline stages).
2. ``predict_ab`` — a batch of model-size L -> ab, under inference mode, optionally autocast.
3. ``merge_full_resolution`` — upsample ab to the full size and merge with the source's own L,
   in row strips so that a 60-megapixel scan never needs more than one strip of float colour.

``colorize_image`` composes them for a single array.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from models.colour import (
    denormalize_ab,
    grey_to_lightness,
    lab_to_linear_rgb_keep_lightness,
    lab_to_rgb_keep_lightness,
    linear_to_srgb8,
    normalize_l,
    rgb_to_lightness,
)
from models.merge_kernel import merge_rows_srgb

# Pixels converted at once: bounds the float working set (~100 bytes a pixel across the
# temporaries of Lab -> sRGB) to ~100 MB whatever the scan's width.
STRIP_PIXELS = 1 << 20
# Floats any resampling buffer may hold (128 MB). Ordinary scans (up to 30,000 px a side at a
# 256 model size) stay under it and take the one-call path; extreme shapes are tiled.
INTERMEDIATE_FLOATS = 1 << 25


def _strip_rows(width: int, strip_rows: int | None) -> int:
    return strip_rows or max(1, STRIP_PIXELS // max(width, 1))


@dataclass(frozen=True)
class PreparedImage:
    """A source reduced to what colourising it needs."""

    lightness: np.ndarray  # (H, W) float32 L* in [0, 100] at full resolution
    l_model: np.ndarray  # (1, S, S) float32 normalised L in [-1, 1] at model size
    dtype: np.dtype  # the source's sample type, which the output keeps (uint8, uint16, float32)


def _to_unit_float(image: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    """Scale samples to [0, 1] float32 and say which dtype the output should have."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0, np.dtype(np.uint8)
    if image.dtype == np.uint16:
        # 16-bit scans are scaled, never clipped to 8 bits: their tonal range is the point.
        return image.astype(np.float32) / 65535.0, np.dtype(np.uint16)
    if image.dtype == np.bool_:
        return image.astype(np.float32), np.dtype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        values = image.astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            raise ValueError("image has NaN or infinite samples")
        if values.size and (values.min() < 0.0 or values.max() > 1.0):
            raise ValueError(
                f"float images must be in [0, 1], got [{values.min():.3g}, {values.max():.3g}]"
            )
        return values, np.dtype(np.float32)
    raise ValueError(
        f"unsupported sample type {image.dtype}; expected uint8, uint16, bool or float"
    )


@functools.cache
def _grey_lightness_table(dtype: np.dtype) -> np.ndarray:
    """L* of every grey level of an unsigned integer dtype, by the same computation as a strip."""
    unit, _ = _to_unit_float(np.arange(np.iinfo(dtype).max + 1, dtype=dtype))
    table = grey_to_lightness(torch.from_numpy(unit)).numpy()
    table.setflags(write=False)
    return table


def image_to_lightness(image: np.ndarray, *, strip_rows: int | None = None) -> np.ndarray:
    """Grey (H, W) / (H, W, 1) or colour (H, W, 3) / (H, W, 4) -> L* (H, W) float32.

    A colour or sepia scan keeps only its lightness: the model decides the colours. Alpha is
    ignored. Converted in strips of rows to bound the float working memory on huge scans.
    """
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        channels = image.shape[2]
    elif image.ndim == 2:
        channels = 1
    else:
        raise ValueError(
            "expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
            f"got {image.shape}"
        )
    height, width = image.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"image is empty: {width}×{height}")
    if channels == 1 and image.dtype in (np.uint8, np.uint16):
        # Most scans: 8- or 16-bit grey has at most 65,536 levels, each with one L*.
        return _grey_lightness_table(image.dtype)[image.reshape(height, width)]
    strip_rows = _strip_rows(width, strip_rows)
    lightness = np.empty((height, width), dtype=np.float32)
    for top in range(0, height, strip_rows):
        strip, _ = _to_unit_float(image[top : top + strip_rows])
        samples = torch.from_numpy(np.ascontiguousarray(strip))
        if channels == 1:
            rows = grey_to_lightness(samples.reshape(samples.shape[0], width))
        else:
            rgb = samples[..., :3].permute(2, 0, 1)  # (3, h, W)
            rows = rgb_to_lightness(rgb)[0]
        lightness[top : top + strip_rows] = rows.numpy()
    return lightness


def lightness_to_model_input(lightness: np.ndarray, image_size: int) -> np.ndarray:
    """L* (H, W) -> normalised L (1, S, S), area-filtered so downscaling does not alias.

    torch's antialiased resize filters the width first, through an (H, S) float buffer: for
    a 1 × 20,000,000 scan that is 20 GB. A scan that tall is resized transposed, so that the
    buffer is (W, S); any shape then costs about its own pixel count.
    """
    tensor = torch.from_numpy(lightness)[None, None]  # (1, 1, H, W)
    height, width = lightness.shape
    tall = height > width and height * image_size > INTERMEDIATE_FLOATS
    if tall:
        tensor = tensor.transpose(-1, -2)  # (1, 1, W, H)
    resized = F.interpolate(
        tensor, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
    )
    if tall:
        resized = resized.transpose(-1, -2)
    return normalize_l(resized[0]).clamp(-1.0, 1.0).contiguous().numpy()  # (1, S, S)


def prepare_image(
    image: np.ndarray, image_size: int, *, strip_rows: int | None = None
) -> PreparedImage:
    """Everything colourising needs from a decoded image (see PreparedImage)."""
    _, dtype = _to_unit_float(image[:1, :1])
    lightness = image_to_lightness(image, strip_rows=strip_rows)
    return PreparedImage(
        lightness=lightness, l_model=lightness_to_model_input(lightness, image_size), dtype=dtype
    )


def predict_ab(
    generator: nn.Module,
    l_model: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(B, 1, S, S) normalised L -> (B, 2, S, S) float32 ab in Lab units.

    The generator must be in eval mode (BatchNorm running stats, no dropout). ``autocast_dtype``
    (torch.bfloat16 or torch.float16) runs the convolutions in reduced precision on the tensor's
    device; the result is returned in float32 either way.
    """
    with torch.inference_mode():
        if autocast_dtype is None:
            ab_norm = generator(l_model)
        else:
            with torch.autocast(device_type=l_model.device.type, dtype=autocast_dtype):
                ab_norm = generator(l_model)
        return denormalize_ab(ab_norm.float())


def cast_convolutions(generator: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Store the convolutions' weights and biases in ``dtype`` (in place; returns generator).

    For inference under autocast to ``dtype``: autocast casts those float32 parameters on every
    forward pass (5% of a CPU forward at batch 8, measured); cast once, they give the same
    values. Normalisation layers keep float32, as autocast leaves them.
    """
    if dtype is not None:
        for module in generator.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                module.to(dtype)
    return generator


def _row_interpolation(
    out_rows: int, in_rows: int, start: int = 0, stop: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of bilinear resampling with align_corners=False, as torch does,
    for output rows ``start:stop`` (all by default)."""
    scale = in_rows / out_rows
    index = np.arange(start, out_rows if stop is None else stop, dtype=np.float64)
    source = np.maximum((index + 0.5) * scale - 0.5, 0.0)
    row0 = np.minimum(source.astype(np.int64), in_rows - 1)
    row1 = np.minimum(row0 + 1, in_rows - 1)
    weight = (source - row0).astype(np.float32)
    return row0, row1, weight


def merge_full_resolution(
    lightness: np.ndarray,
    ab: np.ndarray,
    *,
    dtype: np.dtype | type = np.uint8,
    strip_rows: int | None = None,
    reference: bool = False,
    column_tile: int | None = None,
    threads: int = 1,
) -> np.ndarray:
    """Full-resolution L* (H, W) + model-size ab (2, s, s) -> sRGB (H, W, 3) of ``dtype``.

    ``column_tile`` forces column tiles of that width (tests); by default only widths whose
    widened ab would pass INTERMEDIATE_FLOATS are tiled.

    ab is upsampled bilinearly (identical to one F.interpolate over the whole image) but one
    strip of rows at a time, so the float working set is a strip, not the scan. The source's
    own L is kept: colours outside sRGB lose chroma, never lightness.

    8- and 16-bit output go through the compiled kernel (models.merge_kernel), on ``threads``
    bands of rows, unless ``reference`` asks for the torch computation it must match (value
    for value at 8 bits; at 16, within 1 of 65,535 on the rare pixels where two powf
    implementations differ in the last bit).
    """
    height, width = lightness.shape
    if ab.ndim != 3 or ab.shape[0] != 2:
        raise ValueError(f"ab must have shape (2, h, w), got {ab.shape}")
    out_dtype = np.dtype(dtype)
    if out_dtype == np.uint8:
        peak = 255.0
    elif out_dtype == np.uint16:
        peak = 65535.0
    elif out_dtype == np.float32:
        peak = 0.0
    else:
        raise ValueError(f"output dtype must be uint8, uint16 or float32, got {out_dtype}")
    ab_float = torch.tensor(ab, dtype=torch.float32)  # a copy: ab may be a read-only view
    row0, row1, row_weight = _row_interpolation(height, ab.shape[1])
    # A scan shorter than the model size mixes only some of ab's rows: widen just those (a
    # 2-row, 16-million-column scan would otherwise widen all 256 of them).
    used = np.unique(np.concatenate((row0, row1)))
    if len(used) < ab.shape[1]:
        ab_float = ab_float[:, torch.from_numpy(used)]
        row0, row1 = np.searchsorted(used, row0), np.searchsorted(used, row1)
    row_weights = (row0, row1, row_weight)
    output = np.empty((height, width, 3), dtype=out_dtype)
    # ab is widened to the output's width before the rows are mixed: (2, h, W) is small for
    # any real scan (h is the model size), but 32 GB for a 16,000,000 × 2 one. Such widths
    # are done in column tiles, each widened on its own, so memory follows the pixel count;
    # every column is computed the same way whatever the tiling, so tiles never show.
    tile = column_tile or max(1, INTERMEDIATE_FLOATS // (2 * ab_float.shape[1]))
    for left in range(0, width, tile):
        columns = slice(left, min(left + tile, width))
        col0, col1, col_weight = _row_interpolation(width, ab.shape[2], left, columns.stop)
        w = torch.from_numpy(col_weight).view(1, 1, -1)
        left_cols, right_cols = torch.from_numpy(col0), torch.from_numpy(col1)
        ab_wide = ab_float[:, :, left_cols] * (1.0 - w) + ab_float[:, :, right_cols] * w
        _merge_columns(
            lightness[:, columns],
            ab_wide,
            row_weights,
            output[:, columns],
            peak=peak,
            strip_rows=strip_rows,
            reference=reference,
            threads=threads,
        )
    return output


def _merge_columns(
    lightness: np.ndarray,
    ab_wide: torch.Tensor,
    row_weights: tuple[np.ndarray, np.ndarray, np.ndarray],
    output: np.ndarray,
    *,
    peak: float,
    strip_rows: int | None,
    reference: bool,
    threads: int = 1,
) -> None:
    """Fill ``output`` (H, T, 3), a view, from L* (H, T) and width-resampled ab (2, h, T)."""
    height, width = lightness.shape
    row0, row1, weight = row_weights
    if output.dtype in (np.uint8, np.uint16) and not reference:
        # The usual output: one compiled pass, no float working set at all (same values; at
        # 16 bits within 1 of 65,535 where libm's powf and torch's differ in the last bit).
        merge_rows_srgb(lightness, ab_wide.numpy(), row_weights, output, threads=threads)
        return
    strip_rows = _strip_rows(width, strip_rows)
    for top in range(0, height, strip_rows):
        rows = slice(top, min(top + strip_rows, height))
        w = torch.from_numpy(weight[rows]).view(1, -1, 1)
        ab_rows = ab_wide[:, row0[rows]] * (1.0 - w) + ab_wide[:, row1[rows]] * w  # (2, h, T)
        lab = torch.cat(
            (torch.from_numpy(np.ascontiguousarray(lightness[rows]))[None], ab_rows), dim=0
        )
        if output.dtype == np.uint8:  # a table lookup, not a power curve
            linear = lab_to_linear_rgb_keep_lightness(lab).permute(1, 2, 0)  # (h, T, 3)
            output[rows] = linear_to_srgb8(linear)
            continue
        rgb = lab_to_rgb_keep_lightness(lab).permute(1, 2, 0).numpy()  # (h, T, 3) in [0, 1]
        output[rows] = rgb if peak == 0.0 else np.rint(rgb * peak)


def colorize_image(
    generator: nn.Module,
    image: np.ndarray,
    *,
    image_size: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    strip_rows: int | None = None,
) -> np.ndarray:
    """Colourise a grey or colour image of any size; the result has the same height and width.

    Args:
        generator: a UNetGenerator in eval mode.
        image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); uint8, uint16, bool or float in [0, 1].
        image_size: the model's input size; defaults to ``generator.config.image_size``.
        device: where the generator runs; it must already be there.
        autocast_dtype: reduced precision for the forward pass (see predict_ab).
        strip_rows: rows per strip for the full-resolution conversions.

    Returns:
        (H, W, 3) sRGB with the source's sample type (uint8 for bool), whose L* is the source's.
    """
    size = image_size or generator.config.image_size
    prepared = prepare_image(image, size, strip_rows=strip_rows)
    l_model = torch.from_numpy(prepared.l_model)[None].to(device)  # (1, 1, S, S)
    ab = predict_ab(generator, l_model, autocast_dtype=autocast_dtype)[0].cpu().numpy()
    return merge_full_resolution(
        prepared.lightness, ab, dtype=prepared.dtype, strip_rows=strip_rows
    )
