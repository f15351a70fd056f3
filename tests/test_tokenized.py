"""Tokenized shards: Megatron .bin/.idx layout, domain sidecar, streaming writer."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gristmill.pipeline.tokenized import (
    DEFAULT_DOMAIN,
    INDEX_HEADER,
    IndexedTokens,
    IndexedTokensWriter,
    tokenize_shards,
    write_tokenized,
)
from gristmill.trainers.tiny import build_tokenizer

TEXTS = [f"document {i}: the {'cat' if i % 2 else 'dog'} sat on mat number {i * 7}." for i in range(40)]
DOMAINS = ["web" if i % 3 else "code" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    return build_tokenizer(TEXTS, vocab_size=320, path=path)


def test_round_trip_gives_back_each_documents_tokens_and_boundaries(tokenizer, tmp_path):
    write_tokenized(TEXTS, tokenizer, tmp_path / "c", domains=DOMAINS, batch_size=7, progress=False)
    ds = IndexedTokens(tmp_path / "c")
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for t in TEXTS]
    assert len(ds) == len(TEXTS)
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert ds.sizes.tolist() == [len(e) for e in expected]
    assert ds.num_tokens == sum(len(e) for e in expected)
    assert ds[-1].tolist() == expected[-1]
    assert tokenizer.decode(ds[3][:-1]) == TEXTS[3]


def test_index_bytes_follow_megatron_mmap_layout(tokenizer, tmp_path):
    write_tokenized(TEXTS[:5], tokenizer, tmp_path / "c", progress=False)
    raw = (tmp_path / "c.idx").read_bytes()
    sizes = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXTS[:5]]
    assert raw[:9] == b"MMIDIDX\x00\x00" == INDEX_HEADER
    assert struct.unpack("<Q", raw[9:17]) == (1,)          # version
    assert struct.unpack("<B", raw[17:18]) == (8,)         # uint16 for a 320-token vocabulary
    assert struct.unpack("<QQ", raw[18:34]) == (5, 6)      # sequences, documents + 1
    body = raw[34:]
    assert np.frombuffer(body, "<i4", 5).tolist() == sizes
    assert np.frombuffer(body, "<i8", 5, offset=20).tolist() == (2 * np.cumsum([0, *sizes[:-1]])).tolist()
    assert np.frombuffer(body, "<i8", 6, offset=60).tolist() == [0, 1, 2, 3, 4, 5]
    assert len(body) == 20 + 40 + 48
    assert (tmp_path / "c.bin").stat().st_size == 2 * sum(sizes)


def test_large_vocabulary_is_stored_as_int32(tmp_path):
    with IndexedTokensWriter(tmp_path / "big", vocab_size=70000) as w:
        w.add_documents([[69999, 1], [5]])
    raw = (tmp_path / "big.idx").read_bytes()
    assert raw[17] == 4
    ds = IndexedTokens(tmp_path / "big")
    assert ds.dtype == np.int32
    assert ds[0].tolist() == [69999, 1] and ds[1].tolist() == [5]


def test_domain_sidecar_records_names_ids_tokenizer_and_eos(tokenizer, tmp_path):
    write_tokenized(TEXTS, tokenizer, tmp_path / "c", domains=DOMAINS, progress=False)
    ds = IndexedTokens(tmp_path / "c")
    side = json.loads((tmp_path / "c.domains.json").read_text())
    assert side["domains"] == ["code", "web"] == ds.domain_names
    assert side["eos_token_id"] == tokenizer.eos_token_id == ds.eos_token_id
    assert side["tokenizer"] == tokenizer.name_or_path
    assert side["num_documents"] == 40 and side["num_tokens"] == ds.num_tokens
    dom = np.load(tmp_path / "c.dom.npy")
    assert dom.dtype == np.uint16
    assert [ds.domain_names[d] for d in dom] == DOMAINS
    assert ds.documents_in("code").tolist() == [i for i in range(40) if i % 3 == 0]
    per = ds.tokens_per_domain()
    assert per["code"] == int(ds.sizes[::3].sum()) and sum(per.values()) == ds.num_tokens


def test_writer_appends_tokens_to_disk_while_texts_are_still_streaming(tokenizer, tmp_path):
    seen_sizes = []

    def texts():
        for i in range(200):
            if i % 50 == 0:
                tmp = [p for p in tmp_path.iterdir() if ".c.bin.tmp" in p.name]
                seen_sizes.append(tmp[0].stat().st_size if tmp else -1)
            yield TEXTS[i % len(TEXTS)]

    write_tokenized(texts(), tokenizer, tmp_path / "c", batch_size=50, progress=False)
    # Before the first batch nothing is written; after each batch of 50 the
    # temporary .bin has grown, so no more than one batch is held in memory.
    assert seen_sizes[0] == 0
    assert all(b > a for a, b in zip(seen_sizes, seen_sizes[1:], strict=False))
    assert seen_sizes[-1] < (tmp_path / "c.bin").stat().st_size
    assert len(IndexedTokens(tmp_path / "c")) == 200


def test_failed_write_publishes_nothing(tokenizer, tmp_path):
    def texts():
        yield from TEXTS[:10]
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_tokenized(texts(), tokenizer, tmp_path / "c", batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_tokenize_shards_reads_parquet_and_jsonl_in_order_with_domains(tokenizer, tmp_path):
    pq.write_table(pa.table({"id": [str(i) for i in range(20)], "text": TEXTS[:20],
                             "domain": DOMAINS[:20]}), tmp_path / "part-00000.parquet")
    with open(tmp_path / "part-00001.jsonl", "w") as f:
        for t in TEXTS[20:]:
            f.write(json.dumps({"text": t}) + "\n")
    tokenize_shards([tmp_path / "part-00000.parquet", tmp_path / "part-00001.jsonl"],
                    tokenizer.name_or_path, tmp_path / "out", batch_size=6, progress=False)
    ds = IndexedTokens(tmp_path / "out")
    assert len(ds) == 40
    assert tokenizer.decode(ds[25][:-1]) == TEXTS[25]
    assert [ds.domain_names[d] for d in ds.domains] == DOMAINS[:20] + [DEFAULT_DOMAIN] * 20


def test_tokenize_shards_names_a_missing_text_column(tokenizer, tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="text_column 'text' not found"):
        tokenize_shards([tmp_path / "p.parquet"], tokenizer.name_or_path, tmp_path / "o", progress=False)


def test_reader_rejects_a_file_that_is_not_a_megatron_index(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"NOTANIDX" + bytes(40))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a Megatron index"):
        IndexedTokens(tmp_path / "x")


def test_write_tokenized_rejects_zero_batch_size(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        write_tokenized(TEXTS, tokenizer, tmp_path / "c", batch_size=0)


def test_empty_corpus_round_trips_with_zero_documents(tokenizer, tmp_path):
    write_tokenized([], tokenizer, tmp_path / "c", progress=False)
    ds = IndexedTokens(tmp_path / "c")
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.doc_idx.tolist() == [0]
