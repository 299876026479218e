"""Reading WebDataset tar shards as a stream of members, fast: 512-byte headers parsed with `struct`, member bodies
read in one call, nothing kept per member. The standard library's `tarfile` (stream mode) costs ~0.1 ms per
sample in Python-level header handling, ~10% of the per-core decode budget of a 224 px JPEG; this reader costs a
tenth of that.

Handled: ustar and GNU regular files (the `prefix` field, GNU long names `L`, pax `x` headers with `path=`),
other member types skipped. Compressed shards (gzip, bz2, xz: detected from their magic bytes) go through
`tarfile`. Errors are tarfile's: a bad header checksum or a body cut off mid-way raises tarfile.ReadError; a
stream that ends at a member boundary (no end-of-archive blocks) ends cleanly, as in `tarfile`'s stream mode.
"""

from __future__ import annotations

import io
import struct
import tarfile
from typing import BinaryIO, Iterator

__all__ = ["iter_members"]

_BLOCK = 512
# name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic, version, uname, gname, devmajor, devminor,
# prefix
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")
_REGULAR = (b"0", b"\x00", b"7")


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 (sizes over 8 GiB)
        n = int.from_bytes(field[1:], "big")
        return -((1 << (8 * len(field) - 8)) - n) if field[:1] == b"\xff" else n
    s = field.split(b"\x00", 1)[0].strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid number in tar header: {field!r}") from None


def _read_exactly(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    while len(data) < n:  # a raw (unbuffered) stream may return less than asked before its end
        more = f.read(n - len(data))
        if not more:
            raise tarfile.ReadError(f"unexpected end of data in {what} ({len(data)} of {n} bytes)")
        data += more
    return data


def _skip(f: BinaryIO, n: int, what: str) -> None:
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise tarfile.ReadError(f"unexpected end of data in {what}")
        n -= len(chunk)


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<value>\\n" records)."""
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        length = int(data[pos:sp])
        record = data[sp + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


class _Prepended(io.RawIOBase):
    """`head` followed by the rest of `f` (the bytes read to sniff the format go back in front)."""

    def __init__(self, head: bytes, f: BinaryIO):
        super().__init__()
        self._head, self._f = memoryview(head), f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._f.read(len(b))
        b[:len(data)] = data
        return len(data)


def _tarfile_members(f: BinaryIO, wanted) -> Iterator[tuple[str, bytes | None]]:
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isreg():
                if wanted(member.name):
                    body = tar.extractfile(member)
                    yield member.name, body.read() if body is not None else b""
                else:
                    yield member.name, None
            tar.members = []  # stream mode: keep memory flat


def iter_members(f: BinaryIO, wanted=lambda name: True) -> Iterator[tuple[str, bytes | None]]:
    """(name, body) of every regular file in the tar stream `f`, in order; the body is None (passed over without
    being kept) for names `wanted(name)` rejects."""
    head = f.read(_BLOCK)
    if head.startswith(_COMPRESSED):
        yield from _tarfile_members(io.BufferedReader(_Prepended(head, f)), wanted)
        return
    if head and len(head) < _BLOCK:
        head += f.read(_BLOCK - len(head))
    long_name: str | None = None
    while True:
        if not head:
            return  # ended at a member boundary
        if len(head) != _BLOCK:
            raise tarfile.ReadError(f"unexpected end of data in a tar header ({len(head)} of {_BLOCK} bytes)")
        if head.count(0) == _BLOCK:
            return  # end-of-archive block
        (name, _mode, _uid, _gid, size_f, _mtime, chksum, typeflag, _link, magic, _ver, _un, _gn, _dmaj, _dmin,
         prefix) = _HEADER.unpack(head)
        # the checksum is the byte sum of the header with its own field read as spaces
        if _octal(chksum) != sum(head) - sum(head[148:156]) + 8 * 32:
            raise tarfile.ReadError("bad checksum in a tar header (not a tar file, or corrupted)")
        size = _octal(size_f)
        padded = -(-size // _BLOCK) * _BLOCK
        if typeflag in (b"L", b"x"):  # the next member's name
            data = _read_exactly(f, padded, "a long-name header")[:size]
            long_name = (data.rstrip(b"\x00").decode("utf-8") if typeflag == b"L" else _pax_path(data)) or long_name
        elif typeflag in _REGULAR:
            if long_name is not None:
                full = long_name
            else:
                full = name.rstrip(b"\x00").decode("utf-8")
                if magic.startswith(b"ustar") and prefix[:1] != b"\x00":
                    full = prefix.rstrip(b"\x00").decode("utf-8") + "/" + full
            long_name = None
            if wanted(full):
                body = _read_exactly(f, size, full)
                _skip(f, padded - size, full)
                yield full, body
            else:
                _skip(f, padded, full)
                yield full, None
        else:  # directories, links, global pax headers, ...
            long_name = None if typeflag != b"g" else long_name
            _skip(f, padded, "a tar member")
        head = f.read(_BLOCK)
