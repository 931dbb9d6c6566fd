"""C2PA content credentials: every colourised output says, signed, that it is AI-colourised.

Each output carries a C2PA manifest (c2pa-python, the Content Authenticity Initiative's own
binding of c2pa-rs) with the grey scan as its parent ingredient (by hash), a ``c2pa.opened``
action for the scan and a ``c2pa.edited`` action whose digital source type is
``compositeWithTrainedAlgorithmicMedia`` and whose software agent is the model id. Signing
is offline: no timestamp authority is asked, so a signature is as good as its certificate's
validity period.

Keys: ``SigningKeys`` holds the certificate chain (leaf first) and the private key as PEM
bytes. It travels to Ray workers inside ``StageOptions`` like the storage credentials (never
in a repr, a log line, the manifest or the run summary); each worker process builds its own
``c2pa.Signer`` from it once, because signers are native objects that neither pickle nor
survive a fork.
"""

from __future__ import annotations

import datetime
import io
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

EDITED_SOURCE_TYPE = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
)
CERT_ENV = "CHROMASCAN_SIGN_CERT"  # PEM text, or a path to it, for cluster jobs
KEY_ENV = "CHROMASCAN_SIGN_KEY"
TRUST_ENV = "CHROMASCAN_TRUST_ANCHORS"  # verify: the CA certificates to trust (PEM or path)
_EC_ALGORITHMS = {256: "es256", 384: "es384", 521: "es512"}  # by curve size
_PARENT_LABEL = "parent_scan"
# The source formats c2pa can hash as an ingredient, by the name Pillow gives them.
_INGREDIENT_MIME = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "TIFF": "image/tiff",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}
TRUSTED, VALID, INVALID = "Trusted", "Valid", "Invalid"


class CredentialsError(ValueError):
    """Signing certificate or key unusable; a one-line message naming the file, not its text."""


@dataclass(frozen=True)
class SigningKeys:
    """A certificate chain (PEM, leaf first) and its private key (PKCS#8 PEM)."""

    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    algorithm: str = "es256"
    subject: str = ""  # the leaf certificate's subject, e.g. "CN=Archive signer,O=..."

    def __repr__(self) -> str:  # never the key, never the certificate
        return f"SigningKeys(algorithm={self.algorithm!r}, subject={self.subject!r})"

    def describe(self) -> dict[str, str]:
        """What a run summary says of the signer: nothing secret."""
        return {"subject": self.subject, "algorithm": self.algorithm}


def _pem(value: str, what: str) -> bytes:
    """PEM text as given, or the contents of the file it names."""
    if "-----BEGIN" in value:  # text (openssl may put "Bag Attributes" lines before it)
        return value.encode()
    path = Path(value).expanduser()
    try:
        return path.read_bytes()
    except OSError as err:
        # Only a one-line value is named: anything else may be key material, never echoed.
        shown = value if "\n" not in value and len(value) <= 300 else "(the value given)"
        raise CredentialsError(f"{what} {shown}: cannot read ({err.strerror or err})") from None


def _checked(chain_pem: bytes, key_pem: bytes) -> SigningKeys:
    """The pair as c2pa takes it (the key as unencrypted PKCS#8, its algorithm, the leaf's
    subject), once the key is known to belong to the chain's first certificate."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CredentialsError("signing key: encrypted keys are not supported") from None
    except ValueError:
        raise CredentialsError("signing key: not a PEM private key") from None
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError:
        raise CredentialsError("signing certificate: not a PEM certificate chain") from None

    def spki(public_key: Any) -> bytes:
        return public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    if spki(leaf.public_key()) != spki(key.public_key()):
        raise CredentialsError(
            "signing key does not match the certificate chain's first (leaf) certificate"
        )
    algorithm = None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = _EC_ALGORITHMS.get(key.curve.key_size)
    elif isinstance(key, rsa.RSAPrivateKey):
        algorithm = "ps256"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = "ed25519"
    if algorithm is None:
        raise CredentialsError(f"signing key: {type(key).__name__} cannot sign C2PA manifests")
    # c2pa takes unencrypted PKCS#8 only: "BEGIN EC PRIVATE KEY" files are re-encoded.
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    return SigningKeys(chain_pem, pkcs8, algorithm, leaf.subject.rfc4514_string())


def load_signing_keys(
    cert: str | None, key: str | None, environ: Mapping[str, str] | None = None
) -> SigningKeys | None:
    """The keys ``--sign-cert``/``--sign-key`` name, else those of the environment, else None.

    Each value is PEM text or a path to a PEM file. The pair is checked here, before any scan
    is read: both or neither, readable, matching, and accepted by c2pa (``preflight``).

    Raises:
        CredentialsError: one line saying what is wrong.
    """
    environ = os.environ if environ is None else environ
    cert = cert or environ.get(CERT_ENV) or None
    key = key or environ.get(KEY_ENV) or None
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = "--sign-cert" if cert is None else "--sign-key"
        env = CERT_ENV if cert is None else KEY_ENV
        raise CredentialsError(f"signing needs a certificate and a key: {missing} (or {env})")
    chain_pem, key_pem = _pem(cert, "--sign-cert"), _pem(key, "--sign-key")
    keys = _checked(chain_pem, key_pem)  # the pair's errors first, in our words
    preflight(keys)
    return keys


# --- Signing --------------------------------------------------------------------------------

_signers: dict[SigningKeys, Any] = {}
_signers_lock = threading.Lock()


def _signer(keys: SigningKeys) -> Any:
    """This process's c2pa Signer for these keys (made once; shared by threads, as c2pa allows)."""
    import c2pa  # noqa: PLC0415 (native library: loaded by signing runs only)

    with _signers_lock:
        signer = _signers.get(keys)
        if signer is None:
            info = c2pa.C2paSignerInfo(keys.algorithm, keys.chain_pem, keys.key_pem, None)
            signer = _signers[keys] = c2pa.Signer.from_info(info)
        return signer


def _context() -> Any:
    import c2pa  # noqa: PLC0415

    # No thumbnail inside the manifest: the output is itself the picture, and c2pa's default
    # thumbnail costs 0.1-0.2 s and 0.1-0.8 MB per output.
    return c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})


def manifest_definition(*, model_id: str, software: str, title: str) -> dict[str, Any]:
    """The C2PA manifest of one output: the scan opened, then edited by a trained model."""
    name, _, version = software.partition(" ")
    return {
        "title": title,
        "claim_generator_info": [{"name": name or "chromascan", "version": version or "0"}],
        "assertions": [
            {
                "label": "c2pa.actions.v2",
                "data": {
                    "actions": [
                        # c2pa turns the label into a hashed link to the ingredient.
                        {"action": "c2pa.opened", "parameters": {"ingredientIds": [_PARENT_LABEL]}},
                        {
                            "action": "c2pa.edited",
                            "digitalSourceType": EDITED_SOURCE_TYPE,
                            "softwareAgent": {"name": model_id},
                            "description": "AI-colourised from the greyscale scan",
                        },
                    ]
                },
            }
        ],
    }


def sign_png(
    png: bytes,
    *,
    keys: SigningKeys,
    source: bytes,
    source_format: str | None,
    source_name: str,
    model_id: str,
    software: str,
    title: str,
) -> bytes:
    """``png`` with a signed C2PA manifest whose parent ingredient is ``source`` (the scan).

    Raises:
        CredentialsError: c2pa refused to sign (it also checks the signature it made).
    """
    import c2pa  # noqa: PLC0415

    mime = _INGREDIENT_MIME.get(str(source_format or "").upper(), "application/octet-stream")
    definition = manifest_definition(model_id=model_id, software=software, title=title)
    try:
        with c2pa.Builder(definition, context=_context()) as builder:
            builder.add_ingredient(
                {"title": source_name, "relationship": "parentOf", "label": _PARENT_LABEL},
                mime,
                io.BytesIO(source),
            )
            signed = io.BytesIO()
            builder.sign(_signer(keys), "image/png", io.BytesIO(png), signed)
    except c2pa.C2paError as err:
        raise CredentialsError(f"C2PA signing failed: {_first_line(err)}") from None
    return signed.getvalue()


def preflight(keys: SigningKeys) -> None:
    """Sign a 1×1 PNG with these keys and read it back: a bad pair fails here, not per scan."""
    import imagecodecs  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    tiny = imagecodecs.png_encode(np.zeros((1, 1, 3), np.uint8))
    signed = sign_png(
        tiny, keys=keys, source=tiny, source_format="PNG", source_name="preflight",
        model_id="preflight", software="chromascan preflight", title="preflight.png",
    )  # fmt: skip
    state = read_credentials(signed).state
    if state == INVALID:
        raise CredentialsError("C2PA signing: the signature made with this key does not validate")


# --- Reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What c2pa's Reader says of one file's content credentials."""

    state: str | None  # Trusted | Valid | Invalid; None: the file has none
    failures: tuple[str, ...] = ()  # c2pa status codes, e.g. assertion.dataHash.mismatch
    digital_source_type: str | None = None
    software_agent: str | None = None
    parent_title: str | None = None

    @property
    def signed(self) -> bool:
        return self.state is not None


def load_trust_anchors(value: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """CA certificates (PEM text) to trust: ``--trust`` (PEM text or path), else the env."""
    environ = os.environ if environ is None else environ
    value = value or environ.get(TRUST_ENV) or None
    return None if value is None else _pem(value, "--trust").decode()


def _reader_context(trust_anchors: str | None) -> Any:
    import c2pa  # noqa: PLC0415

    if trust_anchors is None:
        return c2pa.Context()
    return c2pa.Context.from_dict(
        {"verify": {"verify_trust": True}, "trust": {"trust_anchors": trust_anchors}}
    )


def read_credentials(data: bytes, *, trust_anchors: str | None = None) -> Credentials:
    """Validate the C2PA manifest in ``data``. Without trust anchors a good signature is
    "Valid" (intact, signer not known); with them, "Trusted" when they vouch for the signer."""
    import c2pa  # noqa: PLC0415

    try:
        reader = c2pa.Reader(None, io.BytesIO(data), context=_reader_context(trust_anchors))
    except c2pa.C2paError.ManifestNotFound:
        return Credentials(state=None)
    except c2pa.C2paError as err:
        return Credentials(state=INVALID, failures=(_first_line(err),))
    with reader:
        results = reader.get_validation_results() or {}
        active = reader.get_active_manifest() or {}
        failures = tuple(
            str(item.get("code"))
            for item in (results.get("activeManifest") or {}).get("failure", [])
        )
        state = str(reader.get_validation_state())
    edited = _edited_action(active)
    agent = (edited or {}).get("softwareAgent")
    parents = [i for i in active.get("ingredients") or [] if i.get("relationship") == "parentOf"]
    return Credentials(
        state=state,
        failures=failures,
        digital_source_type=(edited or {}).get("digitalSourceType"),
        software_agent=agent.get("name") if isinstance(agent, dict) else agent,
        parent_title=parents[0].get("title") if parents else None,
    )


def _edited_action(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    for assertion in manifest.get("assertions") or []:
        if str(assertion.get("label", "")).startswith("c2pa.actions"):
            for action in (assertion.get("data") or {}).get("actions") or []:
                if action.get("action") == "c2pa.edited":
                    return dict(action)
    return None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


# --- A private test PKI ---------------------------------------------------------------------

_NO_USAGE = dict.fromkeys(
    ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
     "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
    False,
)  # fmt: skip


@dataclass(frozen=True)
class TestPki:
    """A private root CA and an end-entity certificate it issued, as PEM bytes.

    For trying signing out, benchmarks and tests; outputs signed with it are "Trusted" only
    by readers given its CA. c2pa checks the certificate's profile: digitalSignature key
    usage, an extended key usage it accepts (emailProtection; documentSigning needs extra
    trust configuration), subject and authority key identifiers, and the chain leaf first.
    """

    ca_pem: bytes
    chain_pem: bytes  # leaf, then the CA
    key_pem: bytes  # the leaf's private key, PKCS#8, unencrypted

    def write(self, folder: Path) -> tuple[Path, Path, Path]:
        """(chain, key, ca) as PEM files under ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = folder / "chain.pem", folder / "key.pem", folder / "ca.pem"
        for path, data in zip(paths, (self.chain_pem, self.key_pem, self.ca_pem), strict=True):
            path.write_bytes(data)
        return paths


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chromascan tests"),
        ]
    )


def make_test_pki(signer: str = "chromascan test signer") -> TestPki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("chromascan test root CA"))
        .issuer_name(_name("chromascan test root CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(**{**_NO_USAGE, "key_cert_sign": True, "crl_sign": True}), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(signer))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**{**_NO_USAGE, "digital_signature": True}), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def pem(certificate: x509.Certificate) -> bytes:
        return certificate.public_bytes(serialization.Encoding.PEM)

    return TestPki(
        ca_pem=pem(ca),
        chain_pem=pem(leaf) + pem(ca),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
