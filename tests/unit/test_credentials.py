"""C2PA content credentials: outputs signed in finalize, read back by c2pa's own Reader."""

from __future__ import annotations

import io
import re
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.credentials import (
    CERT_ENV,
    EDITED_SOURCE_TYPE,
    KEY_ENV,
    CredentialsError,
    SigningKeys,
    load_signing_keys,
    read_credentials,
)
from pipeline.provenance import read_png_provenance
from tests.pki import Pki, flip_png_pixels, make_pki
from tests.unit.finalize_one_scan import colourise


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(scope="module")
def keys(pki: Pki) -> SigningKeys:
    keys = load_signing_keys(pki.chain_pem.decode(), pki.key_pem.decode(), environ={})
    assert keys is not None
    return keys


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((120, 80)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _tiff16() -> bytes:
    y, x = np.mgrid[0:60, 0:90]
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (x * 700 + y * 9).astype(np.uint16))
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "data", "bits"), [("photo.jpg", _jpeg(), 8),
                                                    ("master.tif", _tiff16(), 16)])  # fmt: skip
def test_every_output_is_signed_as_ai_colourised_from_its_scan(
    tmp_path: Path, pki: Pki, keys: SigningKeys, name: str, data: bytes, bits: int
) -> None:
    final = colourise(tmp_path, name, data, signing=keys)
    png = Path(final["output_uri"]).read_bytes()
    assert (final["signed"], final["output_bits"]) == (True, bits)
    credentials = read_credentials(png, trust_anchors=pki.ca_pem.decode())
    assert credentials.state == "Trusted", credentials
    assert credentials.digital_source_type == EDITED_SOURCE_TYPE
    assert credentials.software_agent == "m@abc"
    assert credentials.parent_title == name
    # Without anchors the same file is intact but its signer unknown: Valid, not Trusted.
    assert read_credentials(png).state == "Valid"
    # Still the same picture and provenance: the manifest's sha256 is of the signed file.
    pixels = imagecodecs.png_decode(png)
    assert pixels.dtype == (np.uint16 if bits == 16 else np.uint8)
    assert pixels.shape[:2] == (final["source_height"], final["source_width"])
    provenance = read_png_provenance(png)
    assert final["source_sha256"] in str(provenance["xmp"])
    assert provenance["software"] == "chromascan test"


def test_unsigned_runs_write_no_credentials(tmp_path: Path) -> None:
    final = colourise(tmp_path, "photo.jpg", _jpeg())
    assert final["signed"] is False
    assert read_credentials(Path(final["output_uri"]).read_bytes()).state is None


def test_a_tampered_output_fails_validation(tmp_path: Path, pki: Pki, keys: SigningKeys) -> None:
    png = Path(colourise(tmp_path, "photo.jpg", _jpeg(), signing=keys)["output_uri"]).read_bytes()
    credentials = read_credentials(flip_png_pixels(png), trust_anchors=pki.ca_pem.decode())
    assert credentials.state == "Invalid"
    assert "assertion.dataHash.mismatch" in credentials.failures


def test_credentials_from_files_or_the_environment(tmp_path: Path, pki: Pki) -> None:
    chain, key, _ = pki.write(tmp_path / "pki")
    from_files = load_signing_keys(str(chain), str(key), environ={})
    from_env = load_signing_keys(
        None, None, environ={CERT_ENV: pki.chain_pem.decode(), KEY_ENV: str(key)}
    )
    assert from_files == from_env
    assert from_files is not None
    assert from_files.subject == "O=chromascan tests,CN=chromascan test signer"
    assert from_files.algorithm == "es256"
    assert load_signing_keys(None, None, environ={}) is None
    # Nothing secret in what gets printed or logged.
    assert "PRIVATE" not in repr(from_files)
    assert "BEGIN" not in repr(from_files)


def test_bad_credentials_are_one_line_errors(tmp_path: Path, pki: Pki) -> None:
    chain, key, ca = pki.write(tmp_path / "pki")
    other = make_pki().write(tmp_path / "other")
    cases = {
        "needs a certificate and a key: --sign-key": (str(chain), None),
        "--sign-cert /nowhere/chain.pem: cannot read": ("/nowhere/chain.pem", str(key)),
        "does not match the certificate chain's first (leaf) certificate": (
            str(chain), str(other[1])),
        "signing key: not a PEM private key": (str(chain), str(chain)),
        "signing certificate: not a PEM certificate chain": (str(key), str(key)),
    }  # fmt: skip
    for message, (cert_value, key_value) in cases.items():
        with pytest.raises(CredentialsError, match=re.escape(message)) as caught:
            load_signing_keys(cert_value, key_value, environ={})
        assert "\n" not in str(caught.value)
        assert "BEGIN" not in str(caught.value)  # the key's text is never echoed
    # A value that is neither a readable path nor PEM may be key material: never echoed.
    with pytest.raises(CredentialsError, match="the value given") as caught:
        load_signing_keys("Bag Attributes\nMIIEvQIBADANBgkqhkiG9w0B", str(key), environ={})
    assert "MIIE" not in str(caught.value)
    # PEM text with openssl's attribute lines before it is PEM text, not a path.
    with_attributes = "Bag Attributes\n    localKeyID: 01\n" + key.read_text()
    assert load_signing_keys(str(chain), with_attributes, environ={}) is not None
    # The CA's own certificate, leaf first, is not this key's: refused before signing.
    ca_first = ca.read_bytes() + chain.read_bytes()
    with pytest.raises(CredentialsError, match="does not match"):
        load_signing_keys(ca_first.decode(), str(key), environ={})
