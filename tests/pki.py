"""Test helpers for C2PA signing: the private test PKI, and an edit of a PNG's pixels."""

from __future__ import annotations

import struct
import zlib

from pipeline.credentials import TestPki as Pki
from pipeline.credentials import make_test_pki as make_pki

__all__ = ["Pki", "flip_png_pixels", "make_pki"]


def flip_png_pixels(png: bytes) -> bytes:
    """16 bytes of the first IDAT inverted, its CRC fixed: a valid PNG with other pixels."""
    data, offset = bytearray(png), 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        if data[offset + 4 : offset + 8] == b"IDAT":
            middle = offset + 8 + length // 2
            data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
            crc = zlib.crc32(bytes(data[offset + 4 : offset + 8 + length]))
            data[offset + 8 + length : offset + 12 + length] = struct.pack(">I", crc)
            return bytes(data)
        offset += 12 + length
    raise AssertionError("no IDAT")
