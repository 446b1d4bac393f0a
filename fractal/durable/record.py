# -*- test-case-name: tests.test_durable_record -*-
"""
The durable record format: one delta (or full image) of one store, compressed
and checksummed.

A record is self-describing and versioned.  Its layout, all integers
big-endian::

    magic       4 bytes   b"FXDR"
    version     1 byte    2 (1 is still read)
    kind        1 byte    0 = delta, 1 = snapshot (a full image)
    reserved    2 bytes   0
    epoch       8 bytes   the writer's epoch
    seq         8 bytes   this record's sequence number, from 1
    baseSeq     8 bytes   the record it applies to; 0 for a snapshot
    pageSize    4 bytes   the SQLite page size, a power of two, 512..65536
    pageCount   4 bytes   the number of pages of the image after this record
    changed     4 bytes   the number of pages carried
    store      32 bytes   the store's name (L{fractal.keys.storeNameForKey}) as raw bytes
    image      32 bytes   the digest of the whole image after this record
    takenAt     8 bytes   when the image was taken: seconds since the Unix
                          epoch, an IEEE 754 double
    bodyLength  4 bytes   the length of the compressed body
    body                  zlib of: C{changed} 4-byte page numbers (1-based,
                          strictly ascending), then the C{changed} pages
    checksum   32 bytes   SHA-256 of everything before it

The image digest lets a restore prove that it rebuilt exactly the image the
writer had, so a delta applied to the wrong base is caught, not served.  It is
computed from per-page digests (L{pageDigests}), which the shipper also keeps
to find the pages that changed since the last ship:

    - version 2 takes the page digests in groups of L{GROUP_PAGES}
      consecutive pages, each group's digest the 16-byte BLAKE2b of its page
      digests concatenated (L{groupDigests}), and hashes the groups' digests
      (L{imageDigest}).  A delta changes the groups its pages fall in, so a
      writer or a restore updates the image digest at a cost that follows the
      pages changed, plus 16 bytes per group (L{regroup}), not the image;
    - version 1 hashed every page digest: a cost that grew with the store,
      paid for each delta.  Version 1 records are still read and verified.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Callable, Iterable, Sequence

from attrs import field, frozen

from fractal.durable.interfaces import CorruptRecord

__all__ = [
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "Delta",
    "encodeRecord",
    "decodeRecord",
    "pageSizeOf",
    "pageDigests",
    "imageDigest",
    "GROUP_PAGES",
    "groupDigests",
    "regroup",
    "diffImage",
    "applyDelta",
]

FORMAT_VERSION = 2
"""
The version of the record format this module writes; it reads this one and
version 1.
"""

FORMAT_VERSIONS = (1, 2)
"""
The record format versions this module reads, and can write when asked.
"""

GROUP_PAGES = 128
"""
How many consecutive pages' digests make one group of a version 2 image
digest.
"""

_MAGIC = b"FXDR"
_HEADER = struct.Struct(">4sBBHQQQIII32s32sdI")
_CHECKSUM_LENGTH = 32
_KIND_DELTA = 0
_KIND_SNAPSHOT = 1
def _loadCompressor() -> tuple[Callable[[bytes, int], bytes], int, int]:
    """
    The fastest zlib-format compressor at hand, and its levels for deltas
    and for snapshots.

    ISA-L's (the C{isal} package) writes the same zlib format several times
    faster than the standard library's at its lowest levels (a few
    microseconds for a four-page delta, against about fifty), for records a
    third larger; any zlib reads them, so records and restores do not
    depend on which one wrote them.  Without it, the standard library's
    level 1.
    """
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib.compress, 1, 1
    compress: Callable[[bytes, int], bytes] = isal_zlib.compress
    return compress, 0, 1


_compress, _DELTA_LEVEL, _SNAPSHOT_LEVEL = _loadCompressor()
_MAX_PAGE_COUNT = 2**31


def _pagesTuple(pages: Iterable[tuple[int, bytes]]) -> tuple[tuple[int, bytes], ...]:
    return tuple(pages)


@frozen
class Delta:
    """
    The decoded content of one record.

    @ivar store: the store's name: 64 hexadecimal digits.
    @ivar epoch: the writer's epoch.
    @ivar seq: this record's sequence number.
    @ivar baseSeq: the sequence number of the record this applies to, or C{0}
        for a snapshot.
    @ivar pageSize: the image's page size in bytes.
    @ivar pageCount: the image's page count after this record.
    @ivar pages: the changed pages, as (1-based page number, page bytes), in
        ascending page order.  A snapshot carries every page.
    @ivar imageDigest: L{imageDigest} of the image after this record.
    @ivar takenAt: when the writer took the image, in seconds since the Unix
        epoch: how old a restore from this record is.
    @ivar version: the record format's version, which defines how
        C{imageDigest} is computed (see the module's docstring).
    """

    store: str
    epoch: int
    seq: int
    baseSeq: int
    pageSize: int
    pageCount: int
    pages: tuple[tuple[int, bytes], ...] = field(converter=_pagesTuple)
    imageDigest: bytes
    takenAt: float = 0.0
    version: int = FORMAT_VERSION

    @property
    def isSnapshot(self) -> bool:
        """
        Whether this record is a full image.
        """
        return self.baseSeq == 0


def _validPageSize(pageSize: int) -> bool:
    return 512 <= pageSize <= 65536 and pageSize & (pageSize - 1) == 0


def pageSizeOf(image: bytes) -> int:
    """
    The page size recorded in an SQLite database image's header.

    @raise ValueError: if C{image} is not an SQLite database image.
    """
    if len(image) < 100 or image[:16] != b"SQLite format 3\x00":
        raise ValueError("not an SQLite database image")
    size = int.from_bytes(image[16:18], "big")
    if size == 1:
        size = 65536
    if not _validPageSize(size) or len(image) % size:
        raise ValueError(f"SQLite image has an invalid page size {size}")
    return size


def pageDigests(image: bytes, pageSize: int) -> list[bytes]:
    """
    A short digest of every page of C{image}, in page order.
    """
    view = memoryview(image)
    return [
        hashlib.blake2b(view[offset : offset + pageSize], digest_size=16).digest()
        for offset in range(0, len(image), pageSize)
    ]


def _groupDigest(digests: Iterable[bytes]) -> bytes:
    """
    The digest of one group of page digests.
    """
    return hashlib.blake2b(b"".join(digests), digest_size=16).digest()


def groupDigests(digests: Sequence[bytes]) -> list[bytes]:
    """
    The digest of each group of L{GROUP_PAGES} consecutive page digests (the
    last group may be shorter), in order: what a version 2 image digest
    hashes.
    """
    if len(digests) <= GROUP_PAGES:
        return [_groupDigest(digests)] if digests else []
    return [
        _groupDigest(digests[start : start + GROUP_PAGES])
        for start in range(0, len(digests), GROUP_PAGES)
    ]


def regroup(
    groups: Sequence[bytes],
    digests: Sequence[bytes],
    changed: Iterable[int],
    previousCount: int,
) -> list[bytes]:
    """
    The group digests of an image, from those of the image it was made from:
    only the groups that changed are computed again.

    @param groups: L{groupDigests} of the previous image.
    @param digests: the page digests of the new image.
    @param changed: the 1-based numbers of the pages whose digest changed
        (pages past the new image's end are ignored).
    @param previousCount: the page count of the previous image; when it
        differs, every group from the shorter image's last one on is
        computed again.
    @return: L{groupDigests} of C{digests}.
    """
    count = len(digests)
    if count <= GROUP_PAGES:
        # One group (or none): nothing to keep.
        return groupDigests(digests)
    total = -(-count // GROUP_PAGES)
    result = list(groups[:total])
    result.extend([b""] * (total - len(result)))
    dirty = {(number - 1) // GROUP_PAGES for number in changed if number <= count}
    if previousCount != count:
        dirty.update(range(min(previousCount, count) // GROUP_PAGES, total))
    for group in dirty:
        start = group * GROUP_PAGES
        result[group] = _groupDigest(digests[start : start + GROUP_PAGES])
    return result


def imageDigest(
    digests: Sequence[bytes],
    pageSize: int,
    groups: Sequence[bytes] | None = None,
    version: int = FORMAT_VERSION,
) -> bytes:
    """
    The digest of a whole image, from the digests of its pages, as record
    format C{version} defines it:

        - version 2: the page size, the page count and L{GROUP_PAGES} as three
          4-byte big-endian integers, then the image's group digests, hashed
          with SHA-256;
        - version 1: the page size and the page count as two 4-byte
          big-endian integers, then every page digest, hashed with SHA-256.

    @param groups: L{groupDigests} of C{digests}, when they are known
        (L{regroup}); computed otherwise.  Version 1 does not use them.
    @raise ValueError: if C{version} is not a record format version.
    """
    if version == 1:
        h = hashlib.sha256(struct.pack(">II", pageSize, len(digests)))
        h.update(b"".join(digests))
        return h.digest()
    if version != 2:
        raise ValueError(f"record format version {version} is not supported")
    if groups is None:
        groups = groupDigests(digests)
    h = hashlib.sha256(struct.pack(">III", pageSize, len(digests), GROUP_PAGES))
    h.update(b"".join(groups))
    return h.digest()


def diffImage(
    image: bytes,
    pageSize: int,
    previous: Sequence[bytes] | None,
) -> tuple[list[tuple[int, bytes]], list[bytes]]:
    """
    The pages of C{image} that differ from the image whose page digests are
    C{previous}.

    @param previous: the page digests of the last shipped image, or L{None} to
        take every page (a snapshot).
    @return: the changed pages as (1-based page number, bytes), and the page
        digests of C{image}.
    """
    digests = pageDigests(image, pageSize)
    changed = []
    for index, digest in enumerate(digests):
        if previous is None or index >= len(previous) or previous[index] != digest:
            offset = index * pageSize
            changed.append((index + 1, bytes(image[offset : offset + pageSize])))
    return changed, digests


def encodeRecord(delta: Delta) -> bytes:
    """
    Encode C{delta} as a record.

    @raise ValueError: if C{delta} is not self-consistent.
    """
    if delta.version not in FORMAT_VERSIONS:
        raise ValueError(f"record format version {delta.version} is not supported")
    if not _validPageSize(delta.pageSize):
        raise ValueError(f"invalid page size {delta.pageSize}")
    if delta.seq < 1 or delta.baseSeq < 0 or delta.baseSeq >= delta.seq or delta.epoch < 0:
        raise ValueError(f"invalid sequence {delta.seq} on base {delta.baseSeq}")
    numbers = [number for number, _ in delta.pages]
    if numbers != sorted(set(numbers)) or (numbers and not 1 <= numbers[0] <= numbers[-1] <= delta.pageCount):
        raise ValueError("page numbers must ascend within the page count")
    for _, page in delta.pages:
        if len(page) != delta.pageSize:
            raise ValueError("every page must be one page long")
    parts = [struct.pack(f">{len(numbers)}I", *numbers)]
    parts.extend(page for _, page in delta.pages)
    body = _compress(b"".join(parts), _SNAPSHOT_LEVEL if delta.isSnapshot else _DELTA_LEVEL)
    header = _HEADER.pack(
        _MAGIC,
        delta.version,
        _KIND_SNAPSHOT if delta.isSnapshot else _KIND_DELTA,
        0,
        delta.epoch,
        delta.seq,
        delta.baseSeq,
        delta.pageSize,
        delta.pageCount,
        len(numbers),
        bytes.fromhex(delta.store),
        delta.imageDigest,
        delta.takenAt,
        len(body),
    )
    checksum = hashlib.sha256(header)
    checksum.update(body)
    return b"".join((header, body, checksum.digest()))


def decodeRecord(data: bytes) -> Delta:
    """
    Decode and verify a record.

    @raise CorruptRecord: if C{data} is not exactly one well-formed record of
        a known version with a correct checksum.
    """
    if len(data) < _HEADER.size + _CHECKSUM_LENGTH:
        raise CorruptRecord(f"record is truncated: {len(data)} bytes")
    (
        magic,
        version,
        kind,
        reserved,
        epoch,
        seq,
        baseSeq,
        pageSize,
        pageCount,
        changed,
        store,
        digest,
        takenAt,
        bodyLength,
    ) = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CorruptRecord("not a durable record (bad magic)")
    if version not in FORMAT_VERSIONS:
        raise CorruptRecord(f"record format version {version} is not supported")
    expected = _HEADER.size + bodyLength + _CHECKSUM_LENGTH
    if len(data) != expected:
        raise CorruptRecord(f"record is {len(data)} bytes; its header says {expected}")
    if hashlib.sha256(data[:-_CHECKSUM_LENGTH]).digest() != data[-_CHECKSUM_LENGTH:]:
        raise CorruptRecord("record checksum does not match")
    # From here on the bytes are what the writer wrote; the checks below
    # catch a writer that wrote nonsense.
    if kind not in (_KIND_DELTA, _KIND_SNAPSHOT) or reserved != 0:
        raise CorruptRecord(f"unknown record kind {kind}")
    if (kind == _KIND_SNAPSHOT) != (baseSeq == 0) or seq < 1 or baseSeq >= seq:
        raise CorruptRecord(f"record sequence {seq} on base {baseSeq} is inconsistent")
    if not _validPageSize(pageSize) or pageCount > _MAX_PAGE_COUNT or changed > pageCount:
        raise CorruptRecord("record page geometry is invalid")
    if kind == _KIND_SNAPSHOT and changed != pageCount:
        raise CorruptRecord("a snapshot must carry every page")
    size = changed * (4 + pageSize)
    try:
        decompressor = zlib.decompressobj()
        body = decompressor.decompress(data[_HEADER.size : _HEADER.size + bodyLength], size + 1)
        if len(body) != size or not decompressor.eof or decompressor.unused_data:
            raise CorruptRecord("record body does not match its header")
    except zlib.error as e:
        raise CorruptRecord(f"record body is not valid zlib: {e}") from None
    numbers = struct.unpack_from(f">{changed}I", body)
    if list(numbers) != sorted(set(numbers)) or (numbers and not 1 <= numbers[0] <= numbers[-1] <= pageCount):
        raise CorruptRecord("record page numbers are out of order or range")
    offset = 4 * changed
    pages = tuple(
        (number, body[offset + i * pageSize : offset + (i + 1) * pageSize])
        for i, number in enumerate(numbers)
    )
    return Delta(
        store=store.hex(),
        epoch=epoch,
        seq=seq,
        baseSeq=baseSeq,
        pageSize=pageSize,
        pageCount=pageCount,
        pages=pages,
        imageDigest=digest,
        takenAt=takenAt,
        version=version,
    )


def applyDelta(
    image: bytearray, digests: list[bytes], delta: Delta, groups: list[bytes] | None = None
) -> None:
    """
    Apply C{delta} to C{image} in place, keeping C{digests} (the page digests
    of C{image}) and, when given, C{groups} (their L{groupDigests}) up to
    date.  With C{groups}, checking a version 2 record's image digest costs
    what the record changed; without them, what the image holds.

    @raise CorruptRecord: if the page size differs from the image's, a page
        the image grows by is not carried, or the result's digest differs
        from the one the record promises.
    """
    previousCount = len(digests)
    if delta.isSnapshot:
        del image[:]
        del digests[:]
        previousCount = 0
    elif digests and len(image) // len(digests) != delta.pageSize:
        raise CorruptRecord(f"record {delta.seq} changes the page size")
    size = delta.pageSize
    count = delta.pageCount
    numbers = [number for number, _ in delta.pages]
    if count > previousCount:
        carried = set(numbers)
        if any(number not in carried for number in range(previousCount + 1, count + 1)):
            raise CorruptRecord(
                f"record {delta.seq} does not carry every page the image grows by "
                f"(wrong base or lost pages)"
            )
    newLength = count * size
    if len(image) > newLength:
        del image[newLength:]
        del digests[count:]
    elif len(image) < newLength:
        missing = count - len(digests)
        image.extend(bytes(missing * size))
        digests.extend([b""] * missing)
    for number, page in delta.pages:
        image[(number - 1) * size : number * size] = page
        digests[number - 1] = hashlib.blake2b(page, digest_size=16).digest()
    if groups is not None:
        groups[:] = regroup(groups, digests, numbers, previousCount)
    if imageDigest(digests, size, groups, delta.version) != delta.imageDigest:
        raise CorruptRecord(
            f"record {delta.seq} does not rebuild the image its writer had "
            f"(wrong base or lost pages)"
        )
