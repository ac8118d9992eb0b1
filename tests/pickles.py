"""Pickles written opcode by opcode in torch's weights_only grammar (the opcodes and globals of
torch's ``torch._weights_only_unpickler``), for tests that feed ``torch.load`` and merger the same
bytes; and the torch.save zip around them."""

from __future__ import annotations

import io
import struct
import zipfile


class P:
    """A pickle under construction: each method appends opcodes that push one value."""

    def __init__(self):
        self.b = bytearray(b"\x80\x02")
        self.memo = 0

    def op(self, raw: bytes) -> P:
        self.b += raw
        return self

    def put(self) -> int:
        i = self.memo
        self.memo += 1
        self.op(b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i))
        return i

    def get(self, i: int) -> P:
        return self.op(b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i))

    def glob(self, module: str, name: str) -> P:
        return self.op(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def none(self):
        return self.op(b"N")

    def bool(self, v):
        return self.op(b"\x88" if v else b"\x89")

    def int(self, v: int):
        if 0 <= v < 256:
            return self.op(b"K" + bytes([v]))
        if 0 <= v < 65536:
            return self.op(b"M" + struct.pack("<H", v))
        if -2**31 <= v < 2**31:
            return self.op(b"J" + struct.pack("<i", v))
        raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        return self.op(b"\x8a" + bytes([len(raw)]) + raw)

    def float(self, v: float):
        return self.op(b"G" + struct.pack(">d", v))

    def str(self, v: str):
        raw = v.encode("utf-8", "surrogatepass")
        return self.op(b"X" + struct.pack("<I", len(raw)) + raw)

    def mark(self):
        return self.op(b"(")

    def tuple(self, n: int | None = None):
        """Close a tuple of the last ``n`` values (1-3: TUPLE1-3; None: since the last mark)."""
        return self.op({0: b")", 1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(n, b"t") if n is not None else b"t")

    def reduce(self):
        return self.op(b"R")

    def build(self):
        return self.op(b"b")

    def storage(self, cls: str, key: str, numel: int, location: str = "cpu"):
        self.mark().str("storage").glob("torch", cls).str(key).str(location).int(numel).tuple()
        return self.op(b"Q")

    def dump(self) -> bytes:
        return bytes(self.b + b".")


def torch_zip(pkl: bytes, blobs: dict[str, bytes], *, trailing: bytes = b"") -> bytes:
    """A stored zip as torch.save lays it out: ``archive/data.pkl``, byteorder, the storages, version."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(zipfile.ZipInfo("archive/data.pkl"), pkl)
        z.writestr("archive/byteorder", b"little")
        for key, data in blobs.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", b"3\n")
    return buf.getvalue() + trailing
