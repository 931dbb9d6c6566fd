"""Image quality measures shared by training (validation metrics) and colourising (manifest).

- ``colorfulness``: Hasler & Süsstrunk (2003), "Measuring colourfulness in natural images".
  M = σ_rgyb + 0.3 · μ_rgyb over the opponent channels rg = R − G and yb = ½(R + G) − B of
  sRGB values on a 0–255 scale. It is 0 for any neutral grey image; the authors' perceptual
  scale puts "not colourful" at 0, "moderately" near 33 and "extremely" above 109. A
  colouriser trained on L1 alone drifts towards brown-grey, and this number shows it.
- ``psnr``: peak signal-to-noise ratio in dB, with the peak taken from the sample type.

numpy functions take one image of any size, uint8, uint16 or float in [0, 1], and work in
row strips with float64 sums, so a 60-megapixel scan never needs a full float copy.
The ``*_batch`` functions take torch batches (B, 3, H, W) in [0, 1] and return (B,) tensors,
for metrics computed where the images already are (a training worker's device).
"""

from __future__ import annotations

import math

import numpy as np
import torch

DEFAULT_STRIP_ROWS = 512  # float64 working set per strip: 512 rows × width × ~40 bytes
_UNIT_SCALE = 255.0  # Hasler–Süsstrunk is defined on 8-bit sRGB values


def _peak(dtype: np.dtype) -> float:
    """The value of full intensity for a sample type: 255, 65535, or 1.0 for floats."""
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if dtype == np.bool_:
        return 1.0
    if np.issubdtype(dtype, np.floating):
        return 1.0
    raise ValueError(f"unsupported sample type {dtype}; expected uint8, uint16, bool or float")


def _colour_channels(image: np.ndarray) -> np.ndarray | None:
    """(H, W, 3) RGB view of ``image``, or None for a single-channel (grey) image."""
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 2)):
        return None  # grey, or grey + alpha
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[..., :3]  # alpha says nothing about colour
    raise ValueError(
        f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {image.shape}"
    )


def colorfulness(image: np.ndarray, *, strip_rows: int = DEFAULT_STRIP_ROWS) -> float:
    """Hasler–Süsstrunk colourfulness M of one sRGB image, on the paper's 0–255 scale.

    Args:
        image: (H, W, 3) or (H, W, 4) RGB(A), or (H, W) / (H, W, 1) grey (which is 0 by
            definition); uint8, uint16 (scaled to 8-bit units, not clipped), bool, or float in
            [0, 1].
        strip_rows: rows converted to float64 at a time.

    Returns:
        M ≥ 0; 0.0 for an empty or neutral image.
    """
    scale = _UNIT_SCALE / _peak(image.dtype)
    rgb = _colour_channels(image)
    if rgb is None or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return 0.0
    # Sums of x and x² in float64: one pass, bounded memory, and no cancellation worth
    # mentioning for values within ±255 even over hundreds of megapixels.
    sums = np.zeros(4, dtype=np.float64)  # Σrg, Σrg², Σyb, Σyb²
    for top in range(0, rgb.shape[0], strip_rows):
        strip = rgb[top : top + strip_rows].astype(np.float64) * scale
        red, green, blue = strip[..., 0], strip[..., 1], strip[..., 2]
        rg = red - green
        yb = 0.5 * (red + green) - blue
        sums += (rg.sum(), np.square(rg).sum(), yb.sum(), np.square(yb).sum())
    count = rgb.shape[0] * rgb.shape[1]
    mean_rg, mean_yb = sums[0] / count, sums[2] / count
    var_rg = max(sums[1] / count - mean_rg**2, 0.0)
    var_yb = max(sums[3] / count - mean_yb**2, 0.0)
    return float(math.sqrt(var_rg + var_yb) + 0.3 * math.hypot(mean_rg, mean_yb))


def colorfulness_batch(rgb: torch.Tensor) -> torch.Tensor:
    """Colourfulness of each image in a batch: (B, 3, H, W) sRGB in [0, 1] -> (B,) float32.

    Same definition and scale as ``colorfulness``; computed in float32 on the tensor's device
    (model-size images: the error against the float64 version is far below 0.01).
    """
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W), got {tuple(rgb.shape)}")
    values = rgb.float() * _UNIT_SCALE
    red, green, blue = values.unbind(dim=1)
    rg = (red - green).flatten(1)  # (B, H·W)
    yb = (0.5 * (red + green) - blue).flatten(1)
    # Population standard deviation (correction=0), as the paper and the numpy version use.
    sigma = torch.sqrt(rg.var(dim=1, correction=0) + yb.var(dim=1, correction=0))
    mu = torch.hypot(rg.mean(dim=1), yb.mean(dim=1))
    return sigma + 0.3 * mu


def psnr(
    reference: np.ndarray,
    estimate: np.ndarray,
    *,
    data_range: float | None = None,
    strip_rows: int = DEFAULT_STRIP_ROWS,
) -> float:
    """Peak signal-to-noise ratio of ``estimate`` against ``reference``, in dB.

    Args:
        reference, estimate: arrays of the same shape and sample type.
        data_range: the peak value; by default 255 for uint8, 65535 for uint16, 1 for floats.
        strip_rows: rows converted to float64 at a time.

    Returns:
        10·log10(peak² / MSE); ``inf`` when the images are identical.
    """
    if reference.shape != estimate.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {estimate.shape}")
    if reference.dtype != estimate.dtype:
        raise ValueError(f"sample types differ: {reference.dtype} vs {estimate.dtype}")
    if reference.size == 0:
        raise ValueError("images are empty")
    peak = float(data_range) if data_range is not None else _peak(reference.dtype)
    if peak <= 0:
        raise ValueError(f"data_range must be positive, got {peak}")
    squared_error = 0.0
    for top in range(0, reference.shape[0], strip_rows):
        diff = reference[top : top + strip_rows].astype(np.float64) - estimate[
            top : top + strip_rows
        ].astype(np.float64)
        squared_error += float(np.square(diff).sum())
    mse = squared_error / reference.size
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def psnr_batch(
    reference: torch.Tensor, estimate: torch.Tensor, *, data_range: float = 1.0
) -> torch.Tensor:
    """PSNR of each image in a batch (B, ...) -> (B,) float32 dB; ``inf`` where identical."""
    if reference.shape != estimate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(estimate.shape)}")
    mse = (reference.float() - estimate.float()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)  # x / 0 = inf, log10(inf) = inf
