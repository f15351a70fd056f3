"""fastText classifier score: the probability of one label, for whole batches at once.

Works with any supervised fastText model file: the ones gristmill trains
(``gristmill.trainers.fasttext``, label ``__label__1``), PreSelect's released
classifier (``__label__1`` / ``__label__0``) or DCLM's (``__label__hq`` /
``__label__cc``). The score of a document ``d`` is

    p(label | d) = softmax(B A x_d)[label]

(``x_d`` the bag of words and word n-grams of ``d``), as fastText's
``predict`` returns it. Newlines are replaced by spaces first, as PreSelect,
DCLM and DataTrove do: fastText reads one line per document and ``predict``
refuses text with ``\\n``.

Speed: the whole batch goes to fastText's C++ ``multilinePredict`` in one
call (``model.predict(list_of_texts, k=-1)`` without the per-text Python
check), which is several times faster than one ``predict`` call per document.
The call returns float32 arrays, so it is safe under numpy 2 whatever the
fastText wheel (the official wheel's single-text ``predict`` uses
``np.array(copy=False)``, which numpy 2 rejects).

Function API::

    model = load_fasttext("preselect.bin")
    p = predict_proba(model, texts, label="__label__1")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from gristmill.pipeline.model_cache import is_model_file
from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, keep_all

LABEL_PREFIX = "__label__"


def load_fasttext(path: str | os.PathLike) -> Any:
    """Load a fastText model file (``.bin``; a quantized ``.ftz`` works too)."""
    import fasttext

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no fastText model at {path!r}")
    return fasttext.load_model(path)


def resolve_label(model: Any, label: str, param: str = "label") -> str:
    """The model's label called ``label`` (with or without the ``__label__`` prefix).

    Raises ValueError naming ``param`` and listing the model's labels.
    """
    labels = list(model.get_labels())
    for cand in (label, LABEL_PREFIX + label):
        if cand in labels:
            return cand
    raise ValueError(f"{param}: {label!r} is not a label of this fastText model; "
                     f"its labels are {labels}")


def flatten_newlines(texts: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Replace ``\\n`` by a space (fastText's end-of-document marker)."""
    return pc.replace_substring(texts, "\n", " ")


def predict_proba(model: Any, texts: Sequence[str] | pa.Array | pa.ChunkedArray,
                  label: str = "__label__1") -> np.ndarray:
    """``p(label | text)`` for every text, float64; a null text gives NaN.

    Parameters
    ----------
    model : fasttext.FastText._FastText
        A supervised model (``load_fasttext``).
    texts : list of str or Arrow string array
        Newlines are replaced by spaces.
    label : str
        With or without the ``__label__`` prefix.

    Examples
    --------
    >>> p = predict_proba(model, ["some text"], "__label__1")  # doctest: +SKIP
    """
    label = resolve_label(model, label)
    arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(texts, pa.string())
    if len(arr) == 0:
        return np.zeros(0, dtype=np.float64)
    null = arr.is_null().to_numpy(zero_copy_only=False)
    # One "\n" ends each line, as fastText's own predict() adds it: the reader
    # turns it into the end-of-sentence token, which is a feature of the model.
    lines = [(t or "").replace("\n", " ") + "\n" for t in arr.to_pylist()]
    all_labels, all_probs = model.f.multilinePredict(lines, -1, 0.0, "strict")
    # k=-1 returns every label, sorted by probability, so ``label`` is in each list.
    out = np.fromiter((p[ls.index(label)] for ls, p in zip(all_labels, all_probs, strict=True)),
                      dtype=np.float64, count=len(all_labels))
    out[null] = np.nan
    return out


class FastTextParams(StageParams):
    """Parameters of the ``fasttext`` stage.

    Attributes
    ----------
    model : str
        Path of a supervised fastText model file, or its URL (``s3://...``,
        fetched once per machine into the model cache, ``model_cache.localize``).
    label : str
        The label whose probability is the score (``__label__1`` for
        PreSelect and gristmill's trainer, ``__label__hq`` for DCLM; the
        ``__label__`` prefix may be left out).
    text_column : str
    """

    model: str = Field(min_length=1)
    label: str = Field("__label__1", min_length=1)
    text_column: str = "text"


class FastTextScorer(RowStage):
    """Adds ``<name>``: the probability of ``label`` under a fastText classifier.

    The model loads once per worker in ``setup``; a label the model does not
    have is an error there, naming ``label`` and the model's labels.

    Example
    -------
    .. code-block:: yaml

        - stage: fasttext
          name: preselect
          model: ../models/preselect.bin
          label: __label__1
    """

    type_name = "fasttext"
    path_fields = ("model",)
    Params: ClassVar = FastTextParams
    extras = ("fasttext",)

    def input_columns(self) -> tuple[str, ...]:
        return (self.params.text_column,)

    def output_columns(self) -> tuple[str, ...]:
        return (self.name,)

    def check(self, base_dir: str) -> None:
        path = self.resolve_path(self.params.model)
        if not is_model_file(path):
            raise ValueError(f"{self.name}.model: {path!r} is not a fastText model file")

    def setup(self) -> None:
        if getattr(self, "_model", None) is not None:
            return
        model = load_fasttext(self.local_path(self.params.model))
        self._label = resolve_label(model, self.params.label, f"{self.name}.label")
        self._model = model

    def process(self, batch: pa.Table) -> StageOutput:
        self.setup()
        p = predict_proba(self._model, batch.column(self.params.text_column), self._label)
        return keep_all(batch.append_column(self.name, pa.array(p, pa.float64(),
                                                                 mask=np.isnan(p))))
