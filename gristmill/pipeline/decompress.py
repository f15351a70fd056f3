"""Decompression that loses nothing: gzip (multi-member) and zstd (multi-frame).

``gzip.GzipFile`` drops the output of the read in which a fault happens, and
``ZstdDecompressor().stream_reader`` ends quietly inside a truncated frame. The
stream here feeds the decompressor small compressed chunks, returns everything
decoded before a fault, and raises the fault (``StreamFault``, status
``truncated`` or ``corrupt``) on the next read, so a reader keeps every line
before it.

A piece of a split zstd file (``FrameRange``) starts decoding at a frame boundary
(frames are independent) and keeps the decompressed bytes of its range;
``zstd_data_frames`` counts a file's frames from their headers.
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

    def __init__(self, path: str, kind: str, tap: Callable[[bytes], Any] | None = None,
                 offset: int = 0) -> None:
        self._f = storage.open_read(path)
        if offset:
            self._f.seek(offset)  # a frame start (a piece of a split zstd file)
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


def compression_of(path: str) -> str | None:
    """``"gz"``, ``"zst"`` or None (not compressed), from the file name."""
    if path.endswith(".gz"):
        return "gz"
    if path.endswith(".zst"):
        return "zst"
    return None


def open_binary(path: str, tap: Callable[[bytes], Any] | None = None) -> io.IOBase:
    """The file's bytes, decompressed for ``.gz`` and ``.zst``; a local file or an
    object-store URL (``storage.open_read``: ranged reads of 8 MB). ``tap``, if
    given, sees every raw (compressed) byte read, in order."""
    kind = compression_of(path)
    if kind is not None:
        return DecompressedStream(path, kind, tap)
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


class FrameRange:
    """Decompressed bytes ``[start, end)`` of a multi-frame zstd file (a piece of a
    split file, see ``splits.plan_zstd``): decoded from the frame that starts at
    compressed byte ``offset`` and whose output starts at decompressed byte ``base``
    (``base <= start``), on through later frames until ``end``; the bytes before
    ``start`` are decoded and dropped. ``tap`` sees every byte returned."""

    def __init__(self, path: str, offset: int, base: int, start: int, end: int,
                 tap: Callable[[bytes], Any] | None = None) -> None:
        self._stream = DecompressedStream(path, "zst", offset=offset)
        self._skip = start - base
        self._left = end - start
        self._tap = tap

    def read(self, n: int = -1) -> bytes:
        while self._left > 0:
            data = self._stream.read(n if n > 0 else COMPRESSED_CHUNK)
            if not data:
                return b""  # ended early: the piece's size and hash check tell
            if self._skip:
                dropped = min(self._skip, len(data))
                data, self._skip = data[dropped:], self._skip - dropped
                if not data:
                    continue
            data = data[:self._left]
            self._left -= len(data)
            if self._tap is not None:
                self._tap(data)
            return data
        return b""

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> FrameRange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC, SKIPPABLE_MASK = 0x184D2A50, 0xFFFFFFF0  # 16 skippable magics


def is_skippable(head: bytes) -> bool:
    """Whether the frame starting with ``head`` is a skippable frame (no content)."""
    return len(head) >= 4 and int.from_bytes(head[:4], "little") & SKIPPABLE_MASK == \
        SKIPPABLE_MAGIC


def zstd_data_frames(path: str, stop_at: int, limit: int | None = None) -> int:
    """How many data frames (skippable ones not counted) a zstd file holds, counting
    no further than ``stop_at`` frame starts and looking no further than compressed
    byte ``limit``; -1 when a header is not zstd or the file ends inside a frame
    (found only where the walk got to).

    Reads headers only, no decompression: a frame's header, then the 3-byte header of
    each of its blocks (RFC 8878 section 3.1.1.2: last-block bit, type, size), seeking
    over the blocks' bytes. Local files: a few bytes per block of at most 128 KiB; on
    an object store the seeks are served by ranged reads of ``storage.READ_BLOCK``, so
    the walk downloads what it walks over.
    """
    frames = 0
    with storage.open_read(path) as f:
        end = f.seek(0, io.SEEK_END)
        pos = 0
        while frames < stop_at:
            if limit is not None and pos > limit:
                return frames
            f.seek(pos)
            head = f.read(18)  # the longest frame header
            if not head:
                return frames
            if is_skippable(head):
                if len(head) < 8:
                    return -1
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            if len(head) < 5 or int.from_bytes(head[:4], "little") != ZSTD_MAGIC:
                return -1
            try:
                pos += zstandard.frame_header_size(head)
            except zstandard.ZstdError:
                return -1
            frames += 1
            if frames >= stop_at:
                return frames
            checksum = head[4] & 0x04
            while True:
                f.seek(pos)
                block = f.read(3)
                if len(block) < 3:
                    return -1
                value = int.from_bytes(block, "little")
                kind = (value >> 1) & 3
                if kind == 3:  # reserved block type: not zstd
                    return -1
                pos += 3 + (1 if kind == 1 else value >> 3)  # an RLE block stores one byte
                if value & 1:
                    break
            pos += 4 if checksum else 0
            if pos > end:
                return -1
    return frames
