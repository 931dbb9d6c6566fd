"""One scan through prepare_one and finalize_one, as a colorize worker runs them, no Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.credentials import SigningKeys
from pipeline.stages import StageOptions, finalize_one, prepare_one


def colourise(
    tmp_path: Path,
    name: str,
    data: bytes,
    bits: str = "source",
    *,
    signing: SigningKeys | None = None,
) -> dict[str, Any]:
    """The scan ``data`` (saved as ``name``) coloured; its manifest fields, status ok."""
    source = tmp_path / name
    source.write_bytes(data)
    options = StageOptions(
        run_id="one", dst=str(tmp_path / "dst"), model_url="unused", model_id="m@abc",
        model_sha256="0" * 64, image_size=32, software="chromascan test", output_bits=bits,
        signing=signing,
    )  # fmt: skip
    row = {"source_uri": str(source), "source_size": len(data), "output_path": f"{name}.png",
           "relative_path": name}  # fmt: skip
    prepared = {**row, **prepare_one(row, options)}
    # Strong colours that leave sRGB in places: L must survive the gamut mapping too.
    ab = np.random.default_rng(3).normal(0, 35, (2, 32, 32)).astype(np.float32)
    final = {**prepared, **finalize_one(prepared, ab, options)}
    assert final["status"] == "ok", final
    return final
