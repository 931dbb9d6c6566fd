"""Signed runs end to end: colorize signs on Ray workers, verify checks the credentials."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from jobs.cli import main
from models.config import GeneratorConfig
from models.networks import UNetGenerator, init_weights
from pipeline.credentials import read_credentials
from pipeline.manifest import read_manifest
from pipeline.model_store import save_model
from tests.pki import flip_png_pixels, make_pki

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2)
    generator = UNetGenerator(GeneratorConfig(width=4, depth=5, image_size=32))
    init_weights(generator)
    folder = tmp_path_factory.mktemp("model")
    save_model(generator, str(folder), name="signed")
    return folder


def _scans(folder: Path) -> None:
    folder.mkdir(parents=True)
    Image.radial_gradient("L").resize((96, 64)).save(folder / "photo.jpg", quality=90)
    Image.linear_gradient("L").resize((80, 60)).save(folder / "print.png")
    y, x = np.mgrid[0:48, 0:72]
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (x * 900 + y * 11).astype(np.uint16))
    (folder / "master.tif").write_bytes(buffer.getvalue())


def test_a_signed_run_verifies_trusted_and_a_tampered_output_is_named(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain, key, ca = make_pki("Archive colouring service").write(tmp_path / "pki")
    src, dst = tmp_path / "scans", tmp_path / "out"
    _scans(src)
    argv = ["colorize", str(src), str(dst), "-m", str(model_dir)]
    assert main([*argv, "--sign-cert", str(chain), "--sign-key", str(key)]) == 0
    out = capsys.readouterr().out
    assert "3 ok, 0 failed" in out
    assert "signed   C2PA content credentials, by O=chromascan tests,CN=Archive colouring" in out

    rows = read_manifest(str(dst)).to_pylist()
    assert [row["signed"] for row in rows] == [True] * 3
    for row in rows:
        credentials = read_credentials(
            Path(row["output_uri"]).read_bytes(), trust_anchors=ca.read_text()
        )
        assert credentials.state == "Trusted", (row["relative_path"], credentials)
        assert credentials.parent_title == row["relative_path"]
    assert {row["output_bits"] for row in rows} == {8, 16}

    assert main(["manifest", "verify", str(dst), "--trust", str(ca)]) == 0
    out = capsys.readouterr().out
    assert "3 verified" in out
    assert "3 signed, 0 with credentials that no longer validate (trust: --trust)" in out

    # Someone edits a published derivative's pixels: its hash and its credentials both say so.
    tampered = dst / "images" / "photo.png"
    tampered.write_bytes(flip_png_pixels(tampered.read_bytes()))
    # A signer the anchors do not know: intact, but not Trusted.
    stranger = make_pki().write(tmp_path / "stranger")[2]
    assert main(["manifest", "verify", str(dst), "--trust", str(ca)]) == 3
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("changed"))
    assert "photo.png" in line
    assert "C2PA credentials invalid: assertion.dataHash.mismatch" in line
    assert main(["manifest", "verify", str(dst), "--trust", str(stranger)]) == 3
    out = capsys.readouterr().out
    untrusted = [line for line in out.splitlines() if line.startswith("credentials")]
    assert len(untrusted) == 2  # print.png and master.png; photo.png is "changed"
    assert all("Valid, not trusted by --trust" in line for line in untrusted)


def test_bad_signing_credentials_stop_the_run_before_any_scan_is_read(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain, _, _ = make_pki().write(tmp_path / "pki")
    _, other_key, _ = make_pki().write(tmp_path / "other")
    src, dst = tmp_path / "scans", tmp_path / "out"
    _scans(src)
    argv = ["colorize", str(src), str(dst), "-m", str(model_dir), "--sign-cert", str(chain)]
    assert main([*argv, "--sign-key", str(other_key)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("chromascan: ")
    assert "signing key does not match the certificate chain's first (leaf) certificate" in error
    assert "\n" not in error
    assert not dst.exists()  # nothing was read, nothing written
