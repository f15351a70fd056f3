"""The real-text corpus builder: markup stripping, document cuts, splits by whole document."""

from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest

from gristmill.cli.main import main as cli_main
from gristmill.pipeline import real_corpus as rc


def _need(*names: str) -> None:
    try:
        rc.check_installed(list(names))
    except rc.MissingPackagesError as e:
        pytest.skip(str(e))


def test_html_blocks_drop_navigation_and_keep_pre_verbatim():
    html = (b"<html><head><title>t</title></head><body><div class='navheader'>Prev Next</div>"
            b"<h2>2.1. Install<a class='headerlink'>\xc2\xb6</a></h2><p>Run <code>apt</code>\n"
            b"  now.</p><ul><li>one</li><li>two <b>b</b></li></ul><pre>a\n   b</pre>"
            b"<script>var x;</script></body></html>")
    assert rc.html_blocks(html) == [("h", "2.1. Install"), ("p", "Run apt now."), ("p", "one"),
                                    ("p", "two b"), ("pre", "a\n   b")]


def test_cut_documents_cuts_at_headings_within_size_range():
    blocks = [("h", "A"), ("p", "x" * 700), ("p", "y" * 500), ("h", "B"), ("p", "z" * 800),
              ("h", "C"), ("p", "w " * 2600), ("p", "v" * 100)]
    docs = rc.cut_documents(blocks, min_chars=1000, max_chars=4000)
    # "A" reached min_chars, so heading B starts a new document; B is short and
    # takes C's heading; C's 5,200-char paragraph is cut at whitespace and the
    # short last paragraph joins the piece before it.
    assert [t for t, _ in docs] == ["A", "B", None, None]
    assert docs[0][1] == "A\n\n" + "x" * 700 + "\n\n" + "y" * 500
    assert all(len(text) <= 4000 for _, text in docs)
    assert "".join(text for _, text in docs).count("w") == 2600
    assert docs[-1][1].endswith("\n\n" + "v" * 100)


def test_long_description_keeps_paragraphs_and_verbatim_lines():
    raw = " First line\n continues here.\n .\n Second para:\n   verbatim  line\n"
    assert rc.long_description(raw) == "First line continues here.\n\nSecond para:\n  verbatim  line"


def test_missing_package_names_the_apt_get_command(monkeypatch):
    monkeypatch.setitem(rc.SOURCES, "nowhere", rc.DocSource(
        "nowhere", "nowhere-doc", "en", "html", ("/nonexistent/gristmill/*.html",)))
    with pytest.raises(rc.MissingPackagesError, match="apt-get install -y nowhere-doc"):
        rc.build_real_corpus("unused", ["nowhere"])


def test_build_small_manual_splits_by_whole_document(tmp_path):
    _need("maint-guide-fr", "perl")
    paths = rc.build_real_corpus(tmp_path / "c", ["maint-guide-fr", "perl"], max_files=3)
    t = pq.read_table(paths["corpus"]).to_pylist()
    assert {r["source"] for r in t} == {"maint-guide-fr", "perl"}
    assert all(500 <= len(r["text"]) <= 4000 for r in t)
    tag = re.compile(r"</?(p|div|a|span|h[1-6]|li|pre|code)\b[^>]*>")
    assert not any(tag.search(r["text"]) for r in t)
    # every source document lands in exactly one split
    split_of_doc: dict[str, set] = {}
    for r in t:
        split_of_doc.setdefault(r["doc"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of_doc.values())
    # idempotent: a second build with the same parameters keeps the files
    mtime = paths["corpus"].stat().st_mtime_ns
    assert rc.build_real_corpus(tmp_path / "c", ["maint-guide-fr", "perl"], max_files=3) == paths
    assert paths["corpus"].stat().st_mtime_ns == mtime


def test_cli_builds_package_descriptions(tmp_path, capsys):
    _need("pkgdesc")
    assert cli_main(["real-corpus", str(tmp_path / "p"), "--sources", "pkgdesc",
                     "--max-packages", "300"]) == 0
    pk = pq.read_table(tmp_path / "p" / "packages.parquet").to_pylist()
    assert 250 <= len(pk) <= 300
    assert all(p["short"] and "\n" not in p["short"] for p in pk)
    # binary packages of one source package share a split
    by_source: dict[str, set] = {}
    for p in pk:
        by_source.setdefault(p["source_package"], set()).add(p["split"])
    assert all(len(s) == 1 for s in by_source.values())
    # the corpus documents of the descriptions are in the same splits
    corpus = pq.read_table(tmp_path / "p" / "corpus.parquet").to_pylist()
    split = {r["id"]: r["split"] for r in corpus}
    assert all(split[f"pkgdesc/{p['package']}"] == p["split"] for p in pk)
    assert "corpus:" in capsys.readouterr().out
