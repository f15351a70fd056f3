"""Local copies of remote model and tokenizer files, keyed by what the object store holds.

fastText, ``transformers`` and ``tokenizers`` open local files only (a
fastText ``.bin`` is read by C++, a model folder by ``from_pretrained``). A
recipe may still name them by URL (``model: s3://models/preselect.bin``,
``tokenizer: gs://models/tok``): before a stage loads one, ``localize``
downloads it once per machine into a cache and returns the local path.

Cache layout: ``$GRISTMILL_CACHE/models`` (default ``~/.cache/gristmill/models``)
holds one folder per version of a remote file or folder::

    <key>/<name>            the file, or the folder with its files
    <key>/source.json       the URL (credentials removed) and the listing it was keyed on

``key`` is the SHA-256 of the URL and of the listing of every object under it
(relative name, size, and the store's version tag: ``ETag`` on S3 and Azure,
``md5Hash``/``generation`` on GCS, else the last-modified time). A changed
object on the store gets a new key, so a cached copy is never stale; the
listing is one metadata request per file or prefix, never a download.

Atomic and safe for several worker processes on one machine: the first
process to need a key takes an exclusive ``flock`` on ``<key>.lock``,
downloads into ``.<key>.tmp-<pid>`` and renames that folder to ``<key>``; the
others wait on the lock and find ``<key>`` complete. A download killed half
way leaves only a temporary folder, removed by the next process that takes
the lock. Different machines each keep their own cache (nothing is shared).

Credentials come from the backend's usual environment (``AWS_*`` variables,
profiles and roles for S3; ``GOOGLE_APPLICATION_CREDENTIALS``;
``FSSPEC_<PROTOCOL>_<OPTION>``); URLs are logged and recorded with any
``user:password@`` part removed.

Example
-------
>>> import fsspec, os, tempfile
>>> os.environ["GRISTMILL_CACHE"] = tempfile.mkdtemp()
>>> with fsspec.open("memory://models/m.txt", "wb") as f:
...     _ = f.write(b"weights")
>>> local = localize("memory://models/m.txt")
>>> open(local, "rb").read(), localize("memory://models/m.txt") == local
(b'weights', True)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gristmill.pipeline import storage

log = logging.getLogger(__name__)

#: metadata keys that name an object's version, most specific first
VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "VersionId", "version_id", "crc32c")
MTIME_KEYS = ("LastModified", "last_modified", "mtime", "updated", "created")
_USERINFO = re.compile(r"(://)[^/@]*@")


def redact(url: str) -> str:
    """``url`` without a ``user:password@`` part (what logs and cache records show)."""
    return _USERINFO.sub(r"\1", str(url))


def cache_root() -> Path:
    """``$GRISTMILL_CACHE/models``, or ``~/.cache/gristmill/models``."""
    base = os.environ.get("GRISTMILL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "gristmill")
    return Path(base) / "models"


def _version(info: dict[str, Any]) -> str:
    for k in VERSION_KEYS:
        if info.get(k) not in (None, ""):
            return f"{k}={info[k]}"
    for k in MTIME_KEYS:
        if info.get(k) not in (None, ""):
            return f"{k}={info[k]}"
    return ""


def remote_listing(path: str | os.PathLike) -> list[tuple[str, int, str]]:
    """``(relative name, size, version)`` of the object at ``path``, or of every
    object under it when it is a prefix (``""`` names the object itself).

    Raises FileNotFoundError when nothing is there.
    """
    p = storage.as_path(path)
    fs, key = p.fs, p.path  # type: ignore[attr-defined]
    key = key.rstrip("/")
    try:
        info = fs.info(key)
    except FileNotFoundError:
        info = {"type": "directory"}  # a prefix without a folder marker; listed below
    if info.get("type") == "file":
        return [("", int(info["size"]), _version(info))]
    found = fs.find(key + "/", withdirs=False, detail=True)
    out = []
    for k, inf in sorted(found.items()):
        rel = k[len(key) + 1:] if k.startswith(key + "/") else k.rsplit("/", 1)[-1]
        if rel and not rel.endswith("/"):
            out.append((rel, int(inf.get("size") or 0), _version(inf)))
    if not out:
        raise FileNotFoundError(f"{redact(str(path))}: no such object or prefix")
    return out


def cache_key(url: str, listing: list[tuple[str, int, str]]) -> str:
    """SHA-256 (hex) of the URL and its listing: the cache folder's name."""
    body = json.dumps([redact(url).rstrip("/"), listing], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # released by the kernel if we die
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def localize(path: str | os.PathLike) -> str:
    """A local path holding the file or folder at ``path``.

    A local path is returned unchanged (as a string). A URL of any fsspec
    filesystem (``s3://``, ``gs://``, ``az://``, ``memory://``...) is
    downloaded once per machine into the cache (see the module docstring) and
    the cached copy's path is returned: the file itself for an object, the
    folder for a prefix (a ``save_pretrained`` folder).

    Parameters
    ----------
    path : str or path-like
        A local path or a URL.

    Returns
    -------
    str
        A local path; the same for every process on this machine as long as
        the remote objects do not change.

    Raises
    ------
    FileNotFoundError
        When no object and no prefix is at the URL.
    """
    if not storage.is_remote(path):
        return os.fspath(path)
    url = str(storage.as_path(path)).rstrip("/")
    listing = remote_listing(url)
    key = cache_key(url, listing)
    root = cache_root()
    name = url.rsplit("/", 1)[-1] or "object"
    final = root / key
    target = final / name
    if final.is_dir():
        return str(target)
    with _exclusive(root / f"{key}.lock"):
        if final.is_dir():  # another process finished it while we waited
            return str(target)
        for stale in root.glob(f".{key}.tmp-*"):  # left by a killed download
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{key}.tmp-{os.getpid()}"
        try:
            _download(url, listing, tmp / name)
            (tmp / "source.json").write_text(json.dumps(
                {"url": redact(url), "files": [list(e) for e in listing]}, indent=1) + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("model cache: %s -> %s (%d file(s), %d bytes)", redact(url), target,
             len(listing), sum(e[1] for e in listing))
    return str(target)


def _download(url: str, listing: list[tuple[str, int, str]], dest: Path) -> None:
    p = storage.as_path(url)
    fs, key = p.fs, p.path.rstrip("/")  # type: ignore[attr-defined]
    for rel, size, _ in listing:
        local = dest / rel if rel else dest
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{key}/{rel}" if rel else key, str(local))
        got = local.stat().st_size
        if got != size:
            raise OSError(f"{redact(url)}/{rel}: downloaded {got} bytes, the store lists {size}")


def is_model_file(path: str) -> bool:
    """A local file, or an object at a URL (one metadata request, no download)."""
    return storage.is_file(path) if storage.is_remote(path) else os.path.isfile(path)


def is_model_folder(path: str) -> bool:
    """A local folder, or a prefix with at least one object under it."""
    return storage.is_dir(path) if storage.is_remote(path) else os.path.isdir(path)
