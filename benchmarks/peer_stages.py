"""Peer implementations on the documents of ``bench_stages.py``; runs in the
peers' own virtualenv (DataTrove, spaCy, lingua), never in gristmill's.

Usage (``bench_stages.py`` calls it)::

    PEERS/bin/python benchmarks/peer_stages.py DOCS.jsonl OUT.json --stages ...

Prints nothing; writes ``{stage: {"cpu_s": ..., "docs": ..., "decisions": [...],
"texts": [...]}}``, where a decision is ``"keep"`` or the drop reason.
"""

from __future__ import annotations

import argparse
import json
import time


def _datatrove(name: str):
    if name == "gopher_repetition":
        from datatrove.pipeline.filters import GopherRepetitionFilter

        return GopherRepetitionFilter()
    if name == "c4_lines":
        from datatrove.pipeline.filters import C4QualityFilter

        return C4QualityFilter()
    if name == "fineweb_lines":
        from datatrove.pipeline.filters import FineWebQualityFilter

        return FineWebQualityFilter()
    if name == "gopher":
        from datatrove.pipeline.filters import GopherQualityFilter

        return GopherQualityFilter()
    raise ValueError(name)


def run_filter(name: str, docs: list[dict]) -> dict:
    from datatrove.data import Document

    f = _datatrove(name)
    objs = [Document(text=d["text"], id=d["id"]) for d in docs]
    f.filter(Document(text="warm up the tokenizer. " * 5, id="w"))
    decisions, texts = [], []
    t0 = time.process_time()
    for doc in objs:
        r = f.filter(doc)
        if isinstance(r, tuple):
            decisions.append(r[1])
        elif r:
            decisions.append("keep")
        else:
            decisions.append("drop")
        texts.append(doc.text)
    cpu = time.process_time() - t0
    return {"cpu_s": cpu, "docs": len(objs), "decisions": decisions, "texts": texts}


def run_pii(docs: list[dict]) -> dict:
    from datatrove.data import Document
    from datatrove.pipeline.formatters import PIIFormatter

    f = PIIFormatter(only_remove_public_ips=False)
    objs = [Document(text=d["text"], id=d["id"]) for d in docs]
    t0 = time.process_time()
    texts = [f.format(doc.text) for doc in objs]
    return {"cpu_s": time.process_time() - t0, "docs": len(objs), "texts": texts}


def gopher_measures(docs: list[dict]) -> dict:
    """DataTrove's Gopher repetition measures of every document (the golden values of
    ``tests/test_web_filters.py::test_gopher_repetition_measures_match_datatrove``)."""
    import re

    from datatrove.pipeline.filters.gopher_repetition_filter import (
        find_all_duplicate,
        find_duplicates,
        find_top_duplicate,
        get_n_grams,
    )
    from datatrove.utils.text import split_into_words

    out = {}
    for d in docs:
        t = d["text"]
        words = split_into_words(t, "en")
        row = {"words": len(words)}
        for n in (2, 3, 4):
            grams = get_n_grams(words, n)
            row[f"top{n}"] = find_top_duplicate(grams) if grams else 0
        for n in range(5, 11):
            row[f"dup{n}"] = find_all_duplicate(words, n)
        row["para"] = list(find_duplicates(re.split(r"\n{2,}", t.strip())))
        row["line"] = list(find_duplicates(re.split("\n+", t)))
        out[d["id"]] = row
    return out


def run_lingua(docs: list[dict]) -> dict:
    from lingua import LanguageDetectorBuilder

    t0 = time.process_time()
    det = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()
    load = time.process_time() - t0
    t0 = time.process_time()
    res = [det.detect_language_of(d["text"]) for d in docs]
    cpu = time.process_time() - t0
    labels = [r.iso_code_639_1.name.lower() if r is not None else None for r in res]
    return {"cpu_s": cpu, "load_s": load, "docs": len(docs), "decisions": labels}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("docs")
    ap.add_argument("out")
    ap.add_argument("--stages", nargs="+", required=True)
    args = ap.parse_args()
    with open(args.docs) as f:
        docs = [json.loads(line) for line in f]
    out = {}
    for name in args.stages:
        if name == "pii":
            out[name] = run_pii(docs)
        elif name == "gopher_measures":
            out[name] = gopher_measures(docs)
        elif name == "lingua":
            out[name] = run_lingua(docs)
        else:
            out[name] = run_filter(name, docs)
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
