"""The training step and its checkpoints, without Ray: schedule, losses, exact resume, grid."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as safetensors_load
from skimage import data

from models.config import DiscriminatorConfig, GeneratorConfig
from pipeline import training
from pipeline.train_data import TrainingConfigError, random_crop_flip, rgb_to_unit, to_model_lab
from pipeline.training import (
    CONFIG_FILE,
    GENERATOR_FILE,
    HISTORY_FILE,
    STATE_FILE,
    Pix2Pix,
    TrainConfig,
    autocast_dtype_for,
    check_resumable,
    lr_factor,
    read_checkpoint,
    render_sample_grid,
    replica_spread,
    rng_file,
    write_checkpoint,
)

SIZE = 32


def _config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {
        "generator": GeneratorConfig(width=8, depth=5, image_size=SIZE),
        "discriminator": DiscriminatorConfig(width=8),
        "epochs": 4,
        "batch_size": 2,
        "bf16": False,
    }
    values.update(overrides)
    return TrainConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Six (36, 36, 3) uint8 crops of sample photos: the load size for a 32² model."""
    crops = []
    for photo in (data.astronaut(), data.coffee(), data.chelsea()):
        for top in (0, 100):
            small = Image.fromarray(photo[top : top + 256, :256]).resize((36, 36))
            crops.append(np.asarray(small))
    return torch.from_numpy(np.stack(crops))


def _batch(photos: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    pair = photos[[index % 6, (index + 1) % 6]]
    return to_model_lab(random_crop_flip(pair, size=SIZE))  # draws from the global RNG


def _tensors(model: Pix2Pix) -> dict[str, torch.Tensor]:
    out = {f"g.{k}": v for k, v in model.generator_module.state_dict().items()}
    out |= {f"d.{k}": v for k, v in model.discriminator_module.state_dict().items()}
    for name, optimizer in (("og", model.optimizer_g), ("od", model.optimizer_d)):
        for index, state in optimizer.state_dict()["state"].items():
            out |= {f"{name}.{index}.{k}": v for k, v in state.items()}
    return out


def test_schedule_is_constant_then_linear_decay() -> None:
    factors = [lr_factor(e, epochs=6, decay_epochs=3) for e in range(6)]
    assert factors[:3] == [1.0, 1.0, 1.0]
    assert factors[3:] == pytest.approx([0.75, 0.5, 0.25])  # never 0: the last is 1/(d+1)
    assert [lr_factor(e, epochs=3, decay_epochs=0) for e in range(3)] == [1.0, 1.0, 1.0]


def test_model_follows_the_schedule(photos: torch.Tensor) -> None:
    model = Pix2Pix(_config(epochs=4, decay_epochs=2, lr=1e-3))
    rates = []
    for epoch in range(4):
        rates.append(model.lr)
        model.train_step(*_batch(photos, epoch))
        model.end_epoch()
    assert rates == pytest.approx([1e-3, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    assert model.optimizer_d.param_groups[0]["lr"] == model.lr


def test_config_checks_and_round_trips() -> None:
    config = _config(decay_epochs=1)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert _config().resolved_decay_epochs == 2
    with pytest.raises(TrainingConfigError, match="epochs must be at least 1"):
        _config(epochs=0)
    with pytest.raises(TrainingConfigError, match="decay epochs"):
        _config(decay_epochs=5)
    with pytest.raises(TrainingConfigError, match="in_channels must be 3"):
        _config(discriminator=DiscriminatorConfig(in_channels=2))
    with pytest.raises(TrainingConfigError, match="unknown training config keys: colour"):
        TrainConfig.from_dict({**config.to_dict(), "colour": 1})


def test_a_step_updates_both_networks(photos: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = Pix2Pix(_config())
    before = {k: v.clone() for k, v in _tensors(model).items()}
    losses = model.train_step(*_batch(photos, 0))
    assert set(losses) == {"g_loss", "g_adv_loss", "g_l1_loss", "d_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    after = _tensors(model)
    for prefix in ("g.net", "d.net"):
        names = [k for k in before if k.startswith(prefix)]
        changed = [k for k in names if not torch.equal(before[k], after[k])]
        assert changed, f"no {prefix} tensor changed"
    # The discriminator is frozen only during the generator's update.
    assert all(p.requires_grad for p in model.discriminator_module.parameters())
    assert model.step == 1


def test_l1_falls_on_a_batch_it_trains_on(photos: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = Pix2Pix(_config(lr=1e-3))
    l_norm, ab_true = to_model_lab(rgb_to_unit(photos[:2, :SIZE, :SIZE].contiguous()))
    first = model.train_step(l_norm, ab_true)["g_l1_loss"].item()
    for _ in range(25):
        last = model.train_step(l_norm, ab_true)["g_l1_loss"].item()
    assert last < 0.8 * first


@pytest.mark.parametrize("bf16", [False, True])
def test_resume_from_a_checkpoint_is_exact(
    photos: torch.Tensor, tmp_path: Path, bf16: bool
) -> None:
    """Stop after two steps and an epoch end, restore into a differently seeded model, take a
    third step: weights, optimizer moments, schedule and counters equal the uninterrupted
    run's bit for bit, which needs the RNG (crops, flips, dropout) restored too."""
    config = _config(bf16=bf16, decay_epochs=4)

    def start() -> Pix2Pix:
        torch.manual_seed(0)
        model = Pix2Pix(config)
        torch.manual_seed(1234)  # the training stream
        for index in range(2):
            model.train_step(*_batch(photos, index))
        model.images_seen = 4
        model.end_epoch()
        return model

    uninterrupted = start()
    uninterrupted.train_step(*_batch(photos, 2))

    interrupted = start()
    write_checkpoint(tmp_path, interrupted, rank=0, history={"epochs": [{"epoch": 1}]})
    del interrupted
    torch.manual_seed(999)  # a fresh process: other weights, another RNG position
    resumed = Pix2Pix(config)
    history = read_checkpoint(tmp_path, resumed, rank=0)
    assert history == {"epochs": [{"epoch": 1}]}
    assert (resumed.epoch, resumed.step, resumed.images_seen) == (1, 2, 4)
    assert resumed.lr == pytest.approx(config.lr * lr_factor(1, epochs=4, decay_epochs=4))
    resumed.train_step(*_batch(photos, 2))

    expected, actual = _tensors(uninterrupted), _tensors(resumed)
    assert expected.keys() == actual.keys()
    mismatched = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not mismatched
    # The schedules continue from the same point (the optimizers alone hold only today's LR).
    uninterrupted.end_epoch()
    resumed.end_epoch()
    assert resumed.lr == uninterrupted.lr
    assert resumed.optimizer_d.param_groups[0]["lr"] == uninterrupted.lr


def test_checkpoint_files_are_safe_to_load(photos: torch.Tensor, tmp_path: Path) -> None:
    model = Pix2Pix(_config())
    model.train_step(*_batch(photos, 0))
    write_checkpoint(tmp_path, model, rank=0, metrics={"val_l1": 0.1})
    write_checkpoint(tmp_path, model, rank=1)  # a second worker adds only its RNG stream
    names = {p.name for p in tmp_path.iterdir()}
    assert {GENERATOR_FILE, STATE_FILE, CONFIG_FILE, HISTORY_FILE, rng_file(0), rng_file(1)} <= (
        names
    )
    # Weights in safetensors, the rest loadable without unpickling arbitrary objects.
    weights = safetensors_load((tmp_path / GENERATOR_FILE).read_bytes())
    assert weights.keys() == model.generator_module.state_dict().keys()
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["step"] == 1
    assert TrainConfig.from_dict(json.loads((tmp_path / CONFIG_FILE).read_text())) == model.config


def test_more_workers_than_before_get_fresh_distinct_streams(
    photos: torch.Tensor, tmp_path: Path
) -> None:
    model = Pix2Pix(_config())
    write_checkpoint(tmp_path, model, rank=0)
    draws = []
    for rank in (1, 2):  # no rng file for these ranks
        read_checkpoint(tmp_path, Pix2Pix(_config()), rank=rank)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])


def test_validation_metrics(photos: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = Pix2Pix(_config())
    rgb = rgb_to_unit(photos[:3, :SIZE, :SIZE].contiguous())
    sums, l_norm, ab_pred = model.evaluate(rgb)
    assert sums.count == 3
    means = sums.means()
    # An untrained generator predicts almost no colour: L1 about the photos' mean |ab|.
    _, ab_true = to_model_lab(rgb)
    assert means["val_l1"] == pytest.approx(ab_true.abs().mean().item(), abs=0.02)
    assert means["val_colorfulness"] < 0.3 * means["val_colorfulness_target"]
    assert 10 < means["val_psnr"] < 40
    assert l_norm.shape == (3, 1, SIZE, SIZE)
    assert ab_pred.shape == (3, 2, SIZE, SIZE)
    assert model.generator_module.training  # evaluate puts it back in training mode


def test_sample_grid_shows_input_output_original(photos: torch.Tensor) -> None:
    rgb = rgb_to_unit(photos[:2, :SIZE, :SIZE].contiguous())
    l_norm, ab_true = to_model_lab(rgb)
    png = render_sample_grid(l_norm, torch.zeros_like(ab_true), rgb)
    grid = np.asarray(Image.open(io.BytesIO(png)))
    gutter = training._SAMPLE_GUTTER
    assert grid.shape == (2 * SIZE + gutter, 3 * SIZE + 2 * gutter, 3)
    original = grid[:SIZE, 2 * (SIZE + gutter) :]
    expected = (rgb[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(original.astype(float) - expected).max() <= 2  # Lab round trip, 8-bit
    grey_input = grid[:SIZE, :SIZE].astype(int)
    assert (grey_input[..., 0] == grey_input[..., 1]).mean() > 0.95  # a = b = 0 is grey
    assert np.array_equal(grid[:SIZE, :SIZE], grid[:SIZE, SIZE + gutter : 2 * SIZE + gutter])


def test_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype_for(cpu, requested=False) is None
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype_for(cpu, requested=True) is torch.bfloat16
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype_for(cpu, requested=True) is None


def test_single_process_replicas_agree() -> None:
    assert replica_spread(Pix2Pix(_config())) == 0.0


def test_resume_refuses_a_different_network() -> None:
    previous = _config()
    check_resumable(previous, _config(epochs=10, batch_size=4, lr=1e-4), where="out")
    wider = _config(generator=GeneratorConfig(width=16, depth=5, image_size=SIZE))
    with pytest.raises(
        TrainingConfigError, match=r"out holds a run of a different model \(generator width 8 → 16"
    ):
        check_resumable(previous, wider, where="out")
