"""Object keys are untrusted: no key maps to an output outside DST/images."""

from __future__ import annotations

import posixpath

import pytest

from pipeline.stages import output_relative_path


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("a/b.jpg", "a/b.png"),
        ("box 1/scan.tif", "box 1/scan.png"),
        ("odd/50% grey café.jpg", "odd/50% grey café.png"),
        ("noext", "noext.png"),
        ("../../etc/passwd.jpg", "%2E%2E/%2E%2E/etc/passwd.png"),
        ("/abs/p.png", "abs/p.png"),
        ("a//b.jpg", "a/%2F/b.png"),
        ("a/./b.jpg", "a/%2E/b.png"),
        ("a\\..\\b.jpg", "a%5C..%5Cb.png"),
        ("c\x01d\x7f.jpg", "c%01d%7F.png"),
        ("new\nline.jpg", "new%0Aline.png"),
    ],
)
def test_output_paths(key: str, expected: str) -> None:
    assert output_relative_path(key) == expected


@pytest.mark.parametrize(
    "key", ["../x.jpg", "../../../../x.jpg", "/x.jpg", "a/../../x.jpg", "..\\..\\x.jpg", "./../x"]
)
def test_no_key_escapes_the_images_folder(key: str) -> None:
    joined = posixpath.normpath(posixpath.join("/dst/images", output_relative_path(key)))
    assert joined.startswith("/dst/images/")
    assert "\\" not in joined


def test_names_that_differ_only_in_suffix_keep_it() -> None:
    import pyarrow as pa

    from pipeline.colorize import with_output_paths

    listing = pa.table({"relative_path": ["box/scan.tif", "box/scan.jpg", "box/other.jpg",
                                          "../scan.tif", "../scan.png"]})  # fmt: skip
    outputs = with_output_paths(listing).column("output_path").to_pylist()
    assert outputs == ["box/scan.tif.png", "box/scan.jpg.png", "box/other.png",
                       "%2E%2E/scan.tif.png", "%2E%2E/scan.png.png"]  # fmt: skip


def test_atomic_write_of_a_name_near_the_file_system_limit(tmp_path: object) -> None:
    from pathlib import Path

    from pipeline.storage import write_bytes_atomic

    target = Path(str(tmp_path)) / ("n" * 250 + ".png")  # 254 bytes: the limit is 255
    write_bytes_atomic(str(target), b"png bytes")
    assert target.read_bytes() == b"png bytes"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left
