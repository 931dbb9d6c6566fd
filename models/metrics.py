"""Image-quality measures reported by training and recorded in the manifest."""

from __future__ import annotations

import numpy as np


def _unit_rgb(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float64) / 255.0
    if rgb.dtype == np.uint16:
        return rgb.astype(np.float64) / 65535.0
    if np.issubdtype(rgb.dtype, np.floating):
        return rgb.astype(np.float64)
    raise ValueError(f"unsupported sample type {rgb.dtype}; expected uint8, uint16 or float")


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003) colourfulness M on the 0-255 scale of the paper.

    0 for a grey image; about 15 "slightly", 33 "moderately", 59 "quite", 82 "highly",
    109 "extremely colourful". Accepts uint8, uint16 or float [0, 1] RGB (H, W, 3).
    """
    unit = _unit_rgb(rgb) * 255.0
    red, green, blue = unit[..., 0], unit[..., 1], unit[..., 2]
    rg = red - green
    yb = 0.5 * (red + green) - blue
    std = np.hypot(rg.std(), yb.std())
    mean = np.hypot(rg.mean(), yb.mean())
    return float(std + 0.3 * mean)


def psnr(prediction: np.ndarray, target: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two RGB images of the same shape (peak = 1.0)."""
    if prediction.shape != target.shape:
        raise ValueError(f"shapes differ: {prediction.shape} vs {target.shape}")
    mse = float(np.mean((_unit_rgb(prediction) - _unit_rgb(target)) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(1.0 / mse))
