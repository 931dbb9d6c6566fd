"""Architecture configuration: what a generator or discriminator is built from.

Frozen dataclasses: they travel to Ray workers and into model.json, and must not change under
a model that was built from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_MODEL_NAME = "chromascan-pix2pix"  # the first half of a model id when none is given


@dataclass(frozen=True)
class GeneratorConfig:
    """The pix2pix U-Net. The defaults are the reference model of DESIGN.md (54,409,858 params)."""

    in_channels: int = 1  # L only: the grey scan is all the generator sees
    out_channels: int = 2  # a and b: L is copied from the source, never predicted
    width: int = 64  # channels of the first block; later blocks double it, capped at 8×
    depth: int = 8  # stride-2 down blocks; the innermost feature map is image_size / 2**depth
    image_size: int = 256  # side of the square the model sees; scans are resized to it
    dropout: float = 0.5  # in the innermost up blocks: pix2pix's only source of noise
    dropout_blocks: int = 3  # how many of the innermost up blocks get dropout

    @classmethod
    def sized(cls, *, width: int, depth: int, image_size: int) -> GeneratorConfig:
        """A U-Net of this size with dropout in 3 innermost up blocks (fewer when shallow)."""
        return cls(width=width, depth=depth, image_size=image_size,
                   dropout_blocks=min(3, depth - 2))  # fmt: skip

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError("in_channels and out_channels must be at least 1")
        if self.width < 1:
            raise ValueError(f"width must be at least 1, got {self.width}")
        if self.depth < 2:
            raise ValueError(f"depth must be at least 2 (outer and inner block), got {self.depth}")
        if self.image_size < 2**self.depth or self.image_size % 2**self.depth:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of 2**depth = {2**self.depth}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.dropout_blocks <= self.depth - 2:
            raise ValueError(
                f"dropout_blocks must be between 0 and depth - 2 = {self.depth - 2}, "
                f"got {self.dropout_blocks}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorConfig:
        """Build from model.json, refusing unknown keys rather than silently dropping them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown generator config keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The 70×70 PatchGAN. The defaults give 2,765,633 params and 30×30 logits at 256²."""

    in_channels: int = 3  # L and ab together: the discriminator judges the pair
    width: int = 64  # channels of the first layer; doubled per layer, capped at 8×
    layers: int = 3  # stride-2 layers after the first; 3 gives the 70×70 receptive field

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.width < 1:
            raise ValueError("in_channels and width must be at least 1")
        if self.layers < 1:
            raise ValueError(f"layers must be at least 1, got {self.layers}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
