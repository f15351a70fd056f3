"""``gristmill cache list`` and ``gristmill cache prune`` (issue 11): sizes and last
use of the model cache's entries, removal by age and by size (least recently used
first), and safety against a ``localize`` in progress: an entry whose lock is held is
skipped, one used within the grace period is kept, and a pruned entry is fetched
again by the next ``localize``. Entries are real downloads from an fsspec
``memory://`` store through ``model_cache.localize``."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from gristmill.cli.main import main
from gristmill.pipeline import model_cache

DAY = 86400.0


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path / "gm"))
    return tmp_path / "gm" / "models"


def _cached(name: str, size: int, idle: float) -> tuple[str, Path]:
    """Upload ``size`` bytes to a fresh memory:// URL, localize it, and make its last
    use ``idle`` seconds ago; returns (url, cache entry folder)."""
    url = f"memory://cache-cli-{uuid.uuid4().hex[:8]}/{name}"
    with fsspec.open(url, "wb") as f:
        f.write(os.urandom(size))
    entry = Path(model_cache.localize(url)).parent
    t = time.time() - idle
    os.utime(entry / "source.json", (t, t))
    return url, entry


def _disk_bytes(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


def test_cache_list_shows_every_entry_with_size_and_last_use(cache, capsys):
    old_url, old = _cached("old.bin", 2000, 3 * DAY)
    new_url, new = _cached("new.bin", 5000, 60)
    assert main(["cache", "list", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["cache"] == str(cache)
    assert [e["url"] for e in body["entries"]] == [old_url, new_url]  # least recent first
    assert [e["bytes"] for e in body["entries"]] == [_disk_bytes(old), _disk_bytes(new)]
    assert body["bytes"] == _disk_bytes(old) + _disk_bytes(new)
    assert 3 * DAY - 5 < body["entries"][0]["idle_seconds"] < 3 * DAY + 60

    assert main(["cache", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{cache}: 2 entries")
    assert new_url in lines[1] and "used 1.0m ago" in lines[1]  # most recent first
    assert old_url in lines[2] and "used 3.0d ago" in lines[2] and old.name[:12] in lines[2]


def test_prune_older_than_removes_stale_entries_and_localize_fetches_them_again(cache, capsys):
    stale_url, stale = _cached("stale.bin", 3000, 40 * DAY)
    week_url, week = _cached("week.bin", 3000, 7 * DAY)
    assert main(["cache", "prune", "--older-than", "30d"]) == 0
    out = capsys.readouterr().out
    assert f"removed {stale.name[:12]}" in out and "removed 1 entry" in out
    assert not stale.exists() and week.is_dir()
    assert not (cache / f"{stale.name}.lock").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # nothing half-removed
    # the next run that needs it downloads it again, into the same key
    again = Path(model_cache.localize(stale_url))
    assert again.parent == stale and again.read_bytes() == fsspec.open(stale_url, "rb").open().read()
    assert [e.url for e in model_cache.cache_entries(cache)] == [week_url, stale_url]


def test_prune_max_size_removes_least_recently_used_first(cache, capsys):
    entries = [_cached(f"m{i}.bin", 4000, idle) for i, idle in enumerate([5 * 3600, 3 * 3600,
                                                                          2 * 3600])]
    keep = _disk_bytes(entries[2][1])
    assert main(["cache", "prune", "--max-size", str(keep + 100), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 2 entries" in out and all(e.is_dir() for _, e in entries)
    assert main(["cache", "prune", "--max-size", str(keep + 100)]) == 0
    assert [e.is_dir() for _, e in entries] == [False, False, True]
    assert sum(e.bytes for e in model_cache.cache_entries(cache)) <= keep + 100


def test_prune_skips_an_entry_being_looked_up_and_one_used_within_grace(cache, capsys):
    busy_url, busy = _cached("busy.bin", 1000, 10 * DAY)
    _, recent = _cached("recent.bin", 1000, 20 * 60)
    # another process's localize holds the entry's lock (a shared lock: a lookup; a
    # download holds it exclusively): a lock on another open file, as a process has
    with model_cache._locked(cache / f"{busy.name}.lock", exclusive=False) as held:
        assert held
        assert main(["cache", "prune", "--older-than", "1d", "--max-size", "0"]) == 0
        out = capsys.readouterr().out
        assert busy.is_dir() and recent.is_dir()  # busy: locked; recent: within 1h grace
        assert f"kept {busy.name[:12]} (in use" in out and f"kept {recent.name[:12]}" in out
        # another lookup of the entry shares the lock: not blocked
        assert Path(model_cache.localize(busy_url)).parent == busy
    os.utime(busy / "source.json", (time.time() - 10 * DAY,) * 2)
    assert main(["cache", "prune", "--older-than", "1d"]) == 0
    assert not busy.exists() and recent.is_dir()
    assert main(["cache", "prune", "--max-size", "0", "--grace", "0"]) == 0
    assert not recent.exists() and model_cache.cache_entries(cache) == []
    capsys.readouterr()


def test_prune_clears_a_killed_download_but_not_one_in_progress(cache):
    cache.mkdir(parents=True)
    killed = cache / f".{'a' * 64}.tmp-999999"
    running = cache / f".{'b' * 64}.tmp-999998"
    for d in (killed, running):
        d.mkdir()
        (d / "part").write_bytes(b"x")
    with model_cache._locked(cache / f"{'b' * 64}.lock"):  # its download holds the lock
        res = model_cache.prune(older_than=DAY)
    assert res.leftovers == 1 and not killed.exists() and running.is_dir()


def test_prune_needs_a_criterion_and_valid_values(cache, capsys):
    assert main(["cache", "prune"]) == 2
    assert "give --max-size and/or --older-than" in capsys.readouterr().err
    assert main(["cache", "prune", "--older-than", "soon"]) == 2
    assert "'soon' is not a duration" in capsys.readouterr().err
    assert main(["cache", "prune", "--max-size", "lots"]) == 2
    assert "'lots' is not a size" in capsys.readouterr().err
