"""A task's rejects file, streamed in bounded batches.

Every reject of an input file is one JSON line in the task's
``rejects.jsonl`` (``{"source", "line", "reason", "raw"}``; a whole-file
reject adds ``"rows"``), in the order the reader met them, encoded as
``json.dumps(reject, ensure_ascii=False) + "\\n"``. ``FileReport`` holds at
most ``batch_rows`` rejects (and about ``batch_chars`` characters of raw
lines) before it hands them to a ``RejectsWriter``, so a file of ten million
bad lines costs one batch of memory, not ten million rejects. The file is
written under a temporary name and published by ``close()`` (``AtomicFile``),
so a killed task leaves no partial rejects file and its rerun writes the
same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gristmill.pipeline.storage import AtomicFile

#: rejects a ``FileReport`` holds before it writes them out
BATCH_ROWS = 4096
#: ... or characters of raw lines held (a reject keeps up to 100,000 of its line)
BATCH_CHARS = 8 << 20


def encode_rejects(rejects: list[dict[str, Any]]) -> bytes:
    """The bytes of ``rejects`` in a rejects file: one JSON object per line."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode()


class RejectsWriter:
    """Appends batches of rejects to ``path``; ``close()`` publishes the file.

    Nothing is created until the first reject, so a file without rejects
    leaves no rejects file (as before).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.rows = 0
        self._sink: AtomicFile | None = None

    def write(self, rejects: list[dict[str, Any]]) -> None:
        if not rejects:
            return
        if self._sink is None:
            self._sink = AtomicFile(self.path)
        self._sink.file.write(encode_rejects(rejects))
        self.rows += len(rejects)

    def close(self) -> bool:
        """Publish the file; True when it holds any reject."""
        if self._sink is None:
            return False
        self._sink.commit()
        return True

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.abort()
