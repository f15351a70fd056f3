"""One real S3 server per test session and one real multi-process Dask cluster per module
(issue 11), shared by the object-storage, model-path and Beam-resume tests (conftest.py
imports the fixtures from here).

- ``s3_server``: moto's standalone S3 server in its own process on 127.0.0.1, spoken to
  through s3fs. Its address and dummy credentials go into ``os.environ`` for the session,
  where s3fs and every subprocess find them.
- ``s3_dask_cluster``: ``dask scheduler`` and two ``dask worker`` processes on loopback,
  one cluster per test module (a session-long one would keep workers that loaded torch,
  ~0.6 GB each, alive for the rest of the suite). Each worker runs in its own empty
  folder, with its own temp folder and model cache (``TMPDIR``, ``GRISTMILL_CACHE``):
  they share nothing with the driver or each other but the S3 server. Workers run
  without a nanny (one process each, quick to start and to stop).
- ``bucket``: a new, empty bucket per test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port}")


def stop(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still running after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(end - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextlib.contextmanager
def moto_s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server in its own process on 127.0.0.1; its address and dummy
    credentials go into the environment. fsspec's cached s3 filesystems are dropped on
    the way in and out, so a cached one never talks to a server that is gone."""
    import s3fs

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    try:
        wait_port(port, proc, "moto server")
        os.environ.update(env)
        s3fs.S3FileSystem.clear_instance_cache()
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        stop([proc], grace=2.0)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    pytest.importorskip("upath")
    with moto_s3_server() as env:
        yield env


def new_bucket() -> str:
    """A new, empty bucket on the server in the environment."""
    import fsspec

    name = f"gm-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return name


@pytest.fixture
def bucket(s3_server) -> str:
    return new_bucket()


@dataclass(frozen=True)
class DaskCluster:
    address: str
    homes: tuple[Path, ...]  # each worker's own folder (cwd, local directory, TMPDIR)

    def cache(self, worker: int) -> Path:
        """The worker's model cache (``GRISTMILL_CACHE``/models)."""
        return self.homes[worker] / "cache" / "models"


@pytest.fixture(scope="module")
def s3_dask_cluster(tmp_path_factory, s3_server) -> Iterator[DaskCluster]:
    """``dask scheduler`` and two ``dask worker`` processes on loopback, for the module."""
    pytest.importorskip("distributed")
    root = tmp_path_factory.mktemp("dask-cluster")
    dask_cli = Path(sys.executable).with_name("dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(dask_cli), "scheduler", "--host", "127.0.0.1", "--port",
                               str(port), "--no-dashboard"], env={**os.environ, **s3_server},
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    homes = []
    try:
        wait_port(port, procs[0], "dask scheduler")
        for i in range(2):
            home = root / f"worker-{i}"
            (home / "tmp").mkdir(parents=True)
            homes.append(home)
            env = {**os.environ, **s3_server, "TMPDIR": str(home / "tmp"),
                   "GRISTMILL_CACHE": str(home / "cache")}
            procs.append(subprocess.Popen(
                [str(dask_cli), "worker", address, "--nthreads", "1", "--no-nanny",
                 "--no-dashboard", "--host", "127.0.0.1", "--name", f"worker-{i}",
                 "--local-directory", str(home)],
                env=env, cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield DaskCluster(address, tuple(homes))
    finally:
        # the workers hold nothing a test needs: killed at once (a graceful close takes
        # seconds on a loaded box), then the scheduler
        for p in procs[1:]:
            p.kill()
            p.wait()
        stop(procs[:1], grace=2.0)


def upload(local: Path, url: str) -> None:
    """Every file under ``local`` to the same relative keys under ``url``."""
    import fsspec

    fs = fsspec.filesystem("s3")
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), url.removeprefix("s3://") + "/" + f.relative_to(local).as_posix())


def files(root: str) -> dict[str, bytes]:
    """Every file of an output folder (local or s3://), relative path -> bytes."""
    from gristmill.pipeline import storage

    root_path = storage.as_path(root)
    out = {}
    for f in storage.find_files(root_path):
        rel = str(f)[len(str(root_path).rstrip("/")) + 1:]
        out[rel] = storage.read_bytes(f)
    return out
