"""pix2pix training on Ray Train: the per-worker loop, its checkpoints, and the driver's run.

Read top-down:

- ``TrainConfig``: the hyperparameters (frozen; a JSON dict in every checkpoint and artifact).
- ``Pix2Pix``: generator, discriminator, both optimizers and LR schedules, one training step
  and one validation pass. Plain PyTorch: unit tests and single-process benchmarks use it
  without Ray; the Ray loop only adds DDP wrapping, data shards and reporting.
- Checkpoint files: everything needed to continue exactly where a run stopped.
- ``train_loop_per_worker``: what every TorchTrainer worker runs.
- ``run_training``: the driver: the TorchTrainer (datasets, storage, failure and checkpoint
  policy), progress forwarding, and export of the chosen checkpoint as a model artifact.

DDP and the two networks. The generator is called once per step through its DDP wrapper, so
it is an ordinary DDP module. The discriminator is run three times per step: on fakes and on
reals for its own update (separate passes, hence separate BatchNorm batches, as pix2pix does;
the first backward runs under ``no_sync`` so DDP all-reduces the summed gradient once), and on
fakes for the generator's update, through the unwrapped module with its parameters frozen so
that its DDP reducer never waits for gradients that pass does not produce. Its wrapper has
``broadcast_buffers=False``: its BatchNorm running statistics are never used (it only ever
runs in training mode), so broadcasting them before each of its three passes would be wasted
traffic, and a broadcast that lands between a forward and its backward is the classic cause of
"modified by an inplace operation" in GANs under DDP. The generator's buffers are broadcast
from rank 0 as usual, so every replica validates identically.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import queue as queue_module
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import ray.exceptions
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from PIL import Image
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from models.artifact import DEFAULT_MODEL_NAME
from models.colour import denormalize_ab, denormalize_l, lab_to_rgb
from models.config import DiscriminatorConfig, GeneratorConfig
from models.losses import L1_WEIGHT, adversarial_loss, generator_loss
from models.metrics import colorfulness_batch, psnr_batch
from models.networks import PatchDiscriminator, UNetGenerator, init_weights
from pipeline.model_store import save_model
from pipeline.stages import cpu_has_native_bf16
from pipeline.storage import join, portable_storage_options, write_bytes_atomic
from pipeline.train_data import (
    TrainingConfigError,
    TrainingData,
    arrow_location,
    random_crop_flip,
    rgb_to_unit,
    shuffle_buffer_rows,
    to_model_lab,
)

logger = logging.getLogger(__name__)

RUN_FOLDER = "checkpoints"  # OUTPUT/checkpoints: the Ray Train run (resume = same folder)
MODEL_FOLDER = "model"  # OUTPUT/model: the exported artifact
SUMMARY_FILE = "train.json"  # OUTPUT/train.json: what the last invocation did
EXPORT_CHOICES = ("latest", "best")

# Checkpoint folder contents.
GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
STATE_FILE = "training_state.pt"  # optimizers, LR schedules, counters (torch.load weights_only)
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.json"
SAMPLES_FILE = "samples.png"

# The metrics that describe a trained model; copied into the artifact's provenance.
FINAL_METRIC_KEYS = (
    "epoch",
    "step",
    "images_seen",
    "g_loss",
    "g_adv_loss",
    "g_l1_loss",
    "d_loss",
    "val_l1",
    "val_psnr",
    "val_colorfulness",
    "val_colorfulness_target",
    "val_l1_initial",
    "val_psnr_initial",
)
_PSNR_CAP_DB = 100.0  # a perfect colourisation has infinite PSNR; the mean needs a number
_SAMPLE_GUTTER = 2  # pixels between the tiles of the sample grid


# -- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a training run. The defaults are the pix2pix recipe."""

    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    epochs: int = 200  # total, counting the decay epochs (pix2pix: 100 + 100)
    decay_epochs: int | None = None  # the last N epochs decay the LR linearly; None: half
    batch_size: int = 1  # per worker; pix2pix's 1 makes BatchNorm act as instance norm
    lr: float = 2e-4  # Adam, both networks
    beta1: float = 0.5  # Adam β1: 0.5 rather than 0.9 keeps GAN updates from overshooting
    l1_weight: float = L1_WEIGHT  # λ on the L1 term of the generator's loss
    bf16: bool = True  # autocast to bfloat16 where the device computes it natively
    seed: int = 0  # weights, the per-worker RNG streams, and the held-out split
    log_every_steps: int = 50  # progress lines between epochs
    val_batch_size: int = 8  # validation runs without gradients: larger batches are cheap

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise TrainingConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.decay_epochs is not None and not 0 <= self.decay_epochs <= self.epochs:
            raise TrainingConfigError(
                f"decay epochs must be between 0 and epochs ({self.epochs}), "
                f"got {self.decay_epochs}"
            )
        if self.batch_size < 1 or self.val_batch_size < 1:
            raise TrainingConfigError("batch sizes must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingConfigError(f"learning rate must be positive, got {self.lr}")
        if not 0.0 <= self.beta1 < 1.0:
            raise TrainingConfigError(f"beta1 must be in [0, 1), got {self.beta1}")
        if self.l1_weight < 0:
            raise TrainingConfigError(f"L1 weight must not be negative, got {self.l1_weight}")
        if self.log_every_steps < 1:
            raise TrainingConfigError("log_every_steps must be at least 1")
        pair = self.generator.in_channels + self.generator.out_channels
        if self.discriminator.in_channels != pair:
            raise TrainingConfigError(
                f"the discriminator judges (L, ab) pairs: in_channels must be {pair}, "
                f"got {self.discriminator.in_channels}"
            )

    @property
    def image_size(self) -> int:
        return self.generator.image_size

    @property
    def resolved_decay_epochs(self) -> int:
        return self.epochs // 2 if self.decay_epochs is None else self.decay_epochs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingConfigError(f"unknown training config keys: {', '.join(unknown)}")
        values = dict(data)
        values["generator"] = GeneratorConfig.from_dict(values.get("generator", {}))
        values["discriminator"] = DiscriminatorConfig(**values.get("discriminator", {}))
        return cls(**values)


def lr_factor(epoch: int, *, epochs: int, decay_epochs: int) -> float:
    """LR multiplier during 0-based ``epoch``: 1 for the constant part, then linear decay.

    pix2pix's rule: 1 − max(0, epoch + 1 − constant) / (decay + 1), so the last epoch trains
    at 1 / (decay + 1) of the base rate, never at 0.
    """
    constant = epochs - decay_epochs
    return 1.0 - max(0, epoch + 1 - constant) / float(decay_epochs + 1)


def autocast_dtype_for(device: torch.device, *, requested: bool) -> torch.dtype | None:
    """bfloat16 where the device computes it natively, else None (float32).

    float16 is never chosen: without a gradient scaler GAN losses underflow in it, and on CPUs
    without native bf16 autocast only adds conversions.
    """
    if not requested:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None


# -- the model pair and one step -----------------------------------------------------------


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _no_sync(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


@dataclass
class EvalSums:
    """Validation sums over images, so that workers can add theirs up before dividing."""

    l1: float = 0.0  # Σ mean |ab_pred − ab_true| per image, normalised units (as the loss)
    psnr: float = 0.0  # Σ PSNR (dB) of the colourised RGB against the original per image
    colorfulness: float = 0.0  # Σ Hasler–Süsstrunk M of the colourised images
    colorfulness_target: float = 0.0  # Σ M of the originals, for scale
    count: float = 0.0

    def add(self, other: EvalSums) -> None:
        for name in ("l1", "psnr", "colorfulness", "colorfulness_target", "count"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_tensor(self, device: torch.device) -> torch.Tensor:
        values = (self.l1, self.psnr, self.colorfulness, self.colorfulness_target, self.count)
        return torch.tensor(values, dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> EvalSums:
        return cls(*(float(v) for v in tensor.cpu().tolist()))

    def means(self, prefix: str = "val_") -> dict[str, float]:
        count = max(self.count, 1.0)
        return {
            f"{prefix}l1": self.l1 / count,
            f"{prefix}psnr": self.psnr / count,
            f"{prefix}colorfulness": self.colorfulness / count,
            f"{prefix}colorfulness_target": self.colorfulness_target / count,
        }


class Pix2Pix:
    """The generator and discriminator with their optimizers, LR schedules and counters."""

    def __init__(self, config: TrainConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype_for(self.device, requested=config.bf16)
        # channels-last: oneDNN (CPU) and cuDNN (tensor cores) run these convolutions fastest
        # in NHWC; oneDNN's bf16 kernels in particular are slow on NCHW tensors.
        generator = UNetGenerator(config.generator)
        discriminator = PatchDiscriminator(config.discriminator)
        init_weights(generator)
        init_weights(discriminator)
        self.generator: nn.Module = generator.to(self.device, memory_format=torch.channels_last)
        self.discriminator: nn.Module = discriminator.to(
            self.device, memory_format=torch.channels_last
        )
        # Fused Adam: one pass over the 54 M parameters instead of a dozen elementwise ones;
        # on a 2-core CPU the optimizer step drops from ~80 ms to ~50 ms for the generator.
        adam = functools.partial(
            torch.optim.Adam, lr=config.lr, betas=(config.beta1, 0.999), fused=True
        )
        self.optimizer_g = adam(self.generator.parameters())
        self.optimizer_d = adam(self.discriminator.parameters())
        epochs, decay = config.epochs, config.resolved_decay_epochs

        def schedule(epoch: int) -> float:
            return lr_factor(epoch, epochs=epochs, decay_epochs=decay)

        self.scheduler_g = torch.optim.lr_scheduler.LambdaLR(self.optimizer_g, schedule)
        self.scheduler_d = torch.optim.lr_scheduler.LambdaLR(self.optimizer_d, schedule)
        self.epoch = 0  # completed epochs
        self.step = 0  # optimizer steps taken (one batch per worker each)
        self.images_seen = 0  # training images consumed, all workers together

    @property
    def generator_module(self) -> UNetGenerator:
        return _unwrap(self.generator)  # type: ignore[return-value]

    @property
    def discriminator_module(self) -> PatchDiscriminator:
        return _unwrap(self.discriminator)  # type: ignore[return-value]

    @property
    def lr(self) -> float:
        return float(self.optimizer_g.param_groups[0]["lr"])

    def distribute(self, prepare: Callable[..., nn.Module]) -> None:
        """Wrap both networks for DDP with ``prepare`` (ray.train.torch.prepare_model).

        Call after loading a checkpoint: DDP broadcasts rank 0's parameters when it wraps.
        """
        self.generator = prepare(self.generator, move_to_device=False)
        self.discriminator = prepare(
            self.discriminator,
            move_to_device=False,
            parallel_strategy_kwargs={"broadcast_buffers": False},
        )

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.bfloat16,
            enabled=self.autocast_dtype is not None,
        )

    def train_step(self, l_norm: torch.Tensor, ab_true: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pix2pix step on (B, 1, S, S) L and (B, 2, S, S) ab, both normalised.

        Returns the losses as detached 0-d tensors, so callers decide when to synchronise.
        """
        discriminator = self.discriminator
        discriminator_module = self.discriminator_module
        l_norm = l_norm.contiguous(memory_format=torch.channels_last)
        ab_true = ab_true.contiguous(memory_format=torch.channels_last)

        # 1. Colourise: (B, 2, S, S) ab in [-1, 1].
        with self._autocast():
            ab_fake = self.generator(l_norm)

        # 2. Discriminator: fakes, then reals, each pass its own BatchNorm batch. Half the sum,
        #    as in pix2pix, slows D relative to G. DDP all-reduces once, after the real pass.
        discriminator_module.requires_grad_(True)
        self.optimizer_d.zero_grad(set_to_none=True)
        with _no_sync(discriminator):
            with self._autocast():
                fake_logits = discriminator(l_norm, ab_fake.detach())
            loss_fake = adversarial_loss(fake_logits.float(), real=False)
            (0.5 * loss_fake).backward()
        with self._autocast():
            real_logits = discriminator(l_norm, ab_true)
        loss_real = adversarial_loss(real_logits.float(), real=True)
        (0.5 * loss_real).backward()
        self.optimizer_d.step()

        # 3. Generator: fool the updated discriminator and stay near the true ab. D is frozen
        #    (no gradients for it are computed) and run unwrapped (its reducer is not armed).
        discriminator_module.requires_grad_(False)
        self.optimizer_g.zero_grad(set_to_none=True)
        with self._autocast():
            fooled_logits = discriminator_module(l_norm, ab_fake)
        losses = generator_loss(
            fooled_logits.float(), ab_fake.float(), ab_true, l1_weight=self.config.l1_weight
        )
        losses.total.backward()
        self.optimizer_g.step()
        discriminator_module.requires_grad_(True)

        self.step += 1
        return {
            "g_loss": losses.total.detach(),
            "g_adv_loss": losses.adversarial.detach(),
            "g_l1_loss": losses.l1.detach(),
            "d_loss": (0.5 * (loss_fake + loss_real)).detach(),
        }

    def end_epoch(self) -> None:
        self.epoch += 1
        self.scheduler_g.step()
        self.scheduler_d.step()

    @torch.inference_mode()
    def predict(self, l_norm: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) L -> (B, 2, S, S) float32 ab, normalised; eval mode, as at inference."""
        generator = self.generator_module
        was_training = generator.training
        generator.eval()
        try:
            with self._autocast():
                ab = generator(l_norm.contiguous(memory_format=torch.channels_last))
            return ab.float()
        finally:
            generator.train(was_training)

    def evaluate(self, rgb: torch.Tensor) -> tuple[EvalSums, torch.Tensor, torch.Tensor]:
        """Validation sums for (B, 3, S, S) sRGB in [0, 1]; also (L, ab_pred) for the grid."""
        l_norm, ab_true = to_model_lab(rgb)
        ab_pred = self.predict(l_norm)
        with torch.inference_mode():
            lightness = denormalize_l(l_norm)
            coloured = lab_to_rgb(torch.cat((lightness, denormalize_ab(ab_pred)), dim=1))
            psnr = psnr_batch(rgb, coloured).clamp(max=_PSNR_CAP_DB)
            sums = EvalSums(
                l1=float((ab_pred - ab_true).abs().flatten(1).mean(dim=1).sum()),
                psnr=float(psnr.sum()),
                colorfulness=float(colorfulness_batch(coloured).sum()),
                colorfulness_target=float(colorfulness_batch(rgb).sum()),
                count=float(rgb.shape[0]),
            )
        return sums, l_norm, ab_pred

    def state_dict(self) -> dict[str, Any]:
        """Optimizers, schedules and counters (weights go to safetensors files apart)."""
        return {
            "optimizer_g": self.optimizer_g.state_dict(),
            "optimizer_d": self.optimizer_d.state_dict(),
            "scheduler_g": self.scheduler_g.state_dict(),
            "scheduler_d": self.scheduler_d.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "images_seen": self.images_seen,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        self.scheduler_g.load_state_dict(state["scheduler_g"])
        self.scheduler_d.load_state_dict(state["scheduler_d"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.images_seen = int(state["images_seen"])


# -- checkpoint files ----------------------------------------------------------------------


def _weights_bytes(module: nn.Module) -> bytes:
    # Contiguous CPU copies: channels-last and device tensors are not what safetensors stores.
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return safetensors_save(tensors)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG streams: the CPU one (crops, flips, dropout on CPU) and CUDA's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def write_checkpoint(
    directory: Path,
    model: Pix2Pix,
    *,
    rank: int,
    metrics: Mapping[str, Any] | None = None,
    history: Mapping[str, Any] | None = None,
    samples_png: bytes | None = None,
) -> None:
    """Write this worker's part of a checkpoint; rank 0 writes the shared state.

    Every worker writes its own RNG stream (Ray Train merges the workers' folders), so a
    resumed run draws the crops, flips and dropout masks the uninterrupted one would have.
    """
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), directory / rng_file(rank))
    if rank != 0:
        return
    (directory / GENERATOR_FILE).write_bytes(_weights_bytes(model.generator_module))
    (directory / DISCRIMINATOR_FILE).write_bytes(_weights_bytes(model.discriminator_module))
    torch.save(model.state_dict(), directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    (directory / METRICS_FILE).write_text(json.dumps(dict(metrics or {}), indent=2) + "\n")
    (directory / HISTORY_FILE).write_text(json.dumps(dict(history or {}), indent=2) + "\n")
    if samples_png is not None:
        (directory / SAMPLES_FILE).write_bytes(samples_png)


def read_checkpoint(directory: Path, model: Pix2Pix, *, rank: int) -> dict[str, Any]:
    """Restore ``model`` (weights, optimizers, schedules, counters, this rank's RNG).

    Returns the run history stored beside it. Never unpickles arbitrary objects: weights are
    safetensors, and the rest loads with ``torch.load(weights_only=True)``.
    """
    model.generator_module.load_state_dict(
        safetensors_load((directory / GENERATOR_FILE).read_bytes())
    )
    model.discriminator_module.load_state_dict(
        safetensors_load((directory / DISCRIMINATOR_FILE).read_bytes())
    )
    model.load_state_dict(torch.load(directory / STATE_FILE, weights_only=True))
    rng_path = directory / rng_file(rank)
    if rng_path.exists():
        set_rng_state(torch.load(rng_path, weights_only=True))
    else:
        # More workers than the run had before: a fresh stream, distinct per rank and step.
        torch.manual_seed(model.config.seed + 1_000_003 * (rank + 1) + model.step)
    history_path = directory / HISTORY_FILE
    return json.loads(history_path.read_text()) if history_path.exists() else {}


def render_sample_grid(
    l_norm: torch.Tensor, ab_pred: torch.Tensor, rgb_true: torch.Tensor
) -> bytes:
    """A PNG with one row per sample: the grey input, the colourised output, the original.

    Args:
        l_norm: (K, 1, S, S) normalised L; ab_pred: (K, 2, S, S) normalised predicted ab;
        rgb_true: (K, 3, S, S) sRGB in [0, 1].
    """
    lightness = denormalize_l(l_norm.float().cpu())
    grey = lab_to_rgb(torch.cat((lightness, torch.zeros_like(lightness).repeat(1, 2, 1, 1)), 1))
    coloured = lab_to_rgb(torch.cat((lightness, denormalize_ab(ab_pred.float().cpu())), 1))
    rows, size = l_norm.shape[0], l_norm.shape[-1]
    gutter = _SAMPLE_GUTTER
    height = rows * size + (rows - 1) * gutter
    width = 3 * size + 2 * gutter
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for row, images in enumerate(zip(grey, coloured, rgb_true.float().cpu(), strict=True)):
        for column, image in enumerate(images):
            tile = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
            top, left = row * (size + gutter), column * (size + gutter)
            canvas[top : top + size, left : left + size] = tile
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


# -- the loop each Ray Train worker runs ---------------------------------------------------


def _all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce across workers in place (a no-op in a single process); returns the tensor."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=reduce_op[op])
    return tensor


def replica_spread(model: Pix2Pix) -> float:
    """Largest difference between workers of any parameter tensor's sum: 0 when in sync.

    A cheap fingerprint (one float64 per tensor, two all-reduces per epoch) that catches a DDP
    set-up where replicas silently train apart.
    """
    modules = (model.generator_module, model.discriminator_module)
    sums = torch.stack([p.detach().double().sum() for m in modules for p in m.parameters()])
    high = _all_reduce(sums.clone(), "max")
    low = _all_reduce(sums.clone(), "min")
    return float((high - low).abs().max())


class _Progress:
    """Rank 0's progress events to the driver, through a Ray queue; never fails training."""

    def __init__(self, sink: Any | None, *, rank: int) -> None:
        self.sink = sink if rank == 0 else None

    def __call__(self, kind: str, **values: Any) -> None:
        if self.sink is None:
            return
        try:
            self.sink.put({"kind": kind, **values}, timeout=5)
        except (ray.exceptions.RayError, queue_module.Full) as err:
            logger.warning("progress event dropped: %s", err)


def _validate(
    model: Pix2Pix,
    batches: Iterator[dict[str, np.ndarray]],
    *,
    rank: int,
    world_size: int,
    sample_uris: frozenset[str],
) -> tuple[EvalSums, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """This worker's share of the validation set (every world_size-th batch), all-reduced.

    Rank 0 also predicts the sample photos wherever they fall, for the checkpoint's grid.
    """
    local = EvalSums()
    samples: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for index, batch in enumerate(batches):
        mine = index % world_size == rank
        uris = [str(uri) for uri in batch["source_uri"]]
        wanted = [i for i, uri in enumerate(uris) if uri in sample_uris] if rank == 0 else []
        if not mine and not wanted:
            continue
        rgb = rgb_to_unit(torch.from_numpy(np.ascontiguousarray(batch["rgb"]))).to(model.device)
        if mine:
            sums, l_norm, ab_pred = model.evaluate(rgb)
            local.add(sums)
        else:  # another worker's batch holding sample photos: predict just those
            rgb, uris = rgb[wanted], [uris[i] for i in wanted]
            wanted = list(range(len(uris)))
            l_norm, _ = to_model_lab(rgb)
            ab_pred = model.predict(l_norm)
        for i in wanted:
            samples[uris[i]] = (l_norm[i], ab_pred[i], rgb[i])
    total = EvalSums.from_tensor(_all_reduce(local.as_tensor(model.device)))
    return total, samples


def _start_or_resume(
    config: TrainConfig, device: torch.device, *, rank: int, world_size: int, emit: _Progress
) -> tuple[Pix2Pix, dict[str, Any]]:
    """Models from the seed (identical on every worker), or from the latest checkpoint."""
    torch.manual_seed(config.seed)
    model = Pix2Pix(config, device)
    history: dict[str, Any] = {"epochs": [], "resumes": [], "initial": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        # Distinct streams per worker: equal crops and dropout masks would waste the batch.
        torch.manual_seed(config.seed + 1_000_003 * (rank + 1))
        return model, history
    with checkpoint.as_directory() as directory:
        history = read_checkpoint(Path(directory), model, rank=rank) or history
    resume = {"epoch": model.epoch, "step": model.step, "world_size": world_size}
    history.setdefault("resumes", []).append(resume)
    logger.info("rank %d resumed at epoch %d, step %d", rank, model.epoch, model.step)
    emit("resumed", **resume)
    return model, history


def _train_epoch(
    model: Pix2Pix, shard: Any, *, shuffle_rows: int, emit: _Progress
) -> dict[str, float]:
    """One pass over this worker's shard; the losses averaged over every worker's steps."""
    config = model.config
    started = time.perf_counter()
    lr = model.lr
    sums = torch.zeros(5, dtype=torch.float64, device=model.device)  # 4 losses, then steps
    one = torch.ones(1, dtype=torch.float64, device=model.device)
    for batch in shard.iter_torch_batches(
        batch_size=config.batch_size,
        drop_last=True,  # equal shards and full batches: every worker takes as many steps
        local_shuffle_buffer_size=shuffle_rows,
        device=model.device,
    ):
        rgb = random_crop_flip(batch["rgb"], size=config.image_size)  # (B, 3, S, S) in [0, 1]
        l_norm, ab_true = to_model_lab(rgb)
        losses = model.train_step(l_norm, ab_true)
        # Summed on the device: no host synchronisation per step.
        sums += torch.cat((torch.stack(list(losses.values())).double(), one))
        if model.step % config.log_every_steps == 0:
            values = {name: float(value) for name, value in losses.items()}
            emit("step", epoch=model.epoch + 1, step=model.step, **values)
    seconds = time.perf_counter() - started
    _all_reduce(sums)
    worker_steps = int(sums[4])  # all workers together
    images = worker_steps * config.batch_size
    model.images_seen += images
    model.end_epoch()
    g_loss, g_adv, g_l1, d_loss = (float(v) / max(worker_steps, 1) for v in sums[:4])
    return {
        "lr": lr,
        "g_loss": g_loss,
        "g_adv_loss": g_adv,
        "g_l1_loss": g_l1,
        "d_loss": d_loss,
        "train_seconds": seconds,
        "images_per_second": images / max(seconds, 1e-9),
    }


def _save_and_report(
    model: Pix2Pix,
    metrics: dict[str, Any],
    history: dict[str, Any],
    samples: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    rank: int,
) -> None:
    """Every worker writes its part of the checkpoint and reports (report is a barrier)."""
    grid = None
    if rank == 0 and samples:
        ordered = [samples[uri] for uri in sorted(samples)]
        grid = render_sample_grid(*(torch.stack(parts) for parts in zip(*ordered, strict=True)))
    with tempfile.TemporaryDirectory(prefix="chromascan-ckpt-") as directory:
        write_checkpoint(
            Path(directory), model, rank=rank, metrics=metrics, history=history, samples_png=grid
        )
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"epoch_{model.epoch:05d}",
        )


def train_loop_per_worker(loop_config: dict[str, Any], *, progress: Any | None = None) -> Any:
    """The TorchTrainer worker function: restore, then train, validate, checkpoint per epoch.

    ``loop_config`` holds JSON values only (Ray records it with the run): ``config`` (a
    TrainConfig dict), ``sample_uris`` and ``cpus_per_worker``. ``progress`` is a Ray queue
    for the driver's progress lines. Returns (on rank 0) the run's history.
    """
    # 1. Who and where this worker is.
    config = TrainConfig.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(loop_config.get("cpus_per_worker", 1))))
    emit = _Progress(progress, rank=rank)

    # 2. Models and optimizers, fresh or from the latest checkpoint; then DDP.
    model, history = _start_or_resume(config, device, rank=rank, world_size=world_size, emit=emit)
    model.distribute(ray.train.torch.prepare_model)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    sample_uris = frozenset(loop_config.get("sample_uris", ()))
    shuffle_rows = max(config.batch_size, int(loop_config.get("shuffle_buffer_rows", 64)))

    def validate() -> tuple[EvalSums, dict[str, Any]]:
        batches = val_shard.iter_batches(batch_size=config.val_batch_size, batch_format="numpy")
        return _validate(model, batches, rank=rank, world_size=world_size, sample_uris=sample_uris)

    # 3. Where training starts from: the untrained generator's validation, once per run.
    if history.get("initial") is None:
        initial, _ = validate()
        history["initial"] = initial.means()
        emit("initial", **history["initial"])

    # 4. Epochs: train on this worker's shard, validate, report metrics and a checkpoint.
    while model.epoch < config.epochs:
        started = time.perf_counter()
        trained = _train_epoch(model, train_shard, shuffle_rows=shuffle_rows, emit=emit)
        val, samples = validate()
        metrics = {
            "epoch": model.epoch,
            "epochs": config.epochs,
            "step": model.step,
            "images_seen": model.images_seen,
            **trained,
            **val.means(),
            "val_l1_initial": history["initial"]["val_l1"],
            "val_psnr_initial": history["initial"]["val_psnr"],
            "epoch_seconds": time.perf_counter() - started,
            "replica_spread": replica_spread(model),
            "world_size": world_size,
            "precision": str(model.autocast_dtype or torch.float32).removeprefix("torch."),
        }
        history["epochs"].append(metrics)
        _save_and_report(model, metrics, history, samples, rank=rank)
        emit("epoch", **metrics)
    return history if rank == 0 else None


# -- the driver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingOutcome:
    """What a training invocation produced."""

    model_id: str
    model_url: str
    summary_url: str
    checkpoint: str  # the exported checkpoint's folder name, e.g. epoch_00200
    selected: str  # "latest" or "best" (lowest validation L1 among those kept)
    metrics: dict[str, Any]  # that checkpoint's metrics
    history: dict[str, Any]  # per-epoch metrics, resumes and the initial validation
    resumed_from: dict[str, Any] | None  # the checkpoint this invocation continued from
    elapsed_s: float


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def ray_storage(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[str, Any | None]:
    """(storage_path, storage_filesystem) for RunConfig from any fsspec URL (see arrow_location)."""
    return arrow_location(url, storage_options)


def _read_checkpoint_file(checkpoint: Any, name: str) -> bytes:
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as handle:
        return handle.read()


def previous_run(output_url: str, storage_options: Mapping[str, Any] | None = None) -> Any | None:
    """The Ray Train result already under OUTPUT (a ray.train.Result), or None for a new run."""
    path, fs = ray_storage(join(output_url, RUN_FOLDER), storage_options)
    try:
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # no run folder, or no checkpoint reported in it yet
        return None
    return result if result.checkpoint is not None else None


def check_resumable(previous: TrainConfig, config: TrainConfig, *, where: str) -> None:
    """Refuse to continue a run whose networks differ from the requested ones."""
    differences = [
        f"{part} {name} {getattr(getattr(previous, part), name)} → "
        f"{getattr(getattr(config, part), name)}"
        for part in ("generator", "discriminator")
        for name in getattr(previous, part).to_dict()
        if getattr(getattr(previous, part), name) != getattr(getattr(config, part), name)
    ]
    if differences:
        raise TrainingConfigError(
            f"{where} holds a run of a different model ({'; '.join(differences)}); "
            "continue it with the same settings, or train into a new --output"
        )


def export_checkpoint(
    checkpoint: Any,
    model_url: str,
    *,
    name: str = DEFAULT_MODEL_NAME,
    provenance: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Turn a training checkpoint (a ray.train.Checkpoint) into a model artifact.

    Reads only the generator's weights and the config, not the optimizer state. Returns the
    model id.
    """
    config = TrainConfig.from_dict(json.loads(_read_checkpoint_file(checkpoint, CONFIG_FILE)))
    generator = UNetGenerator(config.generator)
    generator.load_state_dict(safetensors_load(_read_checkpoint_file(checkpoint, GENERATOR_FILE)))
    generator.eval()
    return save_model(
        generator, model_url, name=name, provenance=provenance, storage_options=storage_options
    )


def _start_progress_pump(
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> tuple[Any | None, Callable[[], None]]:
    """A Ray queue the workers write to and a thread that hands its events to on_progress."""
    if on_progress is None:
        return None, lambda: None
    # On the driver's node, as Ray Train places its controller: the queue then shares the
    # driver's fate. Left to the scheduler it may land on a worker node, and when that node is
    # lost the pump thread dies and the driver hears nothing more, though training goes on.
    on_driver_node = NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=False
    )
    events = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": on_driver_node})
    done = threading.Event()

    def pump() -> None:
        while True:
            try:
                on_progress(events.get(timeout=0.5))
            except Empty:
                if done.is_set():
                    return

    thread = threading.Thread(target=pump, name="chromascan-train-progress", daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join(timeout=30)
        events.shutdown()

    return events, stop


def run_training(
    data: TrainingData,
    config: TrainConfig,
    *,
    output_url: str,
    workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: int = 1,
    max_failures: int = 2,
    keep_checkpoints: int = 3,
    export: str = "latest",
    model_name: str = DEFAULT_MODEL_NAME,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainingOutcome:
    """Train (or continue training) under OUTPUT and export a model artifact to OUTPUT/model.

    Layout: OUTPUT/checkpoints/ is the Ray Train run: one folder per epoch plus Ray's
    snapshot of them; the same OUTPUT continues that run from its latest checkpoint.
    OUTPUT/model/ is the artifact; OUTPUT/train.json describes this invocation.

    Args:
        data: from ``build_training_data``.
        config: hyperparameters; a continued run must have the same networks.
        output_url: folder or URL for everything the run writes.
        workers: Ray Train workers (data-parallel replicas).
        use_gpu: one GPU per worker.
        cpus_per_worker: CPUs reserved per worker, and torch threads on CPU workers.
        max_failures: worker-group restarts (from the latest checkpoint) before giving up.
        keep_checkpoints: checkpoints kept; the latest is always among them.
        export: "latest" (the final state, as pix2pix) or "best" (lowest validation L1).
        model_name: the first half of the model id.
        storage_options: fsspec options for OUTPUT (credentials travel to workers, never logs).
        on_progress: called on the driver with each progress event (a dict with "kind").

    Raises:
        TrainingConfigError: settings that cannot continue the run under OUTPUT.
        ray.train.TrainingFailedError: workers failed more than ``max_failures`` times.
    """
    if export not in EXPORT_CHOICES:
        raise TrainingConfigError(f"export must be one of {', '.join(EXPORT_CHOICES)}")
    if workers < 1 or cpus_per_worker < 1 or max_failures < 0 or keep_checkpoints < 1:
        raise TrainingConfigError(
            "workers, CPUs per worker and checkpoints to keep must be at least 1, "
            "and max failures at least 0"
        )
    if config.image_size != data.image_size:
        raise TrainingConfigError(
            f"the data was prepared for {data.image_size}², the model takes {config.image_size}²"
        )
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    where = output_url.rstrip("/")
    # Ray Train's controller and workers write here too, maybe from other nodes.
    storage_options = portable_storage_options(where, storage_options)
    previous = previous_run(output_url, storage_options)
    resumed_from = None
    if previous is not None:
        previous_config = TrainConfig.from_dict(
            json.loads(_read_checkpoint_file(previous.checkpoint, CONFIG_FILE))
        )
        check_resumable(previous_config, config, where=where)
        resumed_from = {
            "checkpoint": Path(previous.checkpoint.path).name,
            "epoch": previous.metrics.get("epoch"),
            "step": previous.metrics.get("step"),
        }

    storage_path, storage_filesystem = ray_storage(where, storage_options)
    resources: dict[str, float] = {"CPU": float(cpus_per_worker)}
    sink, stop_progress = _start_progress_pump(on_progress)
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, progress=sink),
        # JSON values only: Ray records this with the run, so no credentials here.
        train_loop_config={
            "config": config.to_dict(),
            "sample_uris": list(data.sample_uris),
            "cpus_per_worker": cpus_per_worker,
            "shuffle_buffer_rows": shuffle_buffer_rows(data.load_size),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=RUN_FOLDER,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=keep_checkpoints,
                # Ranking by validation L1 keeps the best ones; Ray always keeps the latest.
                checkpoint_score_attribute="val_l1" if export == "best" else None,
                checkpoint_score_order="min",
            ),
        ),
        # Streamed: every epoch reads the shards again, in a new file order (see
        # pipeline.train_data); each worker shuffles locally on top.
        datasets={"train": data.train, "val": data.val},
        # Validation is not split: every worker sees it all and evaluates every
        # world_size-th batch, so no validation photo is dropped to even out the shards.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    finally:
        stop_progress()

    if result.checkpoint is None:
        raise RuntimeError(f"{where}: the run reported no checkpoint to export")
    checkpoint, metrics = result.checkpoint, dict(result.metrics or {})
    if export == "best" and result.best_checkpoints:
        checkpoint, metrics = min(result.best_checkpoints, key=lambda cm: cm[1]["val_l1"])
    stored = json.loads(_read_checkpoint_file(checkpoint, HISTORY_FILE))
    history = result.return_value or stored
    metrics = json.loads(_read_checkpoint_file(checkpoint, METRICS_FILE)) or metrics
    provenance = {
        "trained": True,
        "training_data": data.source_url,
        "validation_data": data.val_url or f"{data.val_fraction:g} of training_data, held out",
        "train_images": data.train_images,
        "val_images": data.val_images,
        "skipped_grey": data.grey,
        "skipped_failed": data.failed,
        "epochs": metrics.get("epoch"),
        "steps": metrics.get("step"),
        "images_seen": metrics.get("images_seen"),
        "final_metrics": {k: metrics[k] for k in FINAL_METRIC_KEYS if k in metrics},
        "checkpoint": Path(checkpoint.path).name,
        "selected": export,
        "workers": workers,
        "config": config.to_dict(),
        "software": {
            "chromascan": _package_version("chromascan"),
            "torch": torch.__version__,
            "ray": _package_version("ray"),
        },
    }
    model_url = join(where, MODEL_FOLDER)
    model_id = export_checkpoint(
        checkpoint,
        model_url,
        name=model_name,
        provenance=provenance,
        storage_options=storage_options,
    )
    elapsed = time.perf_counter() - started
    outcome = TrainingOutcome(
        model_id=model_id,
        model_url=model_url,
        summary_url=join(where, SUMMARY_FILE),
        checkpoint=Path(checkpoint.path).name,
        selected=export,
        metrics=metrics,
        history=history,
        resumed_from=resumed_from,
        elapsed_s=elapsed,
    )
    _write_summary(
        outcome,
        data=data,
        config=config,
        started_at=started_at,
        workers=workers,
        storage_options=storage_options,
    )
    return outcome


def _write_summary(
    outcome: TrainingOutcome,
    *,
    data: TrainingData,
    config: TrainConfig,
    started_at: str,
    workers: int,
    storage_options: Mapping[str, Any] | None,
) -> None:
    summary = {
        "model_id": outcome.model_id,
        "model_url": outcome.model_url,
        "checkpoint": outcome.checkpoint,
        "selected": outcome.selected,
        "resumed_from": outcome.resumed_from,
        "metrics": outcome.metrics,
        "data": {
            "source_url": data.source_url,
            "val_url": data.val_url,
            "val_fraction": data.val_fraction,
            "listed": data.listed,
            "train_images": data.train_images,
            "val_images": data.val_images,
            "grey": data.grey,
            "failed": data.failed,
            # Capped: a run over a damaged archive must not write a summary of gigabytes.
            "skipped": [asdict(photo) for photo in data.skipped[:1000]],
            "prepare_seconds": data.prepare_seconds,
        },
        "config": config.to_dict(),
        "workers": workers,
        "history": outcome.history,
        "started_at": started_at,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": outcome.elapsed_s,
    }
    payload = (json.dumps(summary, indent=2, default=str) + "\n").encode()
    write_bytes_atomic(outcome.summary_url, payload, storage_options=storage_options)
