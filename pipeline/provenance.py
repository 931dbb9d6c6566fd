"""What every output PNG says about itself: source, model, and that it is AI-colourised.

Embedded (DESIGN.md): the source's EXIF (orientation already applied, tag reset), DPI, an sRGB
ICC profile, and XMP carrying the IPTC digital source type for trained-algorithm composites,
the model id, the source URI and the source sha256.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit
from xml.sax.saxutils import escape, quoteattr

import imagecodecs
import numpy as np
from PIL import Image, ImageCms

from pipeline import png, rights
from pipeline.rights import SourceMetadata

DIGITAL_SOURCE_TYPE = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
)
XMP_NAMESPACE = "urn:chromascan:xmp:1.0/"  # our own fields; a URN, so no host is implied
XMP_KEY = "XML:com.adobe.xmp"  # the iTXt keyword XMP readers look for in PNG


@dataclass(frozen=True)
class Provenance:
    source_uri: str
    source_sha256: str
    model_id: str
    software: str  # "chromascan 0.1.0"
    # The source's own descriptive and rights metadata (XMP, IPTC-IIM), carried over.
    source: SourceMetadata | None = None


def redact_uri(uri: str) -> str:
    """Drop user:password from a URI so it can be written into files and manifests."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=host))


# ICC header bytes 24-35 hold the profile's creation date and time (ICC.1:2022 §7.2.1).
_ICC_DATE = slice(24, 36)
_ICC_FIXED_DATE = struct.pack(">6H", 2026, 1, 1, 0, 0, 0)


@functools.cache
def srgb_icc_profile() -> bytes:
    """LittleCMS's built-in sRGB profile, with a fixed creation date.

    lcms stamps the current time into the header, which would make two colourisations of the
    same scan differ by a byte; outputs must be reproducible. The profile ID (MD5) field is
    left zero by lcms, which ICC allows, so nothing else depends on the date.
    """
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[_ICC_DATE] = _ICC_FIXED_DATE
    return bytes(profile)


def xmp_packet(provenance: Provenance) -> str:
    """Our XMP: the AI-colourised labelling, the derivation link, and the source's own
    descriptive and rights properties (pipeline.rights) carried over."""
    source = redact_uri(provenance.source_uri)
    statement = (
        f"AI-colourised derivative of {source} by {provenance.model_id}; "
        "the black-and-white scan is the master."
    )
    carried = rights.carried_properties(provenance.source) if provenance.source else []
    # The source's dc:description describes the photograph: it wins, and our statement moves
    # to a property of our own (one dc:description per resource).
    own_description = not any(e.tag == f"{{{rights.DC}}}description" for e in carried)
    derived_from = (
        '   <xmpMM:DerivedFrom rdf:parseType="Resource">'
        f"<stRef:filePath>{escape(source)}</stRef:filePath>"
        + (
            f"<stRef:documentID>{escape(provenance.source.document_id)}</stRef:documentID>"
            if provenance.source and provenance.source.document_id
            else ""
        )
        + (
            f"<stRef:instanceID>{escape(provenance.source.instance_id)}</stRef:instanceID>"
            if provenance.source and provenance.source.instance_id
            else ""
        )
        + "</xmpMM:DerivedFrom>\n"
    )
    description = (
        "   <dc:description><rdf:Alt>"
        f'<rdf:li xml:lang="x-default">{escape(statement)}</rdf:li>'
        "</rdf:Alt></dc:description>\n"
        if own_description
        else ""
    )
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        '  <rdf:Description rdf:about=""\n'
        '    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"\n'
        '    xmlns:dc="http://purl.org/dc/elements/1.1/"\n'
        '    xmlns:xmp="http://ns.adobe.com/xap/1.0/"\n'
        '    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"\n'
        '    xmlns:stRef="http://ns.adobe.com/xap/1.0/sType/ResourceRef#"\n'
        f'    xmlns:chromascan="{XMP_NAMESPACE}"\n'
        f"    Iptc4xmpExt:DigitalSourceType={quoteattr(DIGITAL_SOURCE_TYPE)}\n"
        f"    xmp:CreatorTool={quoteattr(provenance.software)}\n"
        f"    chromascan:ModelId={quoteattr(provenance.model_id)}\n"
        f"    chromascan:SourceURI={quoteattr(source)}\n"
        f"    chromascan:SourceSHA256={quoteattr(provenance.source_sha256)}\n"
        f"    chromascan:Derivation={quoteattr(statement)}>\n"
        f"{description}{derived_from}"
        + (f"   {rights.to_xml(carried)}\n" if carried else "")
        + "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    )


def _metadata_chunks(
    provenance: Provenance, exif: bytes | None, dpi: tuple[float, float] | None
) -> bytes:
    """iCCP, pHYs, eXIf, tEXt and iTXt chunks: everything an output says about itself."""
    chunks = [png.chunk(b"iCCP", b"sRGB\0\0" + zlib.compress(srgb_icc_profile()))]
    if dpi:
        per_metre = [round(value / 0.0254) for value in dpi]
        chunks.append(png.chunk(b"pHYs", struct.pack(">IIB", *per_metre, 1)))
    if exif:
        chunks.append(png.chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\0\0") else exif))
    for keyword, text in (
        ("Software", provenance.software),
        ("Source", redact_uri(provenance.source_uri)),
        (XMP_KEY, xmp_packet(provenance)),
    ):
        chunks.append(_text_chunk(keyword, text, international=keyword == XMP_KEY))
    return b"".join(chunks)


def _text_chunk(keyword: str, text: str, *, international: bool = False) -> bytes:
    """tEXt when Latin-1 holds the text, else (and for XMP, which readers expect there) iTXt."""
    if not international:
        try:
            return png.chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))
        except UnicodeEncodeError:
            pass  # a source name in another script: UTF-8 in iTXt keeps it as it is
    # iTXt: keyword, NUL, not compressed, method 0, no language tag, no translated keyword.
    return png.chunk(b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


def encode_png(
    rgb: np.ndarray,
    provenance: Provenance,
    *,
    exif: bytes | None = None,
    dpi: tuple[float, float] | None = None,
    compress_level: int = 1,
    encoder: str = "isal",
) -> bytes:
    """(H, W, 3) uint8 or uint16 sRGB -> PNG bytes with the provenance above embedded.

    The metadata chunks are written here, once, and placed right after IHDR, before the image
    data, where every reader looks for them. The pixels are encoded by pipeline.png (``isal``,
    the default) or, for benchmarks and as the tests' oracle, by the writers used before it
    (``reference``: Pillow for 8-bit, libpng through imagecodecs for 16-bit, which Pillow
    cannot write); both decode to the same pixels.
    """
    metadata = _metadata_chunks(provenance, exif, dpi)
    if encoder == "isal":
        return png.encode(rgb, metadata, level=compress_level)
    if encoder != "reference":
        raise ValueError(f"unknown PNG encoder {encoder!r}: isal or reference")
    if rgb.dtype == np.uint16:
        # Big-endian samples are what PNG stores; imagecodecs takes native arrays.
        encoded = imagecodecs.png_encode(np.ascontiguousarray(rgb), level=compress_level)
    elif rgb.dtype == np.uint8:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=compress_level)
        encoded = buffer.getvalue()
    else:
        raise ValueError(f"PNG output must be uint8 or uint16, got {rgb.dtype}")
    ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length + type, IHDR data, CRC
    return encoded[:ihdr_end] + metadata + encoded[ihdr_end:]


def read_png_provenance(data: bytes) -> dict[str, object]:
    """What a reader finds in an output PNG: for verification and tests."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        text = dict(getattr(image, "text", {}))
        return {
            "xmp": text.get(XMP_KEY, ""),
            "software": text.get("Software"),
            "source": text.get("Source"),
            "icc_profile": image.info.get("icc_profile"),
            "dpi": image.info.get("dpi"),
            "exif": image.getexif(),
            "size": image.size,
            "mode": image.mode,
        }
