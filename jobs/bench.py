"""Forward-pass timing of a generator, side by side across batch sizes and precisions."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

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
