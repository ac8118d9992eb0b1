"""CRC-32, as the output files and ``progress.json`` record it: of a file (:func:`file_checksum`), of a
region read back (:func:`region_crc`), and of two byte strings joined, from their CRCs alone
(:func:`crc32_combine`: a framed shard's checksum from its tensors' CRCs)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from merger.units import SIZES


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial (reflected bit order), as zlib's ``multmodp``."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from CRC-32(A), CRC-32(B) and len(B), in about 0.1 ms (zlib's
    ``crc32_combine``, which Python's zlib doesn't expose): a framed shard's checksum from its
    tensors' CRCs, without a second pass over their bytes."""
    p, n, k = 1 << 31, len2, 3  # x^(8 * len2)
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def region_crc(fd: int, at: int, n: int) -> int:
    """CRC-32 of ``n`` bytes of ``fd`` at ``at``, read back (a file shorter than that: -1)."""
    crc, end = 0, at + n
    while at < end:
        piece = os.pread(fd, min(SIZES.copy_piece, end - at), at)
        if not piece:
            return -1
        crc, at = zlib.crc32(piece, crc), at + len(piece)
    return crc


def file_checksum(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """``crc32:<8 hex digits>`` of a file's bytes: what ``progress.json`` records per finished shard."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"crc32:{crc:08x}"
