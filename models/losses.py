"""pix2pix objectives: adversarial loss on logits, plus λ·L1 on ab for the generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

L1_WEIGHT = 100.0  # λ in Isola et al.: L1 keeps colours close, the GAN term keeps them vivid


def adversarial_loss(logits: torch.Tensor, *, real: bool) -> torch.Tensor:
    """BCE on raw logits (numerically stable; the discriminator has no sigmoid)."""
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


@dataclass(frozen=True)
class GeneratorLoss:
    total: torch.Tensor
    adversarial: torch.Tensor
    l1: torch.Tensor


def generator_loss(
    fake_logits: torch.Tensor,
    ab_pred: torch.Tensor,
    ab_true: torch.Tensor,
    *,
    l1_weight: float = L1_WEIGHT,
) -> GeneratorLoss:
    """Fool the discriminator, and stay close to the true ab (both normalised to [-1, 1])."""
    adversarial = adversarial_loss(fake_logits, real=True)
    l1 = F.l1_loss(ab_pred, ab_true)
    return GeneratorLoss(total=adversarial + l1_weight * l1, adversarial=adversarial, l1=l1)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Half the sum, as in pix2pix: slows D relative to G."""
    return 0.5 * (
        adversarial_loss(real_logits, real=True) + adversarial_loss(fake_logits, real=False)
    )
