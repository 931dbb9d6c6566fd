"""Forward-pass timing of a generator, side by side across batch sizes and precisions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from models.colorize import predict_ab
from models.networks import UNetGenerator

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ForwardTiming:
    batch_size: int
    precision: str
    seconds_per_batch: float  # median over the timed repeats
    images_per_second: float
    mean_abs_ab_diff: float  # vs fp32 on the same input, in Lab units (0 for fp32 itself)


def time_forward(
    generator: UNetGenerator,
    *,
    batch_sizes: list[int],
    precisions: list[str],
    repeats: int = 5,
    device: str = "cpu",
) -> list[ForwardTiming]:
    """Time predict_ab for every (batch size, precision); interleaved so that noise is shared.

    Each combination is warmed up once, then the combinations are timed round-robin, so a
    slow moment on a shared machine hits all of them rather than one.
    """
    unknown = sorted(set(precisions) - PRECISIONS.keys())
    if unknown:
        raise ValueError(f"unknown precision {unknown[0]!r}; choose from {', '.join(PRECISIONS)}")
    size = generator.config.image_size
    generator = generator.to(device).eval()
    torch.manual_seed(0)
    inputs = {b: torch.rand(b, 1, size, size, device=device) * 2 - 1 for b in batch_sizes}
    combos = [(b, p) for b in batch_sizes for p in precisions]
    reference = {b: predict_ab(generator, inputs[b]) for b in batch_sizes}
    outputs = {
        (b, p): predict_ab(generator, inputs[b], autocast_dtype=PRECISIONS[p]) for b, p in combos
    }
    samples: dict[tuple[int, str], list[float]] = {combo: [] for combo in combos}
    for _ in range(repeats):
        for b, p in combos:
            started = time.perf_counter()
            predict_ab(generator, inputs[b], autocast_dtype=PRECISIONS[p])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            samples[(b, p)].append(time.perf_counter() - started)
    results = []
    for b, p in combos:
        median = statistics.median(samples[(b, p)])
        diff = (outputs[(b, p)] - reference[b]).abs().mean().item()
        results.append(ForwardTiming(b, p, median, b / median, diff))
    return results


def sample_crops(count: int, *, size: tuple[int, int], seed: int = 0) -> Iterator[Any]:
    """``count`` colour PIL images of ``size``: random crops of scikit-image's sample photos,
    with the target's aspect ratio, flipped half the time, for variety."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.retina()]
    rng = np.random.default_rng(seed)
    width, height = size
    for index in range(count):
        photo = Image.fromarray(photos[index % len(photos)])
        scale = rng.uniform(0.6, 1.0)
        crop_w = int(min(photo.width, photo.height * width / height) * scale)
        crop_h = int(crop_w * height / width)
        left = int(rng.integers(0, photo.width - crop_w + 1))
        top = int(rng.integers(0, photo.height - crop_h + 1))
        crop = photo.crop((left, top, left + crop_w, top + crop_h)).resize(size)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        yield crop


def sample_jpegs(
    folder: str, count: int, *, size: tuple[int, int] = (512, 384), seed: int = 0
) -> None:
    """Write ``count`` grey JPEG scans of ``size`` made from scikit-image's sample photos."""
    import os

    os.makedirs(folder, exist_ok=True)
    for index, crop in enumerate(sample_crops(count, size=size, seed=seed)):
        crop.convert("L").save(os.path.join(folder, f"scan-{index:05d}.jpg"), quality=90)
