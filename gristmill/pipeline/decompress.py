"""Decompression that loses nothing: gzip (multi-member) and zstd (multi-frame).

``gzip.GzipFile`` drops the output of the read in which a fault happens, and
``ZstdDecompressor().stream_reader`` ends quietly inside a truncated frame. The
stream here feeds the decompressor small compressed chunks, returns everything
decoded before a fault, and raises the fault (``StreamFault``, status
``truncated`` or ``corrupt``) on the next read, so a reader keeps every line
before it.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from typing import Any

import zstandard

from gristmill.pipeline import storage

COMPRESSED_CHUNK = 64 << 10  # compressed bytes fed to a decompressor at a time


class StreamFault(Exception):
    """A compressed stream ended early (``truncated``) or holds bad data (``corrupt``)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


class DecompressedStream(io.RawIOBase):
    """gzip (multi-member) or zstd (multi-frame) decompression that loses nothing.

    ``gzip.GzipFile`` and ``ZstdDecompressor().stream_reader`` either drop the
    output of the read in which a fault happens or end quietly inside a frame.
    Here the decompressor is fed small compressed chunks; output decoded
    before a fault is returned first and the fault (``StreamFault``) is raised
    by the next ``read``. A gzip chunk that fails is replayed byte by byte
    from a copy of the decompressor, so everything zlib can decode before the
    bad byte comes out.
    """

    def __init__(self, path: str, kind: str, tap: Callable[[bytes], Any] | None = None) -> None:
        self._f = storage.open_read(path)
        if tap is not None:
            self._f = TappedFile(self._f, tap)
        self._kind = kind
        self._dec = self._new()
        self._in_member = False
        self._fault: StreamFault | None = None

    def _new(self) -> Any:
        if self._kind == "gz":
            return zlib.decompressobj(wbits=31)
        return zstandard.ZstdDecompressor().decompressobj()

    def _feed(self, data: bytes, out: bytearray) -> None:
        while data:
            self._in_member = True
            out += self._dec.decompress(data)
            if self._dec.eof:
                self._in_member = False
                data = self._dec.unused_data
                self._dec = self._new()
            else:
                data = b""

    def _feed_exact(self, chunk: bytes, out: bytearray) -> None:
        """Feed ``chunk``; on corrupt data keep what was decoded before the bad byte."""
        saved = self._dec.copy() if self._kind == "gz" else None
        try:
            self._feed(chunk, out)
            return
        except (zlib.error, zstandard.ZstdError) as e:
            error = e
        if saved is not None:
            self._dec = saved
            try:
                for i in range(len(chunk)):
                    self._feed(chunk[i:i + 1], out)
            except zlib.error as e:
                error = e
        name = "gzip" if self._kind == "gz" else "zstd"
        raise StreamFault("corrupt", f"corrupt {name} data: {type(error).__name__}: {error}")

    def read(self, n: int = -1) -> bytes:
        if self._fault is not None:
            raise self._fault
        out = bytearray()
        while len(out) < max(n, 1):
            chunk = self._f.read(COMPRESSED_CHUNK)
            if not chunk:
                if self._in_member:
                    name = "gzip member" if self._kind == "gz" else "zstd frame"
                    self._fault = StreamFault(
                        "truncated", f"EOFError: file ends inside a {name} (truncated file)")
                break
            try:
                self._feed_exact(chunk, out)
            except StreamFault as e:
                self._fault = e
                break
        if not out and self._fault is not None:
            raise self._fault
        return bytes(out)

    def close(self) -> None:
        self._f.close()
        super().close()


class TappedFile:
    """A binary file that hands every chunk it reads to ``tap`` (to hash a file
    while it is read, instead of reading it a second time)."""

    def __init__(self, f: Any, tap: Callable[[bytes], Any]) -> None:
        self._f, self._tap = f, tap

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._tap(data)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_binary(path: str, tap: Callable[[bytes], Any] | None = None) -> io.IOBase:
    """The file's bytes, decompressed for ``.gz`` and ``.zst``; a local file or an
    object-store URL (``storage.open_read``: ranged reads of 8 MB). ``tap``, if
    given, sees every raw (compressed) byte read, in order."""
    if path.endswith(".gz"):
        return DecompressedStream(path, "gz", tap)
    if path.endswith(".zst"):
        return DecompressedStream(path, "zst", tap)
    f = storage.open_read(path)
    return f if tap is None else TappedFile(f, tap)


class RangeFile:
    """Bytes ``[start, end)`` of a file (a piece of a split input, see ``splits``),
    read with ordinary reads after one seek; ``tap`` sees every byte read."""

    def __init__(self, path: str, start: int, end: int,
                 tap: Callable[[bytes], Any] | None = None) -> None:
        self._f = storage.open_read(path)
        self._f.seek(start)
        self._left = end - start
        self._tap = tap

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        data = self._f.read(self._left if n < 0 else min(n, self._left))
        self._left -= len(data)
        if self._tap is not None:
            self._tap(data)
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RangeFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_range(path: str, start: int, end: int,
               tap: Callable[[bytes], Any] | None = None) -> RangeFile:
    """Bytes ``[start, end)`` of an uncompressed file, local or an object-store URL."""
    return RangeFile(path, start, end, tap)
