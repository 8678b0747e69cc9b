"""Byte-stream wrappers the store reads and writes through: sha256 while streaming, and zstd decompression."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import IO

CHUNK = 8 * 1024 * 1024  # read and copy buffer
COMPRESSED = (".gz", ".bz2", ".zst")  # decompressed by open_read, by extension


class HashingReader(io.RawIOBase):
    """Hashes and counts the bytes read through it; ``finish`` reads the rest, so the digest is the file's."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._raw.readinto(buf)
        if n:
            self.hash.update(memoryview(buf)[:n])
            self.size += n
        return n or 0

    def finish(self) -> None:
        buf = bytearray(CHUNK)
        while self.readinto(buf):
            pass


class HashingWriter(io.RawIOBase):
    """Hashes and counts the bytes written through it to ``raw``."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.hash.update(data)
        n = self._raw.write(data)
        self.size += len(data)
        return n if n is not None else len(data)

    def flush(self) -> None:
        self._raw.flush()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a local file, read as it is stored."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ZstdReader(io.RawIOBase):
    """A ``.zst`` stream as Pushshift's dumps are: several frames, windows up to 2 GiB (which the
    library refuses by default). Unlike zstandard's own stream reader it fails on a stream cut
    inside a frame (EOFError, like gzip and bz2) instead of ending quietly; corrupt data is an OSError."""

    def __init__(self, raw: IO[bytes], read_bytes: int = 1 << 20):
        import zstandard

        self._error = zstandard.ZstdError
        self._dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        self._frame = None
        self._raw = raw
        self._read_bytes = read_bytes
        self._out = b""
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while self._pos >= len(self._out) and not self._done:
            chunk = self._raw.read(self._read_bytes)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("zstd stream ended inside a frame (truncated file)")
                self._done = True
                return
            out = []
            try:
                while chunk:
                    if self._frame is None or self._frame.eof:
                        self._frame = self._dctx.decompressobj()
                    out.append(self._frame.decompress(chunk))
                    chunk = self._frame.unused_data if self._frame.eof else b""
            except self._error as e:
                raise OSError(f"corrupt zstd stream: {e}") from e
            self._out, self._pos = b"".join(out), 0

    def readinto(self, buffer) -> int:
        self._fill()
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = memoryview(self._out)[self._pos : self._pos + n]
        self._pos += n
        return n
