"""The fast tar member reader (pipeline.data.tar) against tarfile-written archives of every header flavour, and
its errors on damaged streams (the loader counts those as truncated / unreadable shards)."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from pipeline.data.tar import iter_members

LONG = "deep/" * 30 + "sample.with.a.long.key.jpg"  # over 100 bytes: a long-name header or a ustar prefix


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT, dirs: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if dirs:
            info = tarfile.TarInfo("somedir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [("a.cls", b"3"), ("a.jpg", bytes(range(256)) * 7), ("b.cls", b""), ("b.jpg", b"x" * 512)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_every_header_flavour_like_tarfile(fmt):
    members = MEMBERS + [(LONG if fmt != tarfile.USTAR_FORMAT else "p/" * 60 + "k.jpg", b"long")]
    data = _tar(members, fmt, dirs=True)
    assert list(iter_members(io.BytesIO(data))) == members
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert [m.name for m in t.getmembers() if m.isreg()] == [n for n, _ in members]


def test_rejected_members_are_passed_over_without_their_bodies():
    got = list(iter_members(io.BytesIO(_tar(MEMBERS)), lambda name: name.endswith(".cls")))
    assert got == [("a.cls", b"3"), ("a.jpg", None), ("b.cls", b""), ("b.jpg", None)]


def test_gzip_compressed_shards_go_through_tarfile():
    assert list(iter_members(io.BytesIO(gzip.compress(_tar(MEMBERS))))) == MEMBERS


def test_a_stream_cut_at_a_member_boundary_ends_cleanly():
    data = _tar(MEMBERS)
    cut = 512 + 512 + 512 + -(-len(MEMBERS[1][1]) // 512) * 512  # a.cls and a.jpg, no end-of-archive blocks
    assert list(iter_members(io.BytesIO(data[:cut]))) == MEMBERS[:2]


@pytest.mark.parametrize("cut", [700, 1024 + 100, 1024 + 300])
def test_a_stream_cut_inside_a_header_or_a_body_raises_read_error(cut):
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(iter_members(io.BytesIO(_tar(MEMBERS)[:cut])))


def test_a_corrupted_header_raises_read_error():
    data = bytearray(_tar(MEMBERS))
    data[1024 + 10] ^= 0xFF  # a.jpg's name: its header checksum no longer matches
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(iter_members(io.BytesIO(bytes(data))))
    with pytest.raises(tarfile.ReadError, match="bad checksum|invalid number"):
        list(iter_members(io.BytesIO(b"not a tar file at all" * 40)))
