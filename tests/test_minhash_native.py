"""The C++ MinHash kernel gives bit-identical results to the numpy path."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pydantic import ValidationError

from gristmill.ext import minhash_native
from gristmill.selectors.minhash import (
    MinHashDedup,
    _unicode_spaces,
    band_keys,
    native_kernel,
    permutations,
    shingle_hashes,
    signatures,
)

if minhash_native.module() is None:
    pytest.skip(f"C++ MinHash kernel not built: {minhash_native.build_error()}",
                allow_module_level=True)

SCHEMES = ["affine32", "legacy", "one_permutation"]


def _random_texts(seed: int, n: int = 60) -> list[str | None]:
    """Words of a small vocabulary (so shingles repeat) with punctuation, case,
    odd whitespace, every ASCII byte somewhere, and a few non-ASCII texts."""
    rng = np.random.RandomState(seed)
    vocab = [f"w{i}" for i in range(40)] + ["Hello,", "WORLD!", "don't", "_x_", "--", "a.b",
                                             "\x00z", "q\x1fr", "tab\there", "1\x0b2", "x" * 70]
    texts: list[str | None] = []
    for i in range(n):
        words = [vocab[j] for j in rng.randint(0, len(vocab), rng.randint(0, 30))]
        texts.append(" ".join(words) if i % 3 else "  ".join(words) + " \n")
    texts += ["", None, "... !!", "Café naïve 東京 Tower, ok!\u00a0done",
              "".join(chr(c) for c in range(128)), "one two", "solo"]
    return texts


def _pairs(h: np.ndarray, d: np.ndarray) -> list[tuple[int, int]]:
    return sorted(zip(d.tolist(), h.tolist(), strict=True))


@pytest.mark.parametrize("normalize", [True, False])
def test_native_word_shingles_equal_numpy_in_the_same_order(normalize):
    for seed, text_type in ((0, pa.string()), (1, pa.large_string())):
        texts = pa.array(_random_texts(seed), text_type).slice(2)
        for ngram in (1, 3, 5):
            hn, dn = shingle_hashes(texts, "word", ngram, normalize, kernel="numpy")
            hc, dc = shingle_hashes(texts, "word", ngram, normalize, kernel="native")
            assert hc.dtype == np.uint32 and dc.dtype == np.int64
            assert len(hn) > 0
            assert np.array_equal(hn, hc) and np.array_equal(dn, dc), (seed, ngram)


def test_native_shingles_split_and_normalize_non_ascii_words_as_pyarrow_does():
    spaces = [chr(c) for c in _unicode_spaces()]
    assert len(spaces) >= 17 and "\u00a0" in spaces and "\u3000" in spaces
    rng = np.random.RandomState(2)
    words = ["Café", "naïve", "東京", "ÉCOLE", "«quoted»", "—", "x’s", "ǅemal", "ok", "w1", "ß"]
    texts = ["".join(words[i] + spaces[j] for i, j in zip(rng.randint(0, len(words), 25),
                                                            rng.randint(0, len(spaces), 25),
                                                            strict=True)) for _ in range(30)]
    texts += ["— « »", "\u00a0\u2003", "only—one"]
    for normalize in (True, False):
        for ngram in (1, 2, 5):
            hn, dn = shingle_hashes(pa.array(texts), "word", ngram, normalize, kernel="numpy")
            hc, dc = shingle_hashes(pa.array(texts), "word", ngram, normalize, kernel="native")
            assert np.array_equal(hn, hc) and np.array_equal(dn, dc), (normalize, ngram)


def test_pyarrow_splits_words_at_no_other_non_ascii_code_point():
    cps = np.setdiff1d(np.r_[128:0xD800, 0xE000:0x110000], _unicode_spaces())
    probe = pa.array([f"a{chr(c)}b" for c in cps])
    lengths = pc.list_value_length(pc.utf8_split_whitespace(probe)).to_numpy()
    assert (lengths == 1).all(), [hex(c) for c in cps[lengths != 1]]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_perm", [128, 37])
def test_native_signatures_equal_numpy_on_random_documents(scheme, num_perm):
    for seed in range(3):
        texts = pa.array(_random_texts(seed))
        h, d = shingle_hashes(texts, "word", 3, kernel="numpy")
        expected = signatures(h, d, len(texts), num_perm, seed + 1, scheme, kernel="numpy")
        got = signatures(h, d, len(texts), num_perm, seed + 1, scheme, kernel="native")
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert np.array_equal(got, expected), (scheme, seed)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_native_signatures_equal_numpy_on_full_32_bit_hashes(scheme):
    rng = np.random.RandomState(9)
    h = rng.randint(0, 1 << 32, 5000, dtype=np.uint64).astype(np.uint32)
    h[:4] = [0, 1, 0xFFFFFFFF, 0x80000000]
    d = rng.randint(0, 40, h.size).astype(np.int64)  # unsorted, with empty records
    d[d == 7] = 8
    expected = signatures(h, d, 41, 64, 42, scheme, kernel="numpy")
    got = signatures(h, d, 41, 64, 42, scheme, kernel="native")
    assert np.array_equal(got, expected)
    assert (got[7] == got[40]).all() and got[7].max() == got[7].min()  # empty: untouched


def test_native_band_keys_equal_numpy_for_both_signature_dtypes():
    rng = np.random.RandomState(3)
    for dtype, high in ((np.uint32, 1 << 32), (np.uint64, 1 << 32)):
        sig = rng.randint(0, high, (50, 128), dtype=np.uint64).astype(dtype)
        for bands, rows in ((9, 13), (1, 128), (20, 5)):
            expected = band_keys(sig, bands, rows, kernel="numpy")
            assert np.array_equal(band_keys(sig, bands, rows, kernel="native"), expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_stage_keys_are_the_same_table_with_either_kernel(scheme):
    texts = _random_texts(4, 300)
    texts += texts[:40]  # exact copies: candidates in every band
    batch = pa.table({"_key": pa.array(range(len(texts)), pa.uint64()),
                      "id": [f"r{i:04d}" for i in range(len(texts))], "text": texts})
    numpy_stage = MinHashDedup({"scheme": scheme, "kernel": "numpy", "verify": True})
    native_stage = MinHashDedup({"scheme": scheme, "kernel": "native", "verify": True})
    assert (numpy_stage.backend, native_stage.backend) == ("numpy", "native")
    expected = numpy_stage.keys(batch)
    assert native_stage.keys(batch).equals(expected)
    assert expected.num_rows > 0


def test_kernel_parameter_is_validated_and_numpy_needs_no_build():
    with pytest.raises(ValidationError, match="kernel"):
        MinHashDedup({"kernel": "fortran"})
    with pytest.raises(ValueError, match="kernel must be one of auto, native, numpy"):
        native_kernel("fortran")
    assert native_kernel("numpy") is None
    assert native_kernel("auto") is minhash_native.module()


@pytest.mark.parametrize("isa", ["base", "sse4.1", "avx2"])
@pytest.mark.parametrize("scheme", ["affine32", "legacy"])
def test_every_compiled_copy_of_the_signature_loop_equals_numpy(scheme, isa):
    # the copies for older CPUs are forced here, whatever this CPU has
    native = minhash_native.module()
    if isa != "base" and native.pick_isa() not in (isa, "avx2"):
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.RandomState(11)
    h = rng.randint(0, 1 << 32, 3000, dtype=np.uint64).astype(np.uint32)
    d = np.sort(rng.randint(0, 30, h.size)).astype(np.int64)
    for num_perm in (100, 128, 7):  # whole blocks of 32 lanes, a tail, only a tail
        a, b = permutations(num_perm, 5, scheme)
        expected = signatures(h, d, 30, num_perm, 5, scheme, kernel="numpy")
        got = getattr(native, f"{scheme}_signatures")(h, d, 30, a, b, isa=isa)
        assert np.array_equal(got, expected), num_perm


def test_asking_for_an_unknown_instruction_set_is_an_error():
    with pytest.raises(ValueError, match="isa must be auto, avx2, sse4.1 or base"):
        minhash_native.module().pick_isa("neon")


def test_without_a_compiler_auto_warns_and_falls_back_to_numpy_and_native_raises(tmp_path):
    script = """
import warnings
import pyarrow as pa
import pytest
from gristmill.selectors.minhash import MinHashDedup
batch = pa.table({"_key": pa.array([0, 1], pa.uint64()), "id": ["a", "b"],
                  "text": ["one two three four five six", "one two"]})
with pytest.warns(RuntimeWarning, match=r"C\\+\\+ MinHash kernel failed"):
    stage = MinHashDedup({})
    assert stage.backend == "numpy"
assert stage.keys(batch).num_rows == 2 * stage.bands
with pytest.raises(RuntimeError, match="required"):
    MinHashDedup({"kernel": "native"}).backend
print("fell back")
"""
    env = {**os.environ, "CXX": "/bin/false", "GRISTMILL_EXT_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "fell back"


def test_a_built_kernel_loads_without_importing_torch():
    """A later process (a spawned worker) loads the built library directly: importing
    torch would cost it ~220 MB of resident memory (issue 16)."""
    script = """
import sys
import numpy as np
from gristmill.ext import minhash_native
from gristmill.selectors.minhash import signatures
mod = minhash_native.module(required=True)
h = np.arange(1, 200, dtype=np.uint32)
sig = signatures(h, np.repeat(np.arange(4), 50)[:199], 4, 16, 1, kernel="native")
ref = signatures(h, np.repeat(np.arange(4), 50)[:199], 4, 16, 1, kernel="numpy")
assert np.array_equal(sig, ref)
print("torch" in sys.modules, mod.__file__.endswith(".so"))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False True"
