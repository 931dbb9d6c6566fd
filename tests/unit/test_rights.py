"""The source's rights and descriptive metadata in the derivative, as exiftool reads it."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.stages import StageOptions, finalize_one, prepare_one

RIGHTS_XMP = b"""<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"
  xmlns:xmpRights="http://ns.adobe.com/xap/1.0/rights/"
  xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"
  xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
  xmlns:tiff="http://ns.adobe.com/tiff/1.0/"
  xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
  xmpRights:Marked="True" photoshop:Credit="City Archive, Amsterdam"
  xmpMM:DocumentID="xmp.did:scan-0042" tiff:Orientation="6"
  Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture">
 <dc:creator><rdf:Seq><rdf:li>Ann Fotograf</rdf:li></rdf:Seq></dc:creator>
 <dc:rights><rdf:Alt><rdf:li xml:lang="x-default">(c) 1931 City Archive</rdf:li></rdf:Alt>
 </dc:rights>
 <dc:description><rdf:Alt><rdf:li xml:lang="x-default">The harbour at dawn</rdf:li></rdf:Alt>
 </dc:description>
 <xmpRights:UsageTerms><rdf:Alt><rdf:li xml:lang="x-default">CC BY 4.0</rdf:li></rdf:Alt>
 </xmpRights:UsageTerms>
</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="r"?>"""

pytestmark = pytest.mark.skipif(
    shutil.which("exiftool") is None, reason="scripts/test installs exiftool"
)


def _iptc_app13(fields: dict[int, bytes]) -> bytes:
    """A Photoshop APP13 segment holding IPTC-IIM record 2 (as old scanner software wrote)."""
    iim = b"".join(b"\x1c\x02" + bytes([k]) + struct.pack(">H", len(v)) + v
                   for k, v in fields.items())  # fmt: skip
    iim += b"\0" * (len(iim) % 2)
    resource = b"8BIM" + struct.pack(">H", 0x0404) + b"\0\0" + struct.pack(">I", len(iim)) + iim
    payload = b"Photoshop 3.0\0" + resource
    return b"\xff\xed" + struct.pack(">H", len(payload) + 2) + payload


def _exiftool(path: Path) -> dict[str, object]:
    result = subprocess.run(
        ["exiftool", "-j", "-struct", "-XMP:all", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(result.stdout)[0]


def _colourise(tmp_path: Path, name: str, data: bytes) -> tuple[dict[str, object], Path]:
    source = tmp_path / name
    source.write_bytes(data)
    options = StageOptions(
        run_id="rights", dst=str(tmp_path / "dst"), model_url="unused", model_id="m@abc",
        model_sha256="0" * 64, image_size=32, software="chromascan test",
    )  # fmt: skip
    row = {"source_uri": str(source), "source_size": len(data), "output_path": f"{name}.png"}
    prepared = {**row, **prepare_one(row, options)}
    final = finalize_one(prepared, np.zeros((2, 32, 32), np.float32), options)
    assert final["status"] == "ok", final
    return {**prepared, **final}, Path(str(final["output_uri"]))


def test_jpeg_xmp_rights_travel_and_false_properties_do_not(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("L", (60, 40), 120).save(buffer, format="JPEG", xmp=RIGHTS_XMP)
    row, output = _colourise(tmp_path, "harbour.jpg", buffer.getvalue())
    tags = _exiftool(output)
    assert tags["Creator"] == ["Ann Fotograf"]
    assert tags["Rights"] == "(c) 1931 City Archive"
    assert tags["UsageTerms"] == "CC BY 4.0"
    assert tags["Credit"] == "City Archive, Amsterdam"
    assert tags["Marked"] is True
    assert tags["Description"] == "The harbour at dawn"  # the photograph's, not ours
    assert "AI-colourised derivative" in str(tags["Derivation"])
    # Ours replace what would be false of the derivative.
    assert tags["DigitalSourceType"].endswith("/compositeWithTrainedAlgorithmicMedia")
    assert "Orientation" not in tags
    assert tags["DerivedFrom"] == {
        "FilePath": str(tmp_path / "harbour.jpg"),
        "DocumentID": "xmp.did:scan-0042",
    }
    assert tags["SourceSHA256"] == row["source_sha256"]


def test_iptc_iim_fills_in_what_the_xmp_does_not_say(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("L", (60, 40), 120).save(buffer, format="JPEG")
    plain = buffer.getvalue()
    app13 = _iptc_app13({80: b"Piet Scanner", 116: b"Public domain", 5: b"Dam Square",
                         110: b"Rijksarchief"})  # fmt: skip
    _, output = _colourise(tmp_path, "dam.jpg", plain[:2] + app13 + plain[2:])
    tags = _exiftool(output)
    assert tags["Creator"] == ["Piet Scanner"]
    assert tags["Rights"] == "Public domain"
    assert tags["Title"] == "Dam Square"
    assert tags["Credit"] == "Rijksarchief"


def test_tiff_xmp_travels_and_hostile_xmp_costs_only_itself(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("L", (60, 40), 120).save(buffer, format="TIFF", tiffinfo={700: RIGHTS_XMP})
    _, output = _colourise(tmp_path, "master.tif", buffer.getvalue())
    assert _exiftool(output)["Creator"] == ["Ann Fotograf"]

    laughs = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
              b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><x:xmpmeta xmlns:x="adobe:ns:meta/">'
              b"&b;</x:xmpmeta>")  # fmt: skip
    buffer = io.BytesIO()
    Image.new("L", (60, 40), 120).save(buffer, format="JPEG", xmp=laughs)
    row, output = _colourise(tmp_path, "laughs.jpg", buffer.getvalue())
    assert "source XMP dropped: it declares XML entities" in str(row["notes"])
    assert _exiftool(output)["DigitalSourceType"].endswith("TrainedAlgorithmicMedia")
