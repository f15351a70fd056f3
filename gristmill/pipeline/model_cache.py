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

Pinning (one version per run)
    A run fingerprints every model, tokenizer and list a stage loads at plan
    time, before any data is read (``plan_pins``; the fields a stage names in
    ``Stage.path_fields``, plus ``output.tokenize.tokenizer``): an object or
    every object under a prefix by size and version tag, as above; a local
    file, folder or glob by every file's size and ``xxh3_128`` (the input
    fingerprint's hash, ``inputs.hash_file``), with its mtime kept as a hint
    so a check that finds size and mtime unchanged hashes nothing. The pins go
    to ``_work/run.json`` and the manifest (``models``). Workers load exactly
    the pinned version: ``localize(path, pin)`` keys the cache by the pinned
    listing (a copy of that version already in the cache is used without
    asking the store; otherwise the store must still list the pinned version,
    before and after the download), and checks a local path against its pin;
    anything else is ``ModelChangedDuringRun`` naming the stage, the field
    and the path. A resume whose models changed is refused before any data is
    read (``ModelsChanged``; ``--fresh`` starts over).

Pruning
    Every use of an entry marks its last use (the mtime of its
    ``source.json``). ``prune`` removes entries unused for longer than a given
    age and then the least recently used ones down to a size, under the
    entry's lock: an entry being downloaded or looked up is skipped, and one
    used within ``grace`` (a process may still be loading it) is kept. An
    entry is removed by renaming it out of the way first, so a ``localize``
    finds it whole or not at all (and then downloads it again).

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
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gristmill.pipeline import storage
from gristmill.pipeline.inputs import HASH_NAME, InputChangedDuringRun, InputsChanged, hash_file

log = logging.getLogger(__name__)

#: metadata keys that name an object's version, most specific first
VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "VersionId", "version_id", "crc32c")
MTIME_KEYS = ("LastModified", "last_modified", "mtime", "updated", "created")
_USERINFO = re.compile(r"(://)[^/@]*@")
_GLOB = re.compile(r"[*?\[]")

Listing = list[tuple[str, int, str]]


class ModelChangedDuringRun(InputChangedDuringRun):
    """A model, tokenizer or list changed after the run pinned it; nothing was loaded."""


class ModelsChanged(InputsChanged):
    """A resume or re-run whose models, tokenizers or lists differ from the pinned ones."""


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


def remote_listing(path: str | os.PathLike) -> Listing:
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


def cache_key(url: str, listing: Iterable[tuple[str, int, str] | list[Any]]) -> str:
    """SHA-256 (hex) of the URL and its listing: the cache folder's name."""
    body = json.dumps([redact(url).rstrip("/"), [list(e) for e in listing]],
                      separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path, exclusive: bool = True, wait: bool = True) -> Iterator[bool]:
    """An ``flock`` on ``lock_path``; yields False (holding nothing) when ``wait`` is
    False and another process holds it. ``prune`` unlinks a lock file while holding
    it, so a lock taken on a file that is no longer at ``lock_path`` is retried."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
    while True:
        fh = open(lock_path, "a+b")
        try:
            try:
                fcntl.flock(fh.fileno(), mode)  # released by the kernel if we die
            except BlockingIOError:
                yield False
                return
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                try:
                    yield True
                finally:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                return
        finally:
            fh.close()


def _mark_used(entry: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(entry / "source.json")


def localize(path: str | os.PathLike, pin: dict[str, Any] | None = None) -> str:
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
    pin : dict, optional
        The run's pin of ``path`` (``pin_path``). A URL is then keyed by the
        pinned listing: a cached copy of the pinned version is used as it is;
        otherwise the store must still list the pinned version (checked before
        and after downloading). A local path must still match its pin.

    Returns
    -------
    str
        A local path; the same for every process on this machine as long as
        the remote objects do not change (with a pin: for the whole run).

    Raises
    ------
    FileNotFoundError
        When no object and no prefix is at the URL.
    ModelChangedDuringRun
        When ``path`` no longer holds the pinned version.
    """
    if not storage.is_remote(path):
        if pin is not None:
            _refuse_if_changed(os.fspath(path), pin)
        return os.fspath(path)
    url = str(storage.as_path(path)).rstrip("/")
    listing = remote_listing(url) if pin is None else [tuple(e) for e in pin["files"]]
    key = cache_key(url, listing)
    root = cache_root()
    name = url.rsplit("/", 1)[-1] or "object"
    final = root / key
    target = final / name
    with _locked(root / f"{key}.lock", exclusive=False):  # prune waits for the lookup
        if final.is_dir():
            _mark_used(final)
            return str(target)
    if pin is not None:
        _refuse_if_changed(url, pin)
    with _locked(root / f"{key}.lock"):
        if final.is_dir():  # another process finished it while we waited
            _mark_used(final)
            return str(target)
        for stale in root.glob(f".{key}.tmp-*"):  # left by a killed download
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{key}.tmp-{os.getpid()}"
        try:
            _download(url, listing, tmp / name)
            if pin is not None:  # replaced while it downloaded (an equal size hides it)
                _refuse_if_changed(url, pin)
            (tmp / "source.json").write_text(json.dumps(
                {"url": redact(url), "files": [list(e) for e in listing]}, indent=1) + "\n")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("model cache: %s -> %s (%d file(s), %d bytes)", redact(url), target,
             len(listing), sum(e[1] for e in listing))
    return str(target)


def _download(url: str, listing: Listing, dest: Path) -> None:
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


# ---------------------------------------------------------------------------
# pins: one version of every model, tokenizer and list per run


def param_paths(params: Any, fields: Iterable[str]) -> list[tuple[str, str]]:
    """``(field, value)`` of every path named by ``fields`` in a stage's parameters.

    A field is a dotted name where ``[]`` stands for every item of a list:
    ``"model"``, ``"models[].path"``, ``"block_urls_files[]"``. A value that is
    a list of paths yields one entry per item (``eval_sets[0].path[1]``); None
    (an optional model left out) yields nothing.

    >>> from types import SimpleNamespace as NS
    >>> param_paths(NS(models=[NS(path="a"), NS(path="b")], tok=None), ["models[].path", "tok"])
    [('models[0].path', 'a'), ('models[1].path', 'b')]
    """
    out: list[tuple[str, str]] = []

    def walk(obj: Any, parts: list[str], where: str) -> None:
        if not parts:
            if isinstance(obj, (list, tuple)):
                for j, v in enumerate(obj):
                    walk(v, [], f"{where}[{j}]")
            elif obj is not None:
                out.append((where, str(obj)))
            return
        head, rest = parts[0], parts[1:]
        each = head.endswith("[]")
        name = head[:-2] if each else head
        value = getattr(obj, name, None)
        where = f"{where}.{name}" if where else name
        if each:
            for j, item in enumerate(value or []):
                walk(item, rest, f"{where}[{j}]")
        else:
            walk(value, rest, where)

    for field in fields:
        walk(params, field.split("."), "")
    return out


def _local_files(path: str) -> list[tuple[str, Path]]:
    """``(relative name, file)`` of a local file (``""``), of every file under a
    folder, or of every file a glob matches (its full path as the name)."""
    p = Path(path)
    if p.is_file():
        return [("", p)]
    if p.is_dir():
        return [(q.relative_to(p).as_posix(), q) for q in sorted(p.rglob("*")) if q.is_file()]
    if _GLOB.search(path):
        return [(q, Path(q)) for q in sorted(glob.glob(path, recursive=True))
                if os.path.isfile(q)]
    raise FileNotFoundError(f"{path}: no such file or folder")


def pin_path(path: str, stage: str | None, field: str) -> dict[str, Any]:
    """The fingerprint of ``path`` now, as a pin (what ``run.json`` and the manifest hold).

    Keys: ``stage`` (the stage's name; None for ``output.tokenize``), ``field``
    (its recipe path, ``stages[0].model``), ``path`` (credentials removed),
    ``files`` (``[name, size, version]`` each: the store's version tag, or
    ``xxh3_128=<hex>`` of a local file), ``mtime_ns`` (local files: hints that
    spare a hash when nothing moved) and ``fingerprint`` (SHA-256 of path and
    files; for a URL it is the pinned version's cache key).
    """
    if storage.is_remote(path):
        url = str(storage.as_path(path)).rstrip("/")
        files = [list(e) for e in remote_listing(url)]
        return {"stage": stage, "field": field, "path": redact(url), "files": files,
                "fingerprint": cache_key(url, files)}
    entries = _local_files(path)
    if not entries:
        raise FileNotFoundError(f"{path}: matches no files")
    files, mtimes = [], []
    for rel, f in entries:
        st = f.stat()
        files.append([rel, st.st_size, f"{HASH_NAME}={hash_file(f)}"])
        mtimes.append(st.st_mtime_ns)
    return {"stage": stage, "field": field, "path": path, "files": files, "mtime_ns": mtimes,
            "fingerprint": cache_key(path, files)}


def model_paths(recipe: Any) -> list[tuple[str | None, str, str]]:
    """``(stage name, field, resolved path)`` of every model, tokenizer and list a
    recipe loads: each stage's ``model_paths()`` and ``output.tokenize.tokenizer``."""
    out: list[tuple[str | None, str, str]] = []
    for i, stage in enumerate(recipe.build_stages()):
        out += [(stage.name, f"stages[{i}].{field}", path) for field, path in stage.model_paths()]
    if recipe.output.tokenize is not None:
        out.append((None, "output.tokenize.tokenizer",
                    str(recipe.resolve(recipe.output.tokenize.tokenizer))))
    return out


def plan_pins(recipe: Any) -> list[dict[str, Any]]:
    """Pin every path of ``model_paths(recipe)`` (at plan time, before data is read)."""
    from gristmill.pipeline.recipe import RecipeError

    pins = []
    for stage, field, path in model_paths(recipe):
        try:
            pins.append(pin_path(path, stage, field))
        except FileNotFoundError as e:
            raise RecipeError(f"recipe error at {describe(stage, field)}: {e}") from None
    return pins


def describe(stage: str | None, field: str) -> str:
    """``stages[0].model (stage 'preselect')``, or the field alone."""
    return f"{field} (stage {stage!r})" if stage is not None else field


def _fmt(entry: list[Any] | tuple[Any, ...]) -> str:
    rel, size, version = entry
    return f"{rel or '(the object)'}: {size} bytes, {version}"


def pin_change(path: str, pin: dict[str, Any]) -> str | None:
    """None when ``path`` still holds the pinned version, else what differs (a phrase).

    A URL is listed again (one metadata request); a local file whose size and
    mtime match its pin is not read, one whose mtime moved is hashed (a
    ``touch`` is not a change)."""
    old = {e[0]: e for e in pin["files"]}
    if storage.is_remote(path):
        try:
            now = {e[0]: list(e) for e in remote_listing(path)}
        except FileNotFoundError:
            return "it is gone"
        for rel in sorted(old.keys() | now.keys()):
            if rel not in now:
                return f"{rel} was removed"
            if rel not in old:
                return f"{rel} was added"
            if list(old[rel]) != now[rel]:
                return f"pinned {_fmt(old[rel])}; now {_fmt(now[rel])}"
        return None
    try:
        entries = dict(_local_files(path))
    except FileNotFoundError:
        return "it is gone"
    hints = dict(zip([e[0] for e in pin["files"]], pin.get("mtime_ns") or [], strict=False))
    for rel in sorted(old.keys() | entries.keys()):
        if rel not in entries:
            return f"{rel or 'the file'} was removed"
        if rel not in old:
            return f"{rel} was added"
        st = entries[rel].stat()
        size = old[rel][1]
        if st.st_size != size:
            return f"{rel or 'the file'}: size {size} -> {st.st_size} bytes"
        if st.st_mtime_ns != hints.get(rel) and \
                f"{HASH_NAME}={hash_file(entries[rel])}" != old[rel][2]:
            return f"{rel or 'the file'}: same size, different content ({HASH_NAME})"
    return None


def _refuse_if_changed(path: str, pin: dict[str, Any]) -> None:
    change = pin_change(path, pin)
    if change is not None:
        raise ModelChangedDuringRun(
            f"{describe(pin['stage'], pin['field'])}: {redact(path)} changed after the run "
            f"pinned it ({change}); workers load only the pinned version. Restore it and "
            f"run again to resume, or run with --fresh to start over with the new one")


def pin_changes(recorded: list[dict[str, Any]], recipe: Any) -> list[str]:
    """What differs between the pins a run recorded and the recipe's paths now: one
    line per changed, added or removed model (empty when nothing changed)."""
    old = {(p["stage"], p["field"]): p for p in recorded}
    now = {(s, f): path for s, f, path in model_paths(recipe)}
    changes = [f"removed: {describe(*k)} {old[k]['path']}" for k in old if k not in now]
    changes += [f"added: {describe(*k)} {redact(now[k])}" for k in now if k not in old]
    for k in old.keys() & now.keys():
        pin, path = old[k], now[k]
        if redact(path) != pin["path"]:
            change = f"path {pin['path']} -> {redact(path)}"
        else:
            change = pin_change(path, pin)
        if change is not None:
            changes.append(f"changed: {describe(*k)} {redact(path)} ({change})")
    return sorted(changes)


def refuse_changed_models(changes: list[str], out: Any, what: str) -> None:
    """``ModelsChanged`` listing ``changes``, when there are any."""
    if changes:
        listed = "\n  ".join(changes)
        raise ModelsChanged(
            f"models changed since the {what} in {out} pinned them:\n  {listed}\n"
            f"Restore the pinned version(s) to resume, or run with --fresh to start over "
            f"with the current ones")


# ---------------------------------------------------------------------------
# listing and pruning the cache


@dataclass
class CacheEntry:
    """One cached version: its key, URL, folder, bytes on disk and last use (epoch s)."""

    key: str
    url: str
    path: Path
    bytes: int
    files: int
    last_used: float


def _entry(folder: Path) -> CacheEntry:
    try:
        source = json.loads((folder / "source.json").read_text())
        last = (folder / "source.json").stat().st_mtime
    except (OSError, ValueError):
        source, last = {}, folder.stat().st_mtime
    sizes = [q.stat().st_size for q in folder.rglob("*") if q.is_file()]
    return CacheEntry(key=folder.name, url=source.get("url", "?"), path=folder,
                      bytes=sum(sizes), files=len(sizes), last_used=last)


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """The complete entries of the cache, least recently used first."""
    root = cache_root() if root is None else Path(root)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            with contextlib.suppress(FileNotFoundError):  # pruned by another process
                found.append(_entry(folder))
    return sorted(found, key=lambda e: (e.last_used, e.key))


@dataclass
class PruneResult:
    removed: list[CacheEntry]
    kept_in_use: list[CacheEntry]  # would have gone, but in use or used within grace
    kept: list[CacheEntry]
    leftovers: int  # temporary folders of killed downloads removed


def prune(max_size: int | None = None, older_than: float | None = None, *,
          grace: float = 3600.0, dry_run: bool = False, root: Path | None = None,
          now: float | None = None) -> PruneResult:
    """Remove cache entries unused for ``older_than`` seconds, then the least
    recently used ones until the cache holds at most ``max_size`` bytes.

    Safe while other processes ``localize``: an entry is removed under its
    exclusive lock (one being looked up or downloaded is skipped), after
    checking again that it was not used within ``grace`` seconds, and is
    renamed out of the way before it is deleted. Temporary folders of killed
    downloads whose lock is free are removed as well.

    Parameters
    ----------
    max_size : int, optional
        Bytes the cache may hold afterwards.
    older_than : float, optional
        Remove entries whose last use is older than this many seconds.
    grace : float
        Never remove an entry used within this many seconds (a process may be
        loading it); default one hour.
    dry_run : bool
        Only say what would be removed.
    root : Path, optional
        The cache folder (default ``cache_root()``).
    now : float, optional
        The current time (epoch seconds), for tests.
    """
    root = cache_root() if root is None else Path(root)
    now = time.time() if now is None else now
    entries = cache_entries(root)
    total = sum(e.bytes for e in entries)
    removed, busy, kept = [], [], []
    for e in entries:  # least recently used first
        stale = older_than is not None and now - e.last_used > older_than
        over = max_size is not None and total > max_size
        if not (stale or over):
            kept.append(e)
            continue
        if dry_run:
            gone = now - e.last_used > grace
        else:
            gone = _remove_entry(root, e, now - grace)
        if gone:
            removed.append(e)
            total -= e.bytes
        else:
            busy.append(e)
    leftovers = 0
    if not dry_run and root.is_dir():
        for trash in root.glob(".*.del-*"):  # an interrupted removal
            shutil.rmtree(trash, ignore_errors=True)
        for tmp in root.glob(".*.tmp-*"):
            key = tmp.name[1:].split(".tmp-", 1)[0]
            with _locked(root / f"{key}.lock", wait=False) as held:
                if held:
                    shutil.rmtree(tmp, ignore_errors=True)
                    leftovers += 1
    return PruneResult(removed=removed, kept_in_use=busy, kept=kept, leftovers=leftovers)


def _remove_entry(root: Path, entry: CacheEntry, used_before: float) -> bool:
    lock = root / f"{entry.key}.lock"
    with _locked(lock, wait=False) as held:
        if not held:
            return False  # being downloaded or looked up right now
        try:
            last = (entry.path / "source.json").stat().st_mtime
        except FileNotFoundError:
            last = entry.last_used if entry.path.is_dir() else None
        if last is None:
            return True  # removed by another prune
        if last > used_before:
            return False
        trash = root / f".{entry.key}.del-{os.getpid()}"
        os.rename(entry.path, trash)
        lock.unlink(missing_ok=True)  # while held: a waiter sees the inode change
    shutil.rmtree(trash, ignore_errors=True)
    return True
