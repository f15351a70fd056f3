"""Text embeddings: a sentence-embedding model from a local folder, or hashed n-grams.

Two embedders with one interface, ``embed(texts) -> (n, dim) float32``,
rows L2-normalized so squared Euclidean costs lie in [0, 4]:

``HashedNgramEmbedder`` (default; no model needed)
    Character n-grams inside word boundaries (3 to 5 characters by default)
    hashed into ``dim`` signed buckets (scikit-learn's ``HashingVectorizer``,
    MurmurHash3 with a fixed seed, so the same text gives the same vector on
    every machine), then sublinear term frequency 1 + log(tf) and L2 norm.

``SentenceEmbedder`` (``model`` is a local folder)
    A transformers encoder (e.g. all-MiniLM-L6-v2), mean-pooled over the
    attention mask and L2-normalized, as sentence-transformers does. Loaded
    with ``local_files_only=True``: nothing is fetched from a hub.

The ``embeddings`` stage adds a column named after the stage holding the
vector (``fixed_size_list<float32>[dim]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from gristmill.pipeline.model_cache import is_model_folder
from gristmill.pipeline.stage import RowStage, StageOutput, StageParams, keep_all


class HashedNgramEmbedder:
    """Hashed character n-gram features, deterministic and vectorized.

    Example
    -------
    >>> e = HashedNgramEmbedder(dim=64)
    >>> v = e.embed(["the cat sat", "the cat sat", "zebra"])
    >>> v.shape, bool(np.allclose(v[0], v[1])), round(float(np.linalg.norm(v[2])), 4)
    ((3, 64), True, 1.0)
    """

    def __init__(self, dim: int = 256, ngram_range: tuple[int, int] = (3, 5),
                 analyzer: Literal["char_wb", "char", "word"] = "char_wb") -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        self.dim = dim
        self._vec = HashingVectorizer(n_features=dim, analyzer=analyzer, ngram_range=ngram_range,
                                      alternate_sign=True, norm=None, lowercase=True,
                                      dtype=np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        X = self._vec.transform(list(texts))
        # Signed hashing can cancel n-grams to explicit zeros; counts are then |x| >= 1.
        X.eliminate_zeros()
        # Sublinear tf keeps one frequent n-gram from dominating a long text.
        X.data = np.sign(X.data) * (1.0 + np.log(np.abs(X.data)))
        out = X.toarray().astype(np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


class SentenceEmbedder:
    """Mean-pooled transformer embeddings from a model folder on disk."""

    def __init__(self, path: str, batch_size: int = 64, max_length: int = 256,
                 progress: bool = False) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if not os.path.isdir(path):
            raise ValueError(f"model: {path!r} is not a folder with a transformers model")
        self._torch = torch
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.dim = int(self._model.config.hidden_size)
        self.batch_size, self.max_length, self.progress = batch_size, max_length, progress

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        with torch.inference_mode():
            for i in tqdm(starts, desc="embed", disable=not self.progress):
                enc = self._tok(texts[i:i + self.batch_size], padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
                h = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[i:i + len(pooled)] = torch.nn.functional.normalize(pooled, dim=1).numpy()
        return out


def make_embedder(model: str | None = None, dim: int = 256, **kw) -> HashedNgramEmbedder | SentenceEmbedder:
    """A ``SentenceEmbedder`` when ``model`` (a local folder) is given, else hashed n-grams."""
    if model is not None:
        return SentenceEmbedder(model, **kw)
    return HashedNgramEmbedder(dim=dim)


class EmbeddingsParams(StageParams):
    """Parameters of the ``embeddings`` stage.

    ``model``: local folder of a transformers encoder; None uses hashed
    n-grams of ``dim`` buckets over ``ngram_min``..``ngram_max`` characters.
    """

    model: str | None = None
    dim: int = Field(256, ge=8, le=65536)
    ngram_min: int = Field(3, ge=1, le=10)
    ngram_max: int = Field(5, ge=1, le=10)
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(256, ge=8, le=8192)
    text_column: str = "text"

    @model_validator(mode="after")
    def _ngram_order(self) -> EmbeddingsParams:
        if self.ngram_max < self.ngram_min:
            raise ValueError(f"ngram_max ({self.ngram_max}) must be >= ngram_min ({self.ngram_min})")
        return self


class Embeddings(RowStage):
    """Adds a column (named after the stage) with each text's embedding."""

    type_name = "embeddings"
    path_fields = ("model",)
    Params = EmbeddingsParams
    requires = ("text",)

    def required_extras(self) -> tuple[str, ...]:
        """A model needs torch and transformers; hashed n-grams need scikit-learn."""
        return ("torch",) if self.params.model is not None else ("ot",)

    def check(self, base_dir: str) -> None:
        m = self.params.model
        if m is not None:
            path = self.resolve_path(m)
            if not is_model_folder(path):
                raise ValueError(f"embeddings.model: {path!r} is not a folder with a model")

    def setup(self) -> None:
        if getattr(self, "_embedder", None) is not None:
            return
        p = self.params
        if p.model is not None:
            self._embedder = SentenceEmbedder(self.local_path(p.model), p.batch_size,
                                              p.max_length)
        else:
            self._embedder = HashedNgramEmbedder(p.dim, (p.ngram_min, p.ngram_max))

    def output_columns(self) -> tuple[str, ...]:
        return (self.name,)

    def process(self, batch: pa.Table) -> StageOutput:
        self.setup()
        texts = batch.column(self.params.text_column).to_pylist()
        vecs = self._embedder.embed(["" if t is None else t for t in texts])
        col = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])
        return keep_all(batch.append_column(self.name, col))


def embedding_matrix(table: pa.Table, column: str) -> np.ndarray:
    """The (rows, dim) float32 matrix of an embeddings column."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
