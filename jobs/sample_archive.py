"""The demo's sample archive, made from photos that installed packages ship (no download).

Colour photos from scikit-image and scikit-learn are split in two: most become the training
set (several crops and flips of each), the rest are held out and turned into the kinds of
black-and-white scans archives hold. The held-out colour originals are kept beside them, so
the demo can score its colours against the truth and against the plain grey scan.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Training photos (name -> loader name); the held-out ones are below.
_TRAIN = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "motorcycle_left",
          "retina")  # fmt: skip


@dataclass(frozen=True)
class ArchiveScan:
    relative_path: str  # under the archive folder
    original: str | None  # the held-out colour original it was made from (None: no original)
    kind: str  # what an archivist would call it


def _photos() -> dict[str, np.ndarray]:
    try:
        from skimage import data
    except ImportError as err:
        raise RuntimeError(
            "the demo needs scikit-image's sample photos: pip install 'chromascan[demo]'"
        ) from err
    photos = {
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
        "hubble_deep_field": data.hubble_deep_field(),
        "immunohistochemistry": data.immunohistochemistry(),
        "retina": data.retina(),
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
    }
    left, right, _ = data.stereo_motorcycle()
    photos["motorcycle_left"], photos["motorcycle_right"] = left, right
    try:
        from sklearn.datasets import load_sample_images

        china, flower = load_sample_images().images
        photos["china"], photos["flower"] = china, flower
    except ImportError:  # scikit-learn is optional: the demo works with fewer photos
        pass
    return photos


def _crops(photo: np.ndarray, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """Random crops (60-100% of the short side) and flips: variety for a tiny training set."""
    image = Image.fromarray(photo)
    out = []
    for _ in range(count):
        side = int(min(image.size) * rng.uniform(0.6, 1.0))
        left = int(rng.integers(0, image.width - side + 1))
        top = int(rng.integers(0, image.height - side + 1))
        crop = image.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(crop)
    return out


def _grey(photo: np.ndarray) -> Image.Image:
    return Image.fromarray(photo).convert("L")


def build_sample_archive(root: Path, *, quick: bool = False) -> list[ArchiveScan]:
    """Write train/, archive/ and originals/ under root; returns what the archive holds.

    Idempotent: an existing root is left as it is (its files are the demo's inputs, and
    rewriting them would change their mtimes and make nightly runs redo everything).
    """
    marker = root / ".complete"
    scans = _archive_plan(quick)
    if marker.exists():
        return scans
    rng = np.random.default_rng(0)
    photos = _photos()
    (root / "train").mkdir(parents=True, exist_ok=True)
    per_photo = 2 if quick else 6
    for name in _TRAIN:
        for index, crop in enumerate(_crops(photos[name], per_photo, rng)):
            crop.convert("RGB").save(root / "train" / f"{name}-{index}.jpg", quality=92)

    archive, originals = root / "archive", root / "originals"
    for folder in (archive / "box-01", archive / "box-02", originals):
        folder.mkdir(parents=True, exist_ok=True)
    # 8-bit greyscale JPEG, the common case.
    _grey(photos["chelsea"]).save(archive / "box-01/cat.jpg", quality=90)
    Image.fromarray(photos["chelsea"]).save(originals / "chelsea.png")
    # 16-bit greyscale TIFF, as film scanners write.
    coffee = photos["coffee"]
    grey16 = (np.asarray(_grey(coffee), np.float64) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(archive / "box-01/coffee-16bit.tif", dpi=(1200, 1200))
    Image.fromarray(coffee).save(originals / "coffee.png")
    # Sepia-toned print.
    grey = np.asarray(_grey(photos["motorcycle_right"]), np.float64)[..., None]
    sepia = np.clip(grey * np.array([1.07, 0.74, 0.43]) + np.array([20, 10, 0]), 0, 255)
    Image.fromarray(sepia.astype(np.uint8)).save(archive / "box-02/motorcycle-sepia.png")
    Image.fromarray(photos["motorcycle_right"]).save(originals / "motorcycle_right.png")
    # EXIF-rotated camera copy: stored sideways, orientation 8 turns it upright.
    held = photos.get("flower", photos["chelsea"])
    exif = Image.Exif()
    exif[0x0112] = 8
    _grey(held).rotate(-90, expand=True).save(
        archive / "box-02/flower-rotated.jpg", exif=exif.tobytes(), quality=90
    )
    Image.fromarray(held).save(originals / "flower.png")
    # A large scan: 4000 px on the long side (a tenth of that with --quick).
    big = photos.get("china", photos["coffee"])
    long_side = 400 if quick else 4000
    scale = long_side / max(big.shape[:2])
    size = (round(big.shape[1] * scale), round(big.shape[0] * scale))
    _grey(big).resize(size, Image.Resampling.LANCZOS).save(archive / "box-02/china-large.png")
    Image.fromarray(big).resize(size, Image.Resampling.LANCZOS).save(originals / "china.png")
    # One corrupt file: a JPEG cut off in transfer.
    buffer = io.BytesIO()
    _grey(photos["astronaut"]).save(buffer, format="JPEG", quality=90)
    (archive / "box-02/damaged.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    marker.write_text("sample archive complete\n")
    return scans


def _archive_plan(quick: bool) -> list[ArchiveScan]:
    del quick  # the same kinds either way; only sizes differ
    return [
        ArchiveScan("box-01/cat.jpg", "chelsea.png", "8-bit greyscale JPEG"),
        ArchiveScan("box-01/coffee-16bit.tif", "coffee.png", "16-bit greyscale TIFF"),
        ArchiveScan("box-02/motorcycle-sepia.png", "motorcycle_right.png", "sepia-toned print"),
        ArchiveScan("box-02/flower-rotated.jpg", "flower.png", "EXIF-rotated JPEG"),
        ArchiveScan("box-02/china-large.png", "china.png", "large scan"),
        ArchiveScan("box-02/damaged.jpg", None, "corrupt file"),
    ]
