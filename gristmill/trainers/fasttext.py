"""Train a fastText classifier on labelled documents (PreSelect's scorer).

PreSelect ("Predictive Data Selection: The Data That Predicts Is the Data That
Teaches", Shum et al., 2025, arXiv:2503.00808) trains a fastText bag-of-n-grams
classifier on its positives (``__label__1``) and negatives (``__label__0``),
then scores the whole corpus with it. The defaults are the official code's
(``data_processing/fasttext/train_fasttext.py``): 3 epochs, learning rate
0.1, word bigrams, fastText's default dimension 100, newlines replaced by
spaces. fastText trains with ``thread`` Hogwild threads; we default to one,
which makes a model reproducible for a seed (more threads are faster and
differ run to run).

A held-out split (``valid_fraction`` of the documents, chosen by a hash of
(seed, id), so the same documents on every run) gives the ROC AUC of
``p(positive | d)``. The model is saved as ``.bin`` beside a sidecar
``<model>.json`` with the labels, hyperparameters, class counts and AUC.

Example
-------
>>> result = train_fasttext(texts, labels, "out/preselect.bin")  # doctest: +SKIP
>>> result.auc  # doctest: +SKIP
0.93
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from gristmill.pipeline.hashing import uniform
from gristmill.scorers.fasttext import LABEL_PREFIX, flatten_newlines, predict_proba

# halvings of the learning rate tried when fastText diverges (NaN)
NAN_RETRIES = 3
M_PERTURB = -6  # glibc's mallopt parameter (malloc.h)


@contextmanager
def zeroed_allocations() -> Iterator[bool]:
    """Make ``malloc`` return zeroed memory while fastText builds and trains a model.

    fastText (since facebookresearch/fastText#1341, "Predict 1.9-4.2x faster",
    in the ``fasttext-numpy2`` wheels) allocates its matrices with
    ``posix_memalign``, which does not clear them, and ``DenseMatrix::uniform``
    with ``thread`` threads fills only ``thread`` tenths of the input matrix
    (``uniformThread`` works in blocks of a tenth): with one thread, 90% of the
    word and n-gram rows start as whatever the process's heap held. In a fresh
    process that memory comes zeroed from the kernel; after earlier allocations
    (a test suite, a notebook, a second training) it can hold NaN bit patterns,
    and training stops with "Encountered NaN" at any learning rate, or gives a
    different model for the same data and seed. glibc's ``M_PERTURB`` with byte
    ``0xFF`` fills every ``malloc``/``posix_memalign`` result with
    ``0xFF ^ 0xFF = 0``, which makes the untouched rows zero, as the older
    ``std::vector`` storage did: the same model in every process, for a seed.
    It is restored (to ``MALLOC_PERTURB_`` or 0) afterwards; off glibc nothing
    is changed and the result says so (False).
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only; AttributeError elsewhere)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        yield False
        return
    mallopt(M_PERTURB, 0xFF)
    try:
        yield True
    finally:
        mallopt(M_PERTURB, int(os.environ.get("MALLOC_PERTURB_", "0") or 0))


class FastTextTrainConfig(BaseModel):
    """Hyperparameters (PreSelect's defaults) and the held-out split.

    Attributes
    ----------
    epoch, lr, word_ngrams, dim, min_count : fastText's ``epoch``, ``lr``,
        ``wordNgrams``, ``dim``, ``minCount``.
    bucket : fastText's hash buckets for word n-grams; the input matrix has
        ``(words + bucket) x dim`` floats (800 MB at the default), so small
        experiments do well with fewer.
    loss : fastText's loss (``softmax``, ``ns``, ``hs``, ``ova``).
    threads : fastText's ``thread``; 1 is reproducible.
    valid_fraction : share of documents held out for the AUC, in [0, 0.9].
    positive_label, negative_label : the label names written (without prefix).
    seed : seeds fastText and the held-out split.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epoch: int = Field(3, ge=1, le=1000)
    lr: float = Field(0.1, gt=0, le=10)
    word_ngrams: int = Field(2, ge=1, le=10)
    dim: int = Field(100, ge=1, le=10000)
    min_count: int = Field(1, ge=1)
    bucket: int = Field(2_000_000, ge=1)
    loss: str = Field("softmax", pattern="^(softmax|ns|hs|ova)$")
    threads: int = Field(1, ge=1, le=512)
    valid_fraction: float = Field(0.1, ge=0, le=0.9)
    positive_label: str = Field("1", pattern=r"^\S+$")
    negative_label: str = Field("0", pattern=r"^\S+$")
    seed: int = 0


@dataclass
class FastTextTrainResult:
    """What ``train_fasttext`` returns; also the sidecar JSON's content."""

    model_path: str
    sidecar_path: str
    labels: dict[str, str]
    hyperparameters: dict[str, Any]
    counts: dict[str, int]
    auc: float | None
    seconds: float


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``model.bin`` -> ``model.json``."""
    return Path(model_path).with_suffix(".json")


def train_fasttext(texts: Sequence[str] | pa.Array | pa.ChunkedArray, labels: Sequence[int],
                   model_path: str | os.PathLike, *, ids: Sequence[str] | None = None,
                   config: FastTextTrainConfig | None = None, **overrides: Any) -> FastTextTrainResult:
    """Train a binary fastText classifier and report its held-out ROC AUC.

    Parameters
    ----------
    texts : list of str or Arrow string array
    labels : list of int
        1 (positive) or 0 (negative) per text.
    model_path : path
        Where the ``.bin`` goes (its folder is created); the sidecar goes to
        ``sidecar_path(model_path)``.
    ids : list of str, optional
        Record ids for the held-out split (default: the row numbers).
    config : FastTextTrainConfig, optional
    **overrides
        Fields of ``FastTextTrainConfig`` (``epoch=5``...).

    Returns
    -------
    FastTextTrainResult
        ``auc`` is None when the held-out split is empty or one-class.
    """
    import fasttext
    from sklearn.metrics import roc_auc_score

    cfg = FastTextTrainConfig(**{**(config or FastTextTrainConfig()).model_dump(), **overrides})
    t0 = time.time()
    arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, pa.string())
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (len(arr),):
        raise ValueError(f"labels has {y.shape[0] if y.ndim else 0} entries for {len(arr)} texts")
    bad = set(np.unique(y).tolist()) - {0, 1}
    if bad:
        raise ValueError(f"labels must be 0 or 1; got {sorted(bad)}")
    if ids is None:
        ids = [str(i) for i in range(len(arr))]
    valid = uniform(ids, seed=cfg.seed, salt="fasttext_valid") < cfg.valid_fraction
    train = ~valid
    if len(set(y[train].tolist())) < 2:
        raise ValueError(f"the training split needs both classes; it has "
                         f"{int((y[train] == 1).sum())} positives and "
                         f"{int((y[train] == 0).sum())} negatives")
    pos, neg = LABEL_PREFIX + cfg.positive_label, LABEL_PREFIX + cfg.negative_label
    flat = flatten_newlines(pc.fill_null(arr, ""))
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent) as tmp:
        train_file = Path(tmp) / "train.txt"
        lines = pc.binary_join_element_wise(
            pa.array(np.where(y == 1, pos, neg)), flat, " ").filter(pa.array(train))
        with open(train_file, "w", encoding="utf-8") as f:
            for line in lines.to_pylist():
                f.write(line)
                f.write("\n")
        lr = cfg.lr
        for attempt in range(NAN_RETRIES + 1):
            try:
                with zeroed_allocations():
                    model = fasttext.train_supervised(
                        input=str(train_file), epoch=cfg.epoch, lr=lr,
                        wordNgrams=cfg.word_ngrams, dim=cfg.dim, minCount=cfg.min_count,
                        bucket=cfg.bucket, loss=cfg.loss, thread=cfg.threads, seed=cfg.seed,
                        verbose=0)
                break
            except RuntimeError as e:
                # fastText aborts with "Encountered NaN" when a tiny or very
                # repetitive training set makes the updates diverge; the usual
                # remedy is a smaller learning rate
                if "NaN" not in str(e):
                    raise
                if attempt == NAN_RETRIES:
                    raise RuntimeError(_nan_report(e, train_file, model_path, lr)) from e
                warnings.warn(f"fastText diverged at lr={lr}; retrying with lr={lr / 2}",
                              stacklevel=2)
                lr /= 2
        tmp_model = Path(tmp) / "model.bin"
        model.save_model(str(tmp_model))
        os.replace(tmp_model, model_path)
    auc = None
    if valid.any() and len(set(y[valid].tolist())) == 2:
        p = predict_proba(model, flat.filter(pa.array(valid)), pos)
        auc = float(roc_auc_score(y[valid], p))
    counts = {"train_positive": int((y[train] == 1).sum()), "train_negative": int((y[train] == 0).sum()),
              "valid_positive": int((y[valid] == 1).sum()), "valid_negative": int((y[valid] == 0).sum())}
    side = sidecar_path(model_path)
    result = FastTextTrainResult(
        model_path=str(model_path), sidecar_path=str(side),
        labels={"positive": pos, "negative": neg},
        hyperparameters={**cfg.model_dump(), "lr_used": lr}, counts=counts, auc=auc, seconds=time.time() - t0)
    tmp_side = side.with_suffix(".json.tmp")
    tmp_side.write_text(json.dumps(asdict(result), indent=2))
    os.replace(tmp_side, side)
    return result


def _nan_report(error: Exception, train_file: Path, model_path: Path, lr: float) -> str:
    """Keep fastText's training file beside the model and say what was in it."""
    kept = Path(str(model_path) + ".nan-train.txt")
    shutil.copyfile(train_file, kept)
    lines = kept.read_text(encoding="utf-8").split("\n")[:-1]
    words = [len(line.split()) - 1 for line in lines]  # minus the label
    labels = sorted({line.split(" ", 1)[0] for line in lines})
    return (f"fastText diverged ({error}) at every learning rate down to {lr}; its training "
            f"file is kept at {kept}: {len(lines)} lines, labels {labels}, "
            f"{sum(words)} words ({sum(w == 0 for w in words)} lines without a word)")


def read_labelled(path: str | os.PathLike, *, text_column: str = "text",
                  label_column: str = "preselect_label") -> tuple[pa.ChunkedArray, np.ndarray, list[str]]:
    """Texts, labels and ids from a parquet file or a folder of them (a probe's output).

    A folder is read recursively (``shards/part-*.parquet`` of a run).
    """
    path = Path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"no parquet file at {path}")
    table = pa.concat_tables(pq.read_table(f, columns=None) for f in files)
    for col in (text_column, label_column):
        if col not in table.column_names:
            raise ValueError(f"{path}: no column {col!r}; columns are {table.column_names}")
    ids = (table.column("id").to_pylist() if "id" in table.column_names
           else [str(i) for i in range(table.num_rows)])
    labels = table.column(label_column).to_numpy(zero_copy_only=False).astype(np.int64)
    return table.column(text_column), labels, ids
