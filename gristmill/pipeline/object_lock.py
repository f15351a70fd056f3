"""The output lock on an object store: a lock object written with conditional puts.

``flock`` needs a kernel that sees every holder; an S3 bucket has none. Here a
run holds ``OUTPUT/.gristmill.lock``, an object it created with
``If-None-Match: *`` (S3 conditional writes: exactly one of several racing
creators succeeds). The object names its owner (a random token, host, pid)
and the holder rewrites it every ``ttl / 4`` seconds with ``If-Match`` on the
ETag it last wrote (a heartbeat). A lock whose object has not been rewritten
for ``ttl`` seconds belongs to a dead run: it is taken over by a put with
``If-Match`` on the ETag that was judged stale, so of two runs taking it over
at once exactly one wins. A holder whose heartbeat fails because another run
took the lock marks itself ``lost``, and the runner refuses to commit (no
manifest), so two runs never publish into one output.

What this assumes, stated plainly:

- the store honours ``If-None-Match`` / ``If-Match`` on ``PutObject`` and
  ``DeleteObject`` (AWS S3 since 2024, MinIO, moto; other S3-compatible stores
  may not: there a second run is refused only if it starts after the first
  one's lock object is visible);
- clocks of the machines that run gristmill are within ``ttl`` of the store's
  (the object's ``LastModified`` is compared with the local clock);
- a run paused for longer than ``ttl`` (a suspended laptop) may find its lock
  taken when it wakes; it then stops before its commit.

``ttl`` is 120 s, or ``GRISTMILL_LOCK_TTL`` seconds. Other object stores
(``gs://``, ``az://``) get the same object without conditional writes: a
second run is refused when it sees a live lock, but two runs started within
the same second are not kept apart.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from gristmill.pipeline import storage

DEFAULT_TTL = 120.0


class LockLost(RuntimeError):
    """Another run took over this run's object lock (it missed heartbeats)."""


def _ttl() -> float:
    return float(os.environ.get("GRISTMILL_LOCK_TTL", DEFAULT_TTL))


class ObjectLock:
    """Exclusive lock of an object-store output folder; see the module docstring."""

    def __init__(self, folder: Path, locked_error: type[Exception] = RuntimeError) -> None:
        self.path = storage.as_path(folder) / ".gristmill.lock"
        self.fs, self.key = self.path.fs, self.path.path  # type: ignore[attr-defined]
        self.bucket, _, self.object_key = self.key.partition("/")
        self.conditional = storage.protocol_of(self.path) in ("s3", "s3a")
        self.ttl = _ttl()
        self.token = uuid.uuid4().hex
        self.held = False
        self.lost = False
        self._etag: str | None = None
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._locked_error = locked_error

    # -- object operations -------------------------------------------------------------
    def _body(self) -> bytes:
        self._beats += 1
        return json.dumps({"owner": self.token, "pid": os.getpid(), "host": socket.gethostname(),
                           "beat": self._beats, "at": time.time()}).encode()

    def _put(self, **cond: str) -> str:
        if self.conditional:
            r = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.object_key,
                                Body=self._body(), **cond)
            return r["ETag"]
        if cond.get("IfNoneMatch") and self.fs.exists(self.key):
            raise FileExistsError(self.key)
        self.fs.pipe_file(self.key, self._body())
        return self.fs.info(self.key).get("ETag", "")

    def _head(self) -> dict[str, Any] | None:
        self.fs.invalidate_cache(self.key)
        try:
            info = self.fs.info(self.key)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(self.fs.cat_file(self.key))
        except (FileNotFoundError, json.JSONDecodeError):
            holder = {}
        modified = info.get("LastModified")
        age = time.time() - modified.timestamp() if hasattr(modified, "timestamp") else 0.0
        return {"etag": info.get("ETag"), "age": age, "holder": holder}

    # -- lock protocol -----------------------------------------------------------------
    def acquire(self) -> None:
        for _ in range(20):
            try:
                self._etag = self._put(IfNoneMatch="*")
                break
            except (FileExistsError, OSError) as e:
                if not _precondition_failed(e):
                    raise
            head = self._head()
            if head is None:
                continue  # released between our put and our look
            if head["age"] < self.ttl:
                h = head["holder"]
                raise self._locked_error(
                    f"output folder {storage.url(self.path.parent)} is in use by another "
                    f"gristmill run (pid {h.get('pid', '?')} on {h.get('host', '?')}, lock "
                    f"renewed {head['age']:.0f} s ago; a lock not renewed for {self.ttl:.0f} s "
                    f"is taken over); wait for it to finish")
            try:  # stale: take it over, exactly one of racing takers wins
                self._etag = self._put(IfMatch=head["etag"]) if self.conditional else \
                    self._put()
                break
            except OSError as e:
                if not _precondition_failed(e):
                    raise
        else:
            raise self._locked_error(f"could not take the lock {self.path}")
        self.held = True
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name="gristmill-lock-heartbeat")
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._etag = self._put(IfMatch=self._etag) if self.conditional else self._put()
            except OSError as e:
                if _precondition_failed(e):
                    self.lost = True
                    return
                # a transient error: try again at the next beat (the ttl allows three misses)

    def check(self) -> None:
        """Raise ``LockLost`` if another run took the lock over."""
        if self.lost:
            raise LockLost(
                f"the lock of {storage.url(self.path.parent)} was taken over by another run "
                f"(this run missed its heartbeats for {self.ttl:.0f} s); nothing was committed")

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.held = False
        if self.lost:
            return
        try:
            if self.conditional:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.object_key,
                                IfMatch=self._etag)
            else:
                self.fs.rm_file(self.key)
        except (OSError, FileNotFoundError):
            pass  # taken over or gone: not ours to delete

    def __enter__(self) -> ObjectLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _precondition_failed(e: BaseException) -> bool:
    if isinstance(e, FileExistsError):
        return True
    text = str(e)
    return any(m in text for m in ("pre-condition", "PreconditionFailed", "412",
                                   "ConditionalRequestConflict"))
