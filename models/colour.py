"""CIE Lab colour science in torch: sRGB (D65) <-> CIE Lab, and the model's normalisation.

Every tensor here is batched or not with the channel dimension third from the end:
(..., 3, H, W) for RGB and Lab, (..., 1, H, W) for L. Everything is differentiable (the
training loop may put a loss in Lab or RGB) and works on any device in float32.

The constants match scikit-image's ``rgb2lab``/``lab2rgb`` (sRGB primaries, D65 white, CIE 1931
2° observer) so that results can be checked against it; this module is the only place they live.
"""

from __future__ import annotations

import numpy as np
import torch

# sRGB primaries to XYZ under D65, the matrix scikit-image uses (IEC 61966-2-1 to 6 digits).
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
# Its inverse, computed once: torch.linalg.inv on every call costs more than the conversion.
_RGB_FROM_XYZ = tuple(tuple(float(v) for v in row) for row in np.linalg.inv(_XYZ_FROM_RGB))
# D65 reference white, CIE 1931 2° observer.
_WHITE_D65 = (0.95047, 1.0, 1.08883)

# CIE constants, exact rationals rather than the rounded 0.008856 / 7.787 of older code.
_EPSILON = 216.0 / 24389.0  # (6/29)^3: where the cube root meets the linear segment
_KAPPA_OVER_116 = (24389.0 / 27.0) / 116.0  # slope of the linear segment of f(t)
_DELTA = 6.0 / 29.0  # f(_EPSILON), the same switch point on the inverse side
_F_OFFSET = 16.0 / 116.0

# Model normalisation: the generator sees L in [-1, 1] and predicts ab in [-1, 1] (tanh).
L_SCALE = 50.0  # L in [0, 100] -> L / 50 - 1 in [-1, 1]
AB_SCALE = 110.0  # ab within about ±110 for sRGB colours -> ab / 110 in [-1, 1]


def _channel_matrix(rows: tuple[tuple[float, ...], ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _apply_matrix(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    # (3, 3) x (..., 3, H, W) -> (..., 3, H, W); einsum keeps any leading batch dims.
    return torch.einsum("ij,...jhw->...ihw", matrix, image)


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB companded values in [0, 1] to linear light."""
    # The clamp keeps pow's gradient finite on the branch torch.where discards.
    curve = ((rgb.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4
    return torch.where(rgb > 0.04045, curve, rgb / 12.92)


def linear_to_srgb(linear: torch.Tensor) -> torch.Tensor:
    """Linear light to sRGB companded values (not clipped)."""
    curve = 1.055 * linear.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055
    return torch.where(linear > 0.0031308, curve, linear * 12.92)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    cube_root = t.clamp(min=_EPSILON) ** (1.0 / 3.0)
    return torch.where(t > _EPSILON, cube_root, _KAPPA_OVER_116 * t + _F_OFFSET)


def _lab_f_inverse(f: torch.Tensor) -> torch.Tensor:
    return torch.where(f > _DELTA, f**3, (f - _F_OFFSET) / _KAPPA_OVER_116)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (..., 3, H, W) -> CIE Lab (L in [0, 100], a and b about ±110)."""
    xyz = _apply_matrix(_channel_matrix(_XYZ_FROM_RGB, rgb), srgb_to_linear(rgb))
    white = torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    fx, fy, fz = _lab_f(xyz / white).unbind(dim=-3)
    lightness = 116.0 * fy - 16.0
    a = 500.0 * (fx - fy)
    b = 200.0 * (fy - fz)
    return torch.stack((lightness, a, b), dim=-3)


def lab_to_linear_rgb(lab: torch.Tensor, *, clip_negative_light: bool = False) -> torch.Tensor:
    """CIE Lab, (..., 3, H, W) -> linear-light sRGB, not clipped (out of gamut: outside [0, 1]).

    sRGB's companding is monotonic and keeps 0 and 1, so whether a colour fits the gamut can
    be told here, before the costly power curve.
    """
    lightness, a, b = lab.unbind(dim=-3)
    fy = (lightness + 16.0) / 116.0
    fx = fy + a / 500.0
    fz = fy - b / 200.0
    white = torch.tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device).view(3, 1, 1)
    if clip_negative_light:
        # Very yellow predictions at low L give fz < 0 (negative light); scikit-image treats
        # them as fz = 0, and so do we, so that clipped colours match the reference.
        fz = fz.clamp(min=0.0)
    xyz = _lab_f_inverse(torch.stack((fx, fy, fz), dim=-3)) * white
    return _apply_matrix(_channel_matrix(_RGB_FROM_XYZ, lab), xyz)


def lab_to_rgb(lab: torch.Tensor, *, clip: bool = True) -> torch.Tensor:
    """CIE Lab, (..., 3, H, W) -> sRGB; clipped to [0, 1] unless ``clip=False``.

    Lab colours outside the sRGB gamut (a generator can predict any ab) have no exact sRGB
    value; clipping is what scikit-image's ``lab2rgb`` does too.
    """
    rgb = linear_to_srgb(lab_to_linear_rgb(lab, clip_negative_light=clip))
    return rgb.clamp(0.0, 1.0) if clip else rgb


def luminance_to_lightness(luminance: torch.Tensor) -> torch.Tensor:
    """Relative luminance Y (white = 1) -> CIE L* in [0, 100]."""
    return 116.0 * _lab_f(luminance) - 16.0


def lightness_to_luminance(lightness: torch.Tensor) -> torch.Tensor:
    """CIE L* -> relative luminance Y (white = 1); the inverse of luminance_to_lightness."""
    return _lab_f_inverse((lightness + 16.0) / 116.0)


def rgb_to_lightness(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (..., 3, H, W) -> L* (..., 1, H, W) without computing a and b.

    Cheaper than rgb_to_lab for full-resolution scans where only L is needed.
    """
    weights = torch.tensor(_XYZ_FROM_RGB[1], dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    luminance = (srgb_to_linear(rgb) * weights).sum(dim=-3, keepdim=True)
    return luminance_to_lightness(luminance)


def grey_to_lightness(grey: torch.Tensor) -> torch.Tensor:
    """sRGB grey levels in [0, 1] (R = G = B) -> L*; same shape.

    The Y row of the sRGB matrix sums to 1, so a neutral grey's luminance is its linear value.
    """
    return luminance_to_lightness(srgb_to_linear(grey))


def lightness_to_grey(lightness: torch.Tensor) -> torch.Tensor:
    """L* -> the sRGB grey level in [0, 1] with that lightness (a = b = 0)."""
    return linear_to_srgb(lightness_to_luminance(lightness)).clamp(0.0, 1.0)


def normalize_l(lightness: torch.Tensor) -> torch.Tensor:
    """L* in [0, 100] -> generator input in [-1, 1]."""
    return lightness / L_SCALE - 1.0


def denormalize_l(l_norm: torch.Tensor) -> torch.Tensor:
    """Generator input in [-1, 1] -> L* in [0, 100]."""
    return (l_norm + 1.0) * L_SCALE


def normalize_ab(ab: torch.Tensor) -> torch.Tensor:
    """ab in Lab units -> generator target in [-1, 1]."""
    return ab / AB_SCALE


def denormalize_ab(ab_norm: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> ab in Lab units."""
    return ab_norm * AB_SCALE


def normalization_spec() -> dict[str, object]:
    """The colour contract a model artifact records, so a loader can check it was trained alike."""
    return {
        "space": "CIELAB",
        "rgb": "sRGB",
        "illuminant": "D65",
        "observer": "2",
        "input": "L/50-1",
        "output": "ab/110",
        "l_scale": L_SCALE,
        "ab_scale": AB_SCALE,
    }


def lab_to_linear_rgb_keep_lightness(lab: torch.Tensor, *, steps: int = 8) -> torch.Tensor:
    """CIE Lab (3, H, W) -> linear-light sRGB in [0, 1]; out-of-gamut colours lose chroma, not L.

    Plain clipping changes a colour's lightness, so a clipped output would no longer carry the
    scan's own L. Here each out-of-gamut pixel keeps its L and hue and gets the largest
    chroma (found by bisection, to 2**-steps of the predicted one) that sRGB can show. The
    test is made in linear light, so the bisection never evaluates the sRGB power curve.
    """
    linear = lab_to_linear_rgb(lab)
    tolerance = 1e-6  # float rounding at the gamut's edge is not "outside"
    outside = ((linear < -tolerance) | (linear > 1.0 + tolerance)).any(dim=-3)  # (H, W)
    if bool(outside.any()):
        lightness = lab[0][outside]  # (n,)
        ab = lab[1:, outside]  # (2, n)
        low = torch.zeros_like(lightness)  # chroma scale known to fit
        high = torch.ones_like(lightness)  # chroma scale known not to fit
        for _ in range(steps):
            middle = (low + high) / 2
            trial = lab_to_linear_rgb(torch.cat((lightness[None], ab * middle))[..., None])
            fits = ((trial >= -tolerance) & (trial <= 1.0 + tolerance)).all(dim=0)[:, 0]
            low = torch.where(fits, middle, low)
            high = torch.where(fits, high, middle)
        fitted = lab_to_linear_rgb(torch.cat((lightness[None], ab * low))[..., None])
        linear[:, outside] = fitted[..., 0]
    return linear.clamp_(0.0, 1.0)


# Linear light in 65,536 steps -> 8-bit sRGB. A step moves the companded value by at most
# 12.92 / 65535 (the curve's steepest slope, at black): 0.05 of an 8-bit level, so a lookup
# differs from rounding the exact curve only for values within 0.025 of a level's edge. It
# replaces a float power over every pixel (7 ms of a 512×384 merge, measured, 1 thread).
LINEAR_STEPS = 65535


def _srgb8_lookup_table() -> np.ndarray:
    linear = torch.arange(LINEAR_STEPS + 1, dtype=torch.float64) / LINEAR_STEPS
    return torch.round(linear_to_srgb(linear) * 255.0).to(torch.uint8).numpy()


_SRGB8_FROM_LINEAR = _srgb8_lookup_table()


def linear_to_srgb8(linear: torch.Tensor) -> np.ndarray:
    """Linear light in [0, 1], any shape -> 8-bit sRGB (uint8 numpy array of that shape)."""
    index = (linear.clamp(0.0, 1.0) * LINEAR_STEPS + 0.5).to(torch.int32).numpy()
    return _SRGB8_FROM_LINEAR[index]


def lab_to_rgb_keep_lightness(lab: torch.Tensor, *, steps: int = 8) -> torch.Tensor:
    """CIE Lab (3, H, W) -> sRGB in [0, 1], reducing chroma (not L) of out-of-gamut colours."""
    return linear_to_srgb(lab_to_linear_rgb_keep_lightness(lab, steps=steps)).clamp_(0.0, 1.0)
