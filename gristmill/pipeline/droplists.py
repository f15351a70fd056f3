"""Dedup drop lists as sorted files per input file, read a piece at a time.

A dedup stage's ``resolve`` gives every dropped record with its cluster and
survivor, sorted by row key (``stage.ROW_KEY``). Handing that whole table to
every task makes each worker hold every drop of the corpus. Instead the
engine writes it (``write_drop_lists``) as one Arrow IPC file per input file
(the high bits of a row key are the file index), in record batches of
``DROP_BATCH_ROWS`` rows, and broadcasts a small ``DropLists`` index: per
file, the first row key of each record batch. A task asks ``rows_for`` with
the row keys of the batch it is filtering and reads only the record batches
that can hold them, as DataTrove's dedup filter streams a sorted removal
file instead of loading every id. A worker holds at most ``CACHED_BATCHES``
record batches, whatever the corpus size.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gristmill.pipeline import storage
from gristmill.pipeline.stage import KEY_POS_BITS, ROW_KEY

#: rows per record batch of a drop-list file (a few MB)
DROP_BATCH_ROWS = 65536
#: record batches a process keeps after reading them (tasks read their file in order)
CACHED_BATCHES = 4

_BATCHES: OrderedDict[tuple[str, int], pa.RecordBatch] = OrderedDict()


@dataclass
class DropLists:
    """Where the drop-list files are and what each holds; small, so it is the
    state broadcast to tasks.

    Attributes
    ----------
    folder : Path
        Folder of ``file-NNNNNN.arrow``, one per input file with drops.
    schema : pa.Schema
        The columns of the resolved table (row key first).
    firsts : dict[int, list[int]]
        Per input file index, the first row key of each record batch.
    rows : int
        Dropped records in all files.
    chosen_clusters : dict
        What ``observe`` shows of the clusters (survivor key -> (priority,
        member key)), chosen from the whole table when it was written.
    """

    folder: Path
    schema: pa.Schema
    firsts: dict[int, list[int]] = field(default_factory=dict)
    rows: int = 0
    chosen_clusters: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: names this writing of the lists in the per-process cache of record batches
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def num_rows(self) -> int:
        return self.rows

    def path(self, file_index: int) -> Path:
        return self.folder / f"file-{file_index:06d}.arrow"

    def rows_for(self, keys: np.ndarray) -> pa.Table:
        """The dropped rows (sorted by row key) of the record batches whose key
        range can hold any of ``keys``; a superset of the drops among ``keys``."""
        keys = np.asarray(keys, dtype=np.uint64)
        tables = []
        if keys.size:
            files = keys >> np.uint64(KEY_POS_BITS)
            for f in np.unique(files):
                firsts = self.firsts.get(int(f))
                if not firsts:
                    continue
                mine = keys[files == f]
                lo = max(int(np.searchsorted(firsts, mine.min(), "right")) - 1, 0)
                hi = int(np.searchsorted(firsts, mine.max(), "right"))
                for b in range(lo, hi):
                    tables.append(_read_batch(self, int(f), b))
        if not tables:
            return self.schema.empty_table()
        return pa.Table.from_batches(tables, schema=self.schema)


def _read_batch(lists: DropLists, file_index: int, index: int) -> pa.RecordBatch:
    key = (lists.token, file_index, index)
    hit = _BATCHES.get(key)
    if hit is not None:
        _BATCHES.move_to_end(key)
        return hit
    # read into memory (not mapped): the batch outlives the file
    with storage.open_read(lists.path(file_index)) as src:
        batch = pa.ipc.open_file(src).get_batch(index)
    _BATCHES[key] = batch
    while len(_BATCHES) > CACHED_BATCHES:
        _BATCHES.popitem(last=False)
    return batch


def write_drop_lists(state: pa.Table, folder: Path, chosen_clusters: dict[int, Any],
                     batch_rows: int = DROP_BATCH_ROWS) -> DropLists:
    """Write ``state`` (dropped rows with a ``ROW_KEY`` column) as sorted per-file
    drop lists under ``folder``; returns their index.

    Rows are sorted by row key here (a stable sort), so the result does not
    depend on the order ``state`` came in.
    """
    keys = state.column(ROW_KEY).to_numpy(zero_copy_only=False).astype(np.uint64)
    order = np.argsort(keys, kind="stable")
    if not np.array_equal(order, np.arange(order.size)):
        state, keys = state.take(pa.array(order)), keys[order]
    files = keys >> np.uint64(KEY_POS_BITS)
    lists = DropLists(folder=folder, schema=state.schema, rows=state.num_rows,
                      chosen_clusters=dict(chosen_clusters))
    storage.remove_tree(folder)  # leftovers of a killed attempt
    storage.mkdirs(folder)
    bounds = np.flatnonzero(np.r_[True, files[1:] != files[:-1], True]) if keys.size else []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        f = int(files[lo])
        part = state.slice(lo, hi - lo)
        with storage.AtomicFile(lists.path(f)) as sink:
            with pa.ipc.new_file(sink.file, state.schema) as writer:
                for s in range(0, part.num_rows, batch_rows):
                    writer.write_table(part.slice(s, batch_rows), max_chunksize=batch_rows)
        lists.firsts[f] = [int(k) for k in keys[lo:hi:batch_rows]]
    return lists


def drop_list_state(stage: Any, state: Any, folder: Path) -> Any:
    """The state a shuffle stage's tasks get: per-file drop lists where the stage
    asks for them (``ShuffleStage.drop_lists``), else ``state`` itself."""
    if not getattr(stage, "drop_lists", False) or not isinstance(state, pa.Table):
        return state
    from gristmill.pipeline.observe import chosen_clusters

    # not cached: the cache would keep the whole table alive in the driver
    return write_drop_lists(state, folder, chosen_clusters(state, stage.seed, cache=False))
