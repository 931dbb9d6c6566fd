"""The source's descriptive and rights metadata, carried into its derivative's XMP.

Archives describe their scans in XMP (Dublin Core, IPTC Core and Extension, xmpRights,
Photoshop's Credit and Source) and, in older files, IPTC-IIM (a JPEG's Photoshop APP13 block,
TIFF tag 33723). A colourised copy must still say who made the photograph and who holds its
rights, so every property of the source's XMP travels into the output's, except those that
would now be false (the document's identity, orientation and pixel sizes, the creator tool);
IIM fields fill in what the XMP does not already say, under their IPTC Core names.

Hostile files are expected: the XMP packet is size-capped and parsed by expat without
external entities; anything unparsable is dropped with a note, never an error.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from PIL import Image, IptcImagePlugin

logger = logging.getLogger(__name__)

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
PHOTOSHOP = "http://ns.adobe.com/photoshop/1.0/"
XMP_MM = "http://ns.adobe.com/xap/1.0/mm/"
XMP = "http://ns.adobe.com/xap/1.0/"
TIFF = "http://ns.adobe.com/tiff/1.0/"
EXIF = "http://ns.adobe.com/exif/1.0/"
IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
PREFIXES = {
    "rdf": RDF,
    "dc": DC,
    "photoshop": PHOTOSHOP,
    "xmpMM": XMP_MM,
    "xmp": XMP,
    "xmpRights": "http://ns.adobe.com/xap/1.0/rights/",
    "Iptc4xmpCore": "http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/",
    "Iptc4xmpExt": IPTC_EXT,
    "plus": "http://ns.useplus.org/ldf/xmp/1.0/",
    "tiff": TIFF,
    "exif": EXIF,
    "stRef": "http://ns.adobe.com/xap/1.0/sType/ResourceRef#",
}
for _prefix, _uri in PREFIXES.items():
    ET.register_namespace(_prefix, _uri)

# Larger packets are not descriptive metadata but something else (thumbnails, payloads).
MAX_XMP_BYTES = 1 << 20
# Properties of the source that would be false of the derivative, or that we set ourselves.
_NOT_CARRIED = {
    (XMP_MM, "DocumentID"),
    (XMP_MM, "InstanceID"),
    (XMP_MM, "OriginalDocumentID"),
    (XMP_MM, "DerivedFrom"),
    (XMP_MM, "History"),
    (XMP_MM, "Ingredients"),
    (XMP, "CreatorTool"),
    (XMP, "ModifyDate"),
    (XMP, "MetadataDate"),
    (TIFF, "Orientation"),
    (TIFF, "ImageWidth"),
    (TIFF, "ImageLength"),
    (TIFF, "BitsPerSample"),
    (TIFF, "PhotometricInterpretation"),
    (TIFF, "SamplesPerPixel"),
    (EXIF, "PixelXDimension"),
    (EXIF, "PixelYDimension"),
    (EXIF, "ColorSpace"),
    (PHOTOSHOP, "ColorMode"),
    (PHOTOSHOP, "ICCProfile"),
    (IPTC_EXT, "DigitalSourceType"),
}
# IPTC-IIM record 2 datasets -> (namespace, property, XMP container) of IPTC Core.
_IIM_TO_XMP: dict[int, tuple[str, str, str]] = {
    5: (DC, "title", "Alt"),  # Object Name
    25: (DC, "subject", "Bag"),  # Keywords
    55: (PHOTOSHOP, "DateCreated", ""),  # Date Created
    80: (DC, "creator", "Seq"),  # By-line
    85: (PHOTOSHOP, "AuthorsPosition", ""),  # By-line Title
    90: (PHOTOSHOP, "City", ""),
    95: (PHOTOSHOP, "State", ""),
    101: (PHOTOSHOP, "Country", ""),
    103: (PHOTOSHOP, "TransmissionReference", ""),
    105: (PHOTOSHOP, "Headline", ""),
    110: (PHOTOSHOP, "Credit", ""),
    115: (PHOTOSHOP, "Source", ""),
    116: (DC, "rights", "Alt"),  # Copyright Notice
    120: (DC, "description", "Alt"),  # Caption/Abstract
}


@dataclass(frozen=True)
class SourceMetadata:
    """What the source says about itself, as read from its file."""

    xmp: bytes | None = None  # the source's XMP packet, as found (size-capped)
    iptc: tuple[tuple[int, tuple[str, ...]], ...] = ()  # IIM record 2: (dataset, values)
    document_id: str | None = None  # the source's xmpMM:DocumentID, for xmpMM:DerivedFrom
    instance_id: str | None = None


def _decode_iim(value: Any) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    texts = []
    for item in values:
        if isinstance(item, bytes):
            texts.append(item.decode("utf-8", errors="replace").strip("\0 "))
        elif isinstance(item, str):
            texts.append(item)
    return tuple(text for text in texts if text)


def read_source_metadata(image: Image.Image, notes: list[str]) -> SourceMetadata:
    """The XMP packet and IPTC-IIM of an opened image; what cannot be read is noted."""
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    if not isinstance(xmp, bytes) or not xmp:
        xmp = None
    elif len(xmp) > MAX_XMP_BYTES:
        notes.append(f"source XMP dropped: {len(xmp):,} bytes is over the 1 MiB limit")
        xmp = None
    iptc: list[tuple[int, tuple[str, ...]]] = []
    try:
        found = IptcImagePlugin.getiptcinfo(image) or {}
    except Exception as err:  # a damaged APP13 or tag 33723 costs only itself
        notes.append(f"source IPTC-IIM dropped: unreadable ({type(err).__name__})")
        found = {}
    for (record, dataset), value in sorted(found.items()):
        if record == 2 and dataset in _IIM_TO_XMP and (texts := _decode_iim(value)):
            iptc.append((dataset, texts))
    document_id = instance_id = None
    if xmp is not None:
        description = _descriptions(xmp, notes)
        for element in description:
            document_id = document_id or _property(element, XMP_MM, "DocumentID")
            instance_id = instance_id or _property(element, XMP_MM, "InstanceID")
        if not description:
            xmp = None
    return SourceMetadata(
        xmp=xmp, iptc=tuple(iptc), document_id=document_id, instance_id=instance_id
    )


def _descriptions(xmp: bytes, notes: list[str] | None = None) -> list[ET.Element]:
    """The rdf:Description elements of an XMP packet; [] (noted) when it does not parse."""
    start, end = xmp.find(b"<x:xmpmeta"), xmp.rfind(b"</x:xmpmeta>")
    body = xmp[start : end + len(b"</x:xmpmeta>")] if 0 <= start < end else xmp
    if b"<!DOCTYPE" in xmp or b"<!ENTITY" in xmp:
        # XMP never declares entities; a packet that does is an attack on the parser.
        if notes is not None:
            notes.append("source XMP dropped: it declares XML entities")
        return []
    try:
        root = ET.fromstring(body)
    except ET.ParseError as err:
        if notes is not None:
            notes.append(f"source XMP dropped: not well-formed XML ({err})")
        return []
    return list(root.iter(f"{{{RDF}}}Description"))


def _property(description: ET.Element, namespace: str, name: str) -> str | None:
    value = description.get(f"{{{namespace}}}{name}")
    if value is None:
        child = description.find(f"{{{namespace}}}{name}")
        value = child.text if child is not None else None
    return value.strip() if value and value.strip() else None


def carried_properties(source: SourceMetadata) -> list[ET.Element]:
    """The source's properties to embed in the derivative's rdf:Description, as elements."""
    carried: dict[str, ET.Element] = {}
    for description in _descriptions(source.xmp) if source.xmp else []:
        for key, value in description.attrib.items():
            if key.startswith(f"{{{RDF}}}") or _split(key) in _NOT_CARRIED:
                continue
            element = ET.Element(key)
            element.text = value
            carried.setdefault(key, element)
        for child in description:
            if _split(child.tag) not in _NOT_CARRIED:
                carried.setdefault(child.tag, child)
    for dataset, values in source.iptc:
        namespace, name, container = _IIM_TO_XMP[dataset]
        key = f"{{{namespace}}}{name}"
        if key not in carried:  # the XMP, when it says the same, is the newer statement
            carried[key] = _xmp_value(key, values, container)
    return list(carried.values())


def _split(tag: str) -> tuple[str, str]:
    namespace, _, name = tag[1:].partition("}")
    return namespace, name


def _xmp_value(key: str, values: tuple[str, ...], container: str) -> ET.Element:
    element = ET.Element(key)
    if not container:
        element.text = values[0]
        return element
    holder = ET.SubElement(element, f"{{{RDF}}}{container}")
    for value in values if container != "Alt" else values[:1]:
        item = ET.SubElement(holder, f"{{{RDF}}}li")
        if container == "Alt":
            item.set("{http://www.w3.org/XML/1998/namespace}lang", "x-default")
        item.text = value
    return element


def to_xml(elements: list[ET.Element]) -> str:
    """Serialised property elements, for splicing into an rdf:Description."""
    return "".join(ET.tostring(element, encoding="unicode") for element in elements)
