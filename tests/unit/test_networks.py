"""The pix2pix networks and losses: reference sizes, shapes, configuration, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.config import DiscriminatorConfig, GeneratorConfig
from models.losses import L1_WEIGHT, adversarial_loss, discriminator_loss, generator_loss
from models.networks import PatchDiscriminator, UNetGenerator, count_parameters, init_weights


def test_reference_parameter_counts() -> None:
    assert count_parameters(UNetGenerator()) == 54_409_858
    assert count_parameters(PatchDiscriminator()) == 2_765_633


def test_reference_shapes_at_256() -> None:
    generator = UNetGenerator().eval()
    discriminator = PatchDiscriminator().eval()
    l_norm = torch.rand(2, 1, 256, 256) * 2 - 1
    with torch.no_grad():
        ab = generator(l_norm)
        logits = discriminator(l_norm, ab)
    assert ab.shape == (2, 2, 256, 256)
    assert ab.abs().max() <= 1.0  # tanh
    assert logits.shape == (2, 1, 30, 30)


def test_reference_generator_has_dropout_in_the_three_innermost_up_blocks() -> None:
    generator = UNetGenerator()
    dropouts = [m for m in generator.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 3
    assert all(m.p == 0.5 for m in dropouts)
    assert len(list(UNetGenerator(GeneratorConfig(dropout=0.0)).modules())) < len(
        list(generator.modules())
    )


@pytest.mark.parametrize(
    ("width", "depth", "size"), [(8, 5, 32), (16, 6, 64), (4, 8, 256), (8, 7, 256)]
)
def test_configurable_width_and_depth(width: int, depth: int, size: int) -> None:
    config = GeneratorConfig(width=width, depth=depth, image_size=size, dropout_blocks=0)
    generator = UNetGenerator(config).eval()
    with torch.no_grad():
        out = generator(torch.zeros(1, 1, size, size))
    assert out.shape == (1, 2, size, size)
    # Width scales the parameter count roughly quadratically.
    wider = UNetGenerator(GeneratorConfig(width=width * 2, depth=depth, image_size=size))
    assert 3 * count_parameters(generator) < count_parameters(wider)


def test_discriminator_width_and_layers() -> None:
    small = PatchDiscriminator(DiscriminatorConfig(width=8, layers=2))
    with torch.no_grad():
        logits = small(torch.zeros(1, 1, 64, 64), torch.zeros(1, 2, 64, 64))
    # 64 -> 32 -> 16 (stride 2) -> 15 (stride 1) -> 14 (final conv)
    assert logits.shape == (1, 1, 14, 14)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 100}, "multiple of 2\\*\\*depth"),
        ({"depth": 1}, "depth must be at least 2"),
        ({"width": 0}, "width must be at least 1"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"depth": 4, "image_size": 16, "dropout_blocks": 3}, "dropout_blocks"),
    ],
)
def test_invalid_generator_configs_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GeneratorConfig(**kwargs)


def test_config_from_dict_refuses_unknown_keys() -> None:
    config = GeneratorConfig(width=8)
    assert GeneratorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown generator config keys: colour"):
        GeneratorConfig.from_dict({**config.to_dict(), "colour": "rgb"})


def test_init_weights_follows_pix2pix() -> None:
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(width=16, depth=6, image_size=64))
    init_weights(generator)
    convs = [m for m in generator.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.std().item() - 0.02) < 0.002
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    assert abs(torch.cat([m.weight for m in norms]).mean().item() - 1.0) < 0.01


def test_adversarial_loss_values() -> None:
    zeros = torch.zeros(2, 1, 30, 30)
    assert adversarial_loss(zeros, real=True).item() == pytest.approx(math.log(2))
    confident = torch.full((1, 1, 4, 4), 20.0)
    assert adversarial_loss(confident, real=True).item() < 1e-6
    assert adversarial_loss(confident, real=False).item() == pytest.approx(20.0, abs=1e-5)
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(math.log(2))


def test_generator_loss_is_adversarial_plus_weighted_l1() -> None:
    logits = torch.zeros(1, 1, 30, 30)
    ab_pred = torch.full((1, 2, 8, 8), 0.25)
    ab_true = torch.zeros(1, 2, 8, 8)
    loss = generator_loss(logits, ab_pred, ab_true)
    assert loss.l1.item() == pytest.approx(0.25)
    assert loss.adversarial.item() == pytest.approx(math.log(2))
    assert loss.total.item() == pytest.approx(math.log(2) + L1_WEIGHT * 0.25)
    assert L1_WEIGHT == 100.0


def test_one_training_step_updates_both_networks() -> None:
    torch.manual_seed(0)
    config = GeneratorConfig(width=8, depth=5, image_size=32)
    generator, discriminator = (
        UNetGenerator(config),
        PatchDiscriminator(DiscriminatorConfig(width=8)),
    )
    l_norm, ab_true = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 2, 32, 32) - 0.5
    ab_pred = generator(l_norm)
    d_loss = discriminator_loss(
        discriminator(l_norm, ab_true), discriminator(l_norm, ab_pred.detach())
    )
    d_loss.backward()
    g_loss = generator_loss(discriminator(l_norm, ab_pred), ab_pred, ab_true)
    g_loss.total.backward()
    for net in (generator, discriminator):
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
