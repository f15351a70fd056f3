"""Storage: every file the pipeline reads or writes, on local disk or in an object store.

A path is either a local path (``pathlib.Path``; everything works exactly as
on a plain filesystem: ``fsync``, ``os.replace``, memory-mapped spills) or a
URL with a protocol fsspec knows (``s3://bucket/key``, ``gs://``, ``az://``,
``memory://``...), held as a ``upath.UPath`` so ``/`` joins, ``exists()``,
``read_text()`` and ``glob()`` read the same in both cases. The engines, the
writers and the runner call the few functions here where a local-only call
(``os.replace``, ``shutil.rmtree``, ``pa.OSFile``) would not do.

Credentials and endpoints come from the usual environment of the backend
(for S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, instance roles; fsspec's
``FSSPEC_<PROTOCOL>_<OPTION>`` variables for anything else). gristmill never
logs them and never writes them anywhere: recipes and manifests hold only URLs.

Atomicity
    Local files are written under a temporary name in their final folder,
    fsynced and renamed. On object stores whose single-object write only
    becomes visible when complete (S3, GCS, Azure: a multipart upload that is
    never completed leaves no object) a file is written straight to its key,
    and a write that fails is aborted (``discard``), never completed; on any
    other fsspec backend it is written to a temporary key and moved. Either
    way no reader ever sees half a file. The run's output is published by the
    runner: shards are written under ``_work/``, moved to ``shards/`` and the
    manifest is written last; the manifest is the commit point, and a reader
    trusts only the files it lists.

Listings are never cached (``use_listings_cache=False``): done markers and
spills are written by other processes, and a cached listing would hide them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: protocols whose object write is all-or-nothing (see the module docstring)
ATOMIC_PUT = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
LOCAL_PROTOCOLS = frozenset({"", "file", "local"})
READ_BLOCK = 8 << 20  # bytes an object-store file fetches per range request


def protocol_of(path: str | os.PathLike) -> str:
    """The URL protocol of ``path`` (``""`` for a local path)."""
    s = str(path) if not hasattr(path, "protocol") else None
    if s is None:
        return path.protocol or ""  # type: ignore[union-attr]
    head, sep, _ = s.partition("://")
    return head.lower() if sep and head.isidentifier() else ""


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL of a non-local fsspec filesystem (``s3://...``)."""
    return protocol_of(path) not in LOCAL_PROTOCOLS


def as_path(path: str | os.PathLike) -> Path:
    """A local ``Path``, or a ``UPath`` for a URL. ``file://`` URLs become local paths.

    The return type says ``Path`` because a ``UPath`` offers the same methods
    the pipeline uses (``/``, ``name``, ``parent``, ``exists``, ``read_text``,
    ``glob``); code that needs a real local file asks ``is_remote`` first.
    """
    if hasattr(path, "protocol"):  # a UPath already
        return path if is_remote(path) else Path(path.path)  # type: ignore[return-value]
    if is_remote(path):
        from upath import UPath

        return UPath(str(path), use_listings_cache=False)  # type: ignore[return-value]
    s = os.fspath(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return Path(s)


def _fs(path: Path) -> tuple[Any, str]:
    """(fsspec filesystem, key) of a remote path."""
    return path.fs, path.path  # type: ignore[attr-defined]


def url(path: Path) -> str:
    """The string form a user reads: the local path or the full URL."""
    return str(path)


def mkdirs(path: Path) -> None:
    """Make a local folder (and its parents); object stores have no folders."""
    if not is_remote(path):
        Path(path).mkdir(parents=True, exist_ok=True)


def tmp_name(path: Path) -> Path:
    """The temporary name a file is written under before it is published."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class AtomicFile:
    """A binary file written in full or not at all (see the module docstring).

    ``file`` is the object to write to (a real OS file locally); ``commit()``
    publishes it, ``abort()`` throws it away. Use as a context manager:
    committed when the block ends normally, aborted when it raises.
    """

    def __init__(self, path: Path) -> None:
        self.path = as_path(path)
        self.remote = is_remote(self.path)
        self._direct = self.remote and protocol_of(self.path) in ATOMIC_PUT
        self._target = self.path if self._direct else tmp_name(self.path)
        if self.remote:
            fs, key = _fs(self._target)
            self.file: IO[bytes] = fs.open(key, "wb")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self._target, "wb")  # noqa: SIM115 (closed by commit/abort)
        self.done = False

    def tell(self) -> int:
        return self.file.tell()

    def commit(self) -> None:
        if self.done:
            return
        self.done = True
        if self.remote:
            self.file.close()
            if not self._direct:
                fs, key = _fs(self._target)
                fs.mv(key, _fs(self.path)[1])
            return
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        os.replace(self._target, self.path)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        with contextlib.suppress(Exception):
            if self.remote and hasattr(self.file, "discard"):
                self.file.discard()  # an unfinished multipart upload leaves no object
                self.file.closed = True  # never flushed later (fsspec closes on __del__)
            else:
                self.file.close()
        with contextlib.suppress(Exception):
            remove(self._target)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (local: temp name, fsync, rename)."""
    with AtomicFile(path) as f:
        f.file.write(data)


def open_read(path: Path) -> IO[bytes]:
    """A seekable binary file to read (object stores: ranged reads of ``READ_BLOCK``)."""
    path = as_path(path)
    if is_remote(path):
        fs, key = _fs(path)
        return fs.open(key, "rb", block_size=READ_BLOCK)
    return open(path, "rb")  # noqa: SIM115 (the caller closes it)


def open_ranges(path: Path) -> IO[bytes]:
    """``open_read`` for a reader that reads some ranges of a file (the footer and row
    groups of a piece of a Parquet file): on an object store each read fetches the bytes
    it asks for and no more (``open_read`` reads ahead ``READ_BLOCK`` bytes)."""
    path = as_path(path)
    if is_remote(path):
        fs, key = _fs(path)
        return fs.open(key, "rb", block_size=READ_BLOCK, cache_type="none")
    return open(path, "rb")  # noqa: SIM115 (the caller closes it)


def read_bytes(path: Path) -> bytes:
    with open_read(path) as f:
        return f.read()


def exists(path: Path) -> bool:
    return as_path(path).exists()


def stat(path: Path) -> dict[str, int]:
    """``size`` and ``mtime_ns`` (object stores: the object's last-modified time)."""
    path = as_path(path)
    if not is_remote(path):
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fs, key = _fs(path)
    info = fs.info(key)
    if info.get("type") == "directory":
        raise IsADirectoryError(str(path))
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if hasattr(mtime, "timestamp"):
        ns = int(mtime.timestamp() * 1e9)
    elif isinstance(mtime, (int, float)):
        ns = int(mtime * 1e9)
    else:
        ns = 0
    return {"size": int(info["size"]), "mtime_ns": ns}


def size(path: Path) -> int:
    return stat(path)["size"]


def replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing it (local ``os.replace``; remote copy + delete)."""
    src, dst = as_path(src), as_path(dst)
    if is_remote(src) != is_remote(dst):
        raise ValueError(f"cannot move between filesystems: {src} -> {dst}")
    if not is_remote(src):
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return
    fs, key = _fs(src)
    fs.mv(key, _fs(dst)[1])


def remove(path: Path) -> None:
    """Delete a file if it is there."""
    path = as_path(path)
    if is_remote(path):
        fs, key = _fs(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(key)
        return
    path.unlink(missing_ok=True)


def remove_tree(path: Path) -> None:
    """Delete a folder (every key under a prefix) if it is there."""
    path = as_path(path)
    if is_remote(path):
        fs, key = _fs(path)
        keys = fs.find(key.rstrip("/") + "/", withdirs=False)
        if keys:
            fs.rm(keys)
        return
    shutil.rmtree(path, ignore_errors=True)


def is_file(path: Path) -> bool:
    return as_path(path).is_file()


def is_dir(path: Path) -> bool:
    """A local folder, or a prefix that holds at least one object."""
    path = as_path(path)
    if not is_remote(path):
        return path.is_dir()
    fs, key = _fs(path)
    if protocol_of(path) in ("s3", "s3a") and "/" in key.strip("/"):
        # one key is enough to know: never list a prefix of a million objects for it
        bucket, _, prefix = key.strip("/").partition("/")
        r = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix + "/", MaxKeys=1)
        return bool(r.get("KeyCount") or r.get("Contents"))
    return fs.isdir(key)


def find_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, recursively, sorted."""
    folder = as_path(folder)
    if not is_remote(folder):
        return sorted(q for q in folder.rglob("*") if q.is_file())
    fs, key = _fs(folder)
    proto = protocol_of(folder)
    return sorted(as_path(f"{proto}://{k}") for k in fs.find(key.rstrip("/") + "/"))


def glob_files(pattern: Path) -> list[Path]:
    """Files matching a glob (``**`` recursive), sorted."""
    pattern = as_path(pattern)
    if not is_remote(pattern):
        import glob

        return sorted(Path(q) for q in glob.glob(str(pattern), recursive=True)
                      if Path(q).is_file())
    fs, key = _fs(pattern)
    proto = protocol_of(pattern)
    found = fs.glob(key, detail=True)
    return sorted(as_path(f"{proto}://{k}") for k, info in found.items()
                  if info.get("type") != "directory")


@contextlib.contextmanager
def local_copy(path: Path) -> Iterator[Path]:
    """A local path holding ``path``'s content (the path itself when it is local).

    For libraries that only open local files; the copy is deleted afterwards.
    """
    path = as_path(path)
    if not is_remote(path):
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gristmill-") as d:
        local = Path(d) / path.name
        fs, key = _fs(path)
        fs.get(key, str(local))
        yield local
