"""Data for dataset distillation: the built-in sets and feature columns as matrices.

``digits`` is scikit-learn's bundled 8x8 handwritten digits (1,797 images,
10 classes); ``topics`` a generated labelled text set: sentences about five
topics written from topic and shared vocabularies (with words borrowed across
topics), as 256 hashed word uni- and bigram features (``HashingVectorizer``).
Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# scikit-learn is imported where used.
DATASETS = ("digits", "topics")

TOPIC_WORDS = {
    "cooking": "oven simmer garlic flour butter recipe bake onion pepper sauce roast dough "
               "skillet fry stew spice".split(),
    "finance": "market stock bond yield interest loan bank credit dividend inflation equity "
               "budget invest price fund".split(),
    "space": "orbit rocket planet launch satellite moon star galaxy telescope astronaut comet "
             "gravity mars crater probe".split(),
    "sports": "match goal team coach league score player season referee stadium sprint "
              "tournament pass defense win".split(),
    "music": "melody chord guitar rhythm album concert drum singer tempo piano verse band "
             "chorus violin note".split(),
}
SHARED_WORDS = ("the a of and to in on with for new big small last first good long report "
                "today people time year day week city world plan").split()


def topic_sentences(n_per_topic: int = 300, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Generated sentences and their topic labels (strings).

    Each sentence has 6-12 words: ~55% shared words, the rest topic words of
    which one in four is borrowed from another topic, so a word alone does not
    give the label away.
    """
    rng = np.random.default_rng(seed)
    topics = sorted(TOPIC_WORDS)
    texts, labels = [], []
    for topic in topics:
        others = [t for t in topics if t != topic]
        for _ in range(n_per_topic):
            words = []
            for _ in range(int(rng.integers(6, 13))):
                if rng.random() < 0.55:
                    words.append(str(rng.choice(SHARED_WORDS)))
                elif rng.random() < 0.25:
                    words.append(str(rng.choice(TOPIC_WORDS[str(rng.choice(others))])))
                else:
                    words.append(str(rng.choice(TOPIC_WORDS[topic])))
            texts.append(" ".join(words))
            labels.append(topic)
    return texts, np.asarray(labels)


def hashed_ngram_features(texts: list[str], n_features: int = 256) -> np.ndarray:
    """L2-normalised counts of hashed word uni- and bigrams (scikit-learn ``HashingVectorizer``)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    vec = HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False,
                            norm="l2")
    return vec.transform(texts).toarray().astype(np.float32)


def builtin_dataset(name: str) -> tuple[np.ndarray, np.ndarray, list[str], tuple[int, ...] | None]:
    """``(x, y, texts, image_shape)`` of a built-in data set (``digits`` or ``topics``)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        texts = [f"8x8 handwritten digit {v}" for v in y]
        return x.astype(np.float32), y.astype(np.int64), texts, (1, 8, 8)
    if name == "topics":
        texts, y = topic_sentences()
        return hashed_ngram_features(texts), y, texts, None
    raise ValueError(f"--dataset must be one of {DATASETS}, got {name!r}")


def write_dataset_jsonl(path: Path, x: np.ndarray, y: np.ndarray, texts: list[str],
                        prefix: str) -> None:
    """One JSON record per row: id, text, features, label (input for a recipe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for i, (row, label, text) in enumerate(zip(x, y, texts, strict=True)):
            f.write(json.dumps({"id": f"{prefix}-{i:05d}", "text": text,
                                "features": [round(float(v), 6) for v in row.reshape(-1)],
                                "label": label.item()}) + "\n")
    tmp.replace(path)


def column_as_matrix(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """A list column (or JSON-array strings, as recipe readers pass extra columns) as 2-d float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"column {name!r} has {column.null_count} null rows")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        rows = [json.loads(v) for v in column.to_pylist()]
        arr = np.asarray(rows, dtype=np.float32)
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or \
            pa.types.is_fixed_size_list(column.type):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(column)
        while pa.types.is_list(flat.type) or pa.types.is_fixed_size_list(flat.type):
            flat = pc.list_flatten(flat)
        if lengths.size and lengths.min() != lengths.max():
            raise ValueError(f"column {name!r} has rows of different lengths "
                             f"({lengths.min()} to {lengths.max()})")
        arr = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), -1)
    else:
        raise ValueError(f"column {name!r} has type {column.type}; expected a list of numbers "
                         f"or JSON arrays as strings")
    if arr.ndim != 2:
        raise ValueError(f"column {name!r} must hold equal-length numeric arrays")
    return arr
