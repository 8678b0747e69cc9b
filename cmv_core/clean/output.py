"""The conversations file's writer: gzip compressed on a second thread, deterministic bytes."""

from __future__ import annotations

import contextlib
import gzip
import queue
import threading
from collections.abc import Iterator
from typing import IO

from cmv_core import storage


class BackgroundGzip:
    """A write-only gzip stream compressed on a second thread, in order.

    Compressing the conversations costs more CPU than parsing the dump (zlib's
    default level 6 runs at ~20 MB/s here, level 1 at ~130 MB/s, ISA-L's igzip
    at ~500 MB/s). So: igzip (the `isal` package, in the `clean` extra) when it
    is installed, else zlib level 1; on a second thread, since both release the
    GIL while compressing. `mtime=0` and no file name in the header, and chunk
    boundaries that depend only on the content: the same input gives the same
    bytes (for the same compressor). Memory is bounded by `depth` chunks.
    """

    def __init__(self, raw: IO[bytes], chunk_bytes: int = 4 << 20, depth: int = 4):
        try:
            from isal import igzip

            self._gz: IO[bytes] = igzip.IGzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=2)
        except ImportError:
            self._gz = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=1)
        self._chunk_bytes = chunk_bytes
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(maxsize=depth)
        self._parts: list[bytes] = []
        self._size = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="gzip-writer", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= self._chunk_bytes:
            self._hand_off()

    def _hand_off(self) -> None:
        if self._error is not None:
            raise self._error
        if self._parts:
            self._queue.put(self._parts)
            self._parts, self._size = [], 0

    def _drain(self) -> None:
        while (parts := self._queue.get()) is not None:
            if self._error is None:  # after an error, keep draining so the producer never blocks
                try:
                    # joined here, not on the producer's thread; same chunks for the same content
                    self._gz.write(b"".join(parts))
                except BaseException as exc:  # noqa: BLE001 - re-raised on the producer's thread
                    self._error = exc

    def close(self) -> None:
        self._hand_off()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._gz.close()

    def abort(self) -> None:
        self._parts = []
        self._queue.put(None)
        self._thread.join()


@contextlib.contextmanager
def open_gzip_output(output: str, name: str) -> Iterator[BackgroundGzip]:
    """Write `<output>/<name>` through a BackgroundGzip; it appears only if the block exits
    cleanly (storage.open_write: atomic, hashed while written, recorded for finish_stage)."""
    with storage.open_write(storage.join(output, name), "wb", compress=False) as raw:
        writer = BackgroundGzip(raw)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise
        writer.close()
