from __future__ import annotations

import pytest
import torch

from models.config import GeneratorConfig
from models.networks import UNetGenerator, init_weights

SMALL = GeneratorConfig(width=8, depth=5, image_size=32)


@pytest.fixture
def small_generator() -> UNetGenerator:
    """A seeded, initialised generator small enough for many unit tests."""
    torch.manual_seed(0)
    generator = UNetGenerator(SMALL)
    init_weights(generator)
    return generator.eval()
