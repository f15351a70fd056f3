"""The everyday web-data stages on real text: language_id, pii, decontaminate,
url_filter, filter, gopher_repetition, c4_lines, fineweb_lines."""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from gristmill.formatters.pii import Pii, iban_ok, luhn_ok
from gristmill.selectors.filters.c4_lines import C4Lines
from gristmill.selectors.filters.decontaminate import Decontaminate, normalize_for_overlap
from gristmill.selectors.filters.expression import ExpressionError, ExpressionFilter
from gristmill.selectors.filters.fineweb_lines import FineWebLines
from gristmill.selectors.filters.gopher_repetition import (
    GopherRepetition,
    GopherRepetitionParams,
    duplicate_ngram_chars,
    repetition_reason,
    top_ngram_chars,
)
from gristmill.selectors.filters.language_id import LanguageId
from gristmill.selectors.filters.text_units import find_duplicates, split_words
from gristmill.selectors.filters.url import UrlFilter

DEBIAN = Path("/usr/share/debian-reference")


def _table(texts: list[str], **cols) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts, **cols})


@functools.cache
def _paragraphs(lang: str) -> tuple[str, ...]:
    path = DEBIAN / f"debian-reference.{lang}.txt.gz"
    if not path.is_file():
        pytest.skip(f"apt-get install debian-reference-{lang}")
    text = gzip.decompress(path.read_bytes()).decode()
    return tuple(" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if "|" not in p)


def _debian(lang: str, n: int, min_chars: int = 200) -> list[str]:
    """``n`` paragraphs of at least 200 characters from the Debian Reference in ``lang``
    (a translation's paragraphs left in English are skipped)."""
    english = set(_paragraphs("en")) if lang != "en" else set()
    paras = [p for p in _paragraphs(lang) if len(p) >= min_chars and p not in english]
    return paras[100:100 + n]


# ---- language_id ---------------------------------------------------------------------------

LANG_SAMPLES = {
    "de": "Die Mühle am Fluss mahlt seit zweihundert Jahren das Korn der Bauern aus dem Tal.",
    "fr": "Le moulin au bord de la rivière moud depuis deux siècles le grain des paysans.",
    "es": "El molino junto al río muele desde hace dos siglos el grano de los campesinos.",
    "ja": "川のそばの水車小屋は二百年もの間、谷の農家の穀物をひいてきました。",
    "zh": "河边的磨坊两百年来一直为山谷里的农民磨谷物。",
    "en": "The mill by the river has ground the farmers' grain for two hundred years.",
}


def test_language_id_labels_real_sentences_and_keeps_the_list():
    st = LanguageId({"keep": ["de", "ja"], "min_confidence": 0.5})
    st.setup()
    out = st.process(_table(list(LANG_SAMPLES.values())))
    assert out.kept.column("language_id_lang").to_pylist() == ["de", "ja"]
    assert min(out.kept.column("language_id_confidence").to_pylist()) > 0.5
    assert sorted(out.dropped.column("reason").to_pylist()) == [
        "language_en", "language_es", "language_fr", "language_zh"]


def test_language_id_on_debian_reference_paragraphs():
    st = LanguageId()
    st.setup()
    for lang, code in (("de", "de"), ("fr", "fr"), ("ja", "ja"), ("zh-cn", "zh")):
        paras = _debian(lang, 80, min_chars=200 if code in ("de", "fr") else 60)
        if code in ("ja", "zh"):  # the translations keep some English paragraphs, reworded
            paras = [p for p in paras if len(re.findall(r"[\u3040-\u9fff]", p)) > 0.3 * len(p)]
        paras = paras[:20]
        got = st.process(_table(paras)).kept.column("language_id_lang").to_pylist()
        assert len(got) >= 5 and sum(g == code for g in got) >= 0.85 * len(got), (lang, got)


def test_language_id_low_confidence_and_no_letters():
    st = LanguageId({"min_confidence": 0.99})
    st.setup()
    out = st.process(_table(["1234 5678 ---", "ok", LANG_SAMPLES["de"] * 3]))
    reasons = dict(zip(out.dropped.column("id").to_pylist(), out.dropped.column("reason").to_pylist(),
                       strict=True))
    assert reasons["d0"] == "low_confidence"
    assert "d2" not in reasons
    assert out.kept.column("language_id_lang").to_pylist() == ["de"]


def test_language_id_rejects_unknown_codes_before_reading_data():
    with pytest.raises(ValueError, match="keep: \\['xx'\\]"):
        LanguageId({"keep": ["xx"]}).check(".")


# ---- pii -----------------------------------------------------------------------------------

def test_luhn_and_iban_checks():
    assert luhn_ok("4111111111111111") and luhn_ok("5500005555555559")
    assert not luhn_ok("4111111111111121")
    assert iban_ok("GB82WEST12345698765432") and iban_ok("FR14 2004 1010 0505 0001 3M02 606")
    assert not iban_ok("GB82WEST12345698765433")


PII_TEXT = (
    "Kontakt: müller@mühle.de oder +49 30 901820. "
    "Login https://ada:hunter2@mill.example.org/login?next=/home&mail=ada.l@mill.example.org "
    "from 192.168.10.20 or 2001:db8:85a3::8a2e:370:7334. Version 1.2.3.4.5 stays, 12:30:45 too. "
    "Karte 4111 1111 1111 1111, nicht 4111 1111 1111 1112. IBAN DE89 3704 0044 0532 0130 00. "
    "AWS AKIAIOSFODNN7EXAMPLE; password = 'Gr1ndst0ne!'; 電話 03-1234-5678."
)
ORIGINALS = ["müller@mühle.de", "+49 30 901820", "hunter2", "ada.l@mill.example.org",
             "192.168.10.20", "2001:db8:85a3::8a2e:370:7334", "4111 1111 1111 1111",
             "DE89 3704 0044 0532 0130 00", "AKIAIOSFODNN7EXAMPLE", "Gr1ndst0ne!", "03-1234-5678"]


def test_pii_redacts_every_type_with_typed_placeholders():
    out = Pii().process(_table([PII_TEXT]))
    text = out.kept.column("text")[0].as_py()
    for value in ORIGINALS:
        assert value not in text
    counts = out.kept.column("pii_counts")[0].as_py()
    assert counts == {"secret": 2, "email": 3, "iban": 1, "credit_card": 1, "ip_address": 2,
                      "phone": 2}
    # false friends stay: a version number, a time, a card number failing Luhn
    for kept in ("1.2.3.4.5", "12:30:45", "4111 1111 1111 1112"):
        assert kept in text
    assert "<EMAIL>" in text and "<IBAN>" in text and "<SECRET>" in text


def test_pii_drop_detail_never_holds_the_values():
    st = Pii({"max_redactions": 1, "placeholder": "[{type}]"})
    out = st.process(_table([PII_TEXT, "nothing personal here"]))
    assert out.kept.column("text").to_pylist() == ["nothing personal here"]
    row = json.dumps(out.dropped.to_pylist())
    assert "too_much_pii" in row
    for value in ORIGINALS:
        assert value not in row


def test_pii_types_subset_and_validation():
    out = Pii({"types": ["email"]}).process(_table(["a@b.example and 10.0.0.1"]))
    assert out.kept.column("text").to_pylist() == ["<EMAIL> and 10.0.0.1"]
    with pytest.raises(ValidationError, match="types"):
        Pii({"types": ["passport"]})


# ---- decontaminate -------------------------------------------------------------------------

def _eval_files(tmp_path: Path) -> dict[str, Path]:
    paras = _debian("fr", 6)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": p, "choices": ["a", "b"]}) + "\n"
                          for p in paras[:3]))
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": paras[3:5]}), other)
    return {"qa": qa, "other": other, "paras": paras}


def test_decontaminate_finds_ngrams_across_line_breaks_case_and_punctuation(tmp_path):
    ev = _eval_files(tmp_path)
    paras = ev["paras"]
    words = paras[1].split()
    # 14 words of an eval item, re-cased, re-punctuated and wrapped over lines
    leaked = "Intro.\n" + "\n".join(w.upper() + ("," if i % 3 == 0 else "")
                                    for i, w in enumerate(words[5:19])) + "\nfin."
    clean = _debian("de", 1)[0]
    st = Decontaminate({"eval_sets": [{"name": "qa", "path": str(ev["qa"]), "fields": ["question"]},
                                      {"name": "other", "path": str(ev["other"])}],
                        "cache_dir": str(tmp_path / "cache")})
    st.check(".")
    st.setup()
    out = st.process(_table([leaked, clean, paras[4], paras[5]]))
    reasons = dict(zip(out.dropped.column("id").to_pylist(), out.dropped.column("reason").to_pylist(),
                       strict=True))
    assert reasons == {"d0": "contaminated_qa", "d2": "contaminated_other"}
    assert out.kept.column("id").to_pylist() == ["d1", "d3"]
    # 12 shared words are not 13
    short = " ".join(normalize_for_overlap(paras[1])[5:17])
    assert st.process(_table([short])).num_dropped == 0
    # the table was cached and a second stage maps it without rebuilding
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_decontaminate_flag_mode_counts_and_short_items(tmp_path):
    ev = tmp_path / "short.jsonl"
    ev.write_text(json.dumps({"text": "what does the miller grind every day"}) + "\n"
                  + json.dumps({"text": "too short"}) + "\n")
    st = Decontaminate({"eval_sets": [{"name": "s", "path": str(ev)}], "mode": "flag",
                        "n": 13, "min_words": 5, "cache_dir": str(tmp_path / "c")})
    st.setup()
    out = st.process(_table(["Tell me: What does the Miller grind, every day?", "too short"]))
    assert out.num_dropped == 0
    assert out.kept.column("decontaminate_sets").to_pylist() == [["s"], []]
    assert out.kept.column("decontaminate_ngrams").to_pylist() == [1, 0]


def test_decontaminate_config_errors(tmp_path):
    with pytest.raises(ValidationError, match="min_words"):
        Decontaminate({"eval_sets": [{"name": "a", "path": "x.jsonl"}], "n": 5, "min_words": 8})
    with pytest.raises(ValueError, match="eval_sets\\[0\\].path"):
        Decontaminate({"eval_sets": [{"name": "a", "path": str(tmp_path / "none.jsonl")}]}).check(".")


# ---- url_filter ----------------------------------------------------------------------------

def test_url_filter_lists_words_and_subdomains(tmp_path):
    blocks = tmp_path / "blocked.txt"
    blocks.write_text("# ad farms\nspam.example\nwww.casino.test\n")
    f = UrlFilter({"block_domains_files": [str(blocks)], "block_urls": ["https://ok.org/bad"],
                   "allow_domains": ["good.spam.example"], "banned_words": ["porn"],
                   "soft_banned_words": ["free", "win", "prize"], "banned_subwords": ["viagra"]})
    f.check(".")
    f.setup()
    urls = ["https://news.spam.example/x", "http://CASINO.test:8080/", "https://ok.org/bad",
            "https://ok.org/porn-pics", "https://ok.org/free-prize", "https://ok.org/buyViagraNow",
            "https://good.spam.example/", "https://ok.org/free", "not a url", None,
            "https://bücher.example/straße"]
    out = f.process(pa.table({"id": [str(i) for i in range(len(urls))], "url": urls}))
    assert out.dropped.column("reason").to_pylist() == [
        "blocked_domain", "blocked_domain", "blocked_url", "banned_word", "soft_banned_words",
        "banned_subword", "no_url", "no_url"]
    assert out.kept.column("id").to_pylist() == ["6", "7", "10"]


def test_url_filter_allow_only_and_missing_files(tmp_path):
    f = UrlFilter({"allow_domains": ["debian.org"], "allow_only": True, "missing_url": "keep"})
    f.setup()
    out = f.process(pa.table({"id": ["a", "b", "c"],
                              "url": ["https://wiki.debian.org/", "https://evil.org", None]}))
    assert out.kept.column("id").to_pylist() == ["a", "c"]
    assert out.dropped.column("reason").to_pylist() == ["not_allowed"]
    with pytest.raises(ValueError, match="block_domains_files"):
        UrlFilter({"block_domains_files": [str(tmp_path / "nope.txt")]}).check(".")


# ---- filter (expressions) ------------------------------------------------------------------

def test_expression_filter_reports_the_failing_clause():
    f = ExpressionFilter({"expr": "score >= 0.3 and (lang in ['de', 'fr'] or len(text) > 40) "
                                  "and words is not null"})
    batch = pa.table({"id": list("abcd"), "text": ["kurz", "x" * 50, "court", "lang genug"],
                      "score": [0.9, 0.5, 0.1, 0.8], "lang": ["de", "en", "fr", "de"],
                      "words": [1, 2, 3, None]})
    out = f.process(batch)
    assert out.kept.column("id").to_pylist() == ["a", "b"]
    assert out.dropped.column("reason").to_pylist() == [
        "score >= 0.3", "words is not null"]
    assert f.input_columns() == ("lang", "score", "text", "words")


@pytest.mark.parametrize("expr", ["__import__('os').system('true') == 0", "score >=",
                                  "score > 1 ; drop", "open(text) > 1", "score.real > 0",
                                  "lambda: 1", ""])
def test_expression_filter_refuses_what_is_not_in_the_grammar(expr):
    with pytest.raises((ValidationError, ExpressionError)):
        ExpressionFilter({"expr": expr})


def test_expression_filter_nulls_fail_the_clause():
    out = ExpressionFilter({"expr": "score > 0"}).process(
        pa.table({"id": ["a", "b"], "score": pa.array([None, 1.0], pa.float64())}))
    assert out.kept.column("id").to_pylist() == ["b"]


# ---- Gopher repetition, C4, FineWeb --------------------------------------------------------

def test_gopher_repetition_measures_follow_the_definitions():
    words = "a b c a b c a b c d".split()
    # top 3-gram "a b c" occurs 3 times, 5 characters each
    assert top_ngram_chars(words, 3) == 15
    # duplicate 2-grams: ab bc ca AB(dup, +2, jump) CA(dup at i=5? no: ca seen) ...
    assert duplicate_ngram_chars(words, 2) == 2 + 2 + 2
    assert duplicate_ngram_chars("x y z".split(), 5) == 0


@pytest.mark.parametrize("text, reason", [
    ("para one here\n\npara one here\n\npara two", "dup_para_frac"),
    ("a line\nb line\nc line\nd line\ne line\nf line\nthe long repeated line of words\n"
     "the long repeated line of words\nthe long repeated line of words", "dup_line_char_frac"),
    ("the mill " * 40, "top_2_gram"),
])
def test_gopher_repetition_reasons(text, reason):
    p = GopherRepetitionParams()
    assert repetition_reason(text, p)[0] == reason
    out = GopherRepetition().process(_table([text]))
    assert out.dropped.column("reason").to_pylist() == [reason]


def test_gopher_repetition_keeps_real_prose_in_several_languages():
    texts = _debian("en", 3) + _debian("de", 3) + _debian("ja", 3)
    out = GopherRepetition().process(_table(texts))
    assert out.num_dropped == 0, out.dropped.to_pylist()


def test_split_words_treats_cjk_characters_as_words():
    assert split_words("Debian 软件包 管理") == ["Debian", "软", "件", "包", "管", "理"]
    assert split_words("no cjk here\tat all") == "no cjk here at all".split()


def test_c4_lines_rewrites_text_and_names_document_rules():
    good = ("The mill grinds grain every morning. The farmers bring their sacks by cart.\n"
            "Click here\n"
            "Enable JavaScript to view this page, it says.\n"
            "Read our privacy policy before you continue.\n"
            "Flour is sold in the market on Saturdays. Bread is baked on Sundays.\n"
            "Water turns the wheel [1]. Wind turns the sails [citation needed].")
    out = C4Lines().process(_table([good, good + "\nlorem ipsum dolor sit amet.",
                                     good + "\nThe config is {a: 1} here.", "Too short. Only two."]))
    assert out.dropped.column("reason").to_pylist() == ["lorem_ipsum", "curly_bracket",
                                                        "too_few_sentences"]
    text = out.kept.column("text")[0].as_py()
    assert text.splitlines() == [
        "The mill grinds grain every morning. The farmers bring their sacks by cart.",
        "Flour is sold in the market on Saturdays. Bread is baked on Sundays.",
        "Water turns the wheel . Wind turns the sails ."]
    assert out.kept.column("c4_lines_lines_removed").to_pylist() == [
        {"too_long_word": 0, "no_terminal_punct": 1, "too_few_words": 0, "javascript": 1,
         "policy": 1}]


def test_c4_lines_on_french_prose_keeps_sentences():
    paras = _debian("fr", 10)
    text = "\n".join(paras)
    out = C4Lines().process(_table([text]))
    assert out.num_dropped == 0
    assert len(out.kept.column("text")[0].as_py()) > 0.5 * len(text)


def test_fineweb_lines_reasons():
    prose = "\n".join(_debian("en", 4))
    menu = "\n".join(["Home", "About", "Shop", "Blog", "Contact", prose[:200] + "."])
    dup = prose + "\n" + prose.splitlines()[0]
    listy = "\n".join(f"wholemeal-flour-from-the-valley-mill-number-{i} sold." for i in range(30))
    no_punct = "\n".join(p.rstrip(".!?") + " and more" for p in _debian("de", 10))
    out = FineWebLines().process(_table([prose, menu, dup, listy, no_punct, "\n\n"]))
    assert out.kept.column("id").to_pylist() == ["d0"]
    assert out.dropped.column("reason").to_pylist() == [
        "short_line_ratio", "char_dup_ratio", "list_ratio", "line_punct_ratio", "empty"]


def test_fineweb_counts_cjk_terminal_punctuation():
    zh = "\n".join(p for p in _debian("zh-cn", 8))
    out = FineWebLines().process(_table([zh]))
    assert out.num_dropped == 0 or out.dropped.column("reason").to_pylist() != ["line_punct_ratio"]


def test_language_id_gives_langids_own_answers():
    st = LanguageId({"max_chars": 100_000})
    st.setup()
    texts = list(LANG_SAMPLES.values()) + _debian("it", 10) + _debian("pt", 10)
    langs, conf = st.classify(texts)
    want = [st._ident.classify(t) for t in texts]
    assert langs == [w[0] for w in want]
    assert conf.tolist() == pytest.approx([w[1] for w in want], rel=1e-12)


def test_language_feeds_mix_as_its_domain(tmp_path):
    from gristmill.pipeline.recipe import check_recipe, parse_recipe
    from gristmill.pipeline.runner import run_recipe

    docs = [{"id": f"{lang}{i}", "text": p} for lang in ("en", "de", "fr")
            for i, p in enumerate(_debian(lang, 30 if lang == "en" else 10))]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    body = {"sources": [{"path": str(src)}],
            "stages": [{"stage": "language_id", "languages": ["en", "de", "fr"]},
                       {"stage": "mix", "domain_column": "language_id_lang", "sampler": "weights",
                        "weights": {"en": 1, "de": 1, "fr": 1}, "budget_tokens": 4000,
                        "max_epochs": 1}],
            "output": {"path": str(tmp_path / "out")}, "engine": {"batch_size": 16}}
    recipe = parse_recipe(body)
    check_recipe(recipe)
    manifest = run_recipe(recipe, progress=False, report=False)
    import pyarrow.parquet as pq

    kept = pa.concat_tables([pq.read_table(tmp_path / "out" / s["path"])
                             for s in manifest["shards"]])
    counts = Counter(kept.column("language_id_lang").to_pylist())
    # English is 60% of the input; equal weights bring it near a third of the output
    assert set(counts) == {"en", "de", "fr"}
    assert counts["en"] < 0.5 * kept.num_rows


def test_decontaminate_table_is_the_same_in_small_chunks_and_sets_share_ngrams(tmp_path):
    paras = _debian("es", 5)
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[:3]))
    b.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[2:5]))
    sets = [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}]
    big = Decontaminate({"eval_sets": sets, "cache_dir": str(tmp_path / "c1")}).build_table()
    small = Decontaminate({"eval_sets": sets, "chunk_rows": 1,
                           "cache_dir": str(tmp_path / "c2")}).build_table()
    assert big[0].tolist() == small[0].tolist() and big[1].tolist() == small[1].tolist()
    assert big[2] == [13]
    st = Decontaminate({"eval_sets": sets, "cache_dir": str(tmp_path / "c1")})
    st.setup()
    out = st.process(_table([paras[2], paras[4]]))
    assert out.dropped.column("reason").to_pylist() == ["contaminated_a", "contaminated_b"]
    assert out.dropped.column("detail").to_pylist()[0].startswith("sets=a,b ")


# Texts whose words carry no punctuation (where spaCy and whitespace agree) and the
# Gopher repetition measures DataTrove 0.10.1 gives them, printed by
# `benchmarks/peer_stages.py DOCS OUT --stages gopher_measures` in the peers venv.
DATATROVE_CASES = {
    "top2": " ".join(["wind mill"] * 30 + ["river"] * 5),
    "top3": " ".join(["the wind blows"] * 12 + [f"w{i}" for i in range(40)]),
    "dup5": " ".join(["one two three four five"] * 4 + [f"x{i}" for i in range(60)]),
    "dup10": " ".join([f"a{i}" for i in range(10)] * 2 + [f"y{i}" for i in range(120)]),
    "clean": " ".join(f"word{i}" for i in range(200)),
    "list": "\n".join([f"longlongword{i} x" for i in range(20)]),
    "para_dup": "the mill turns\n\nthe mill turns\n\nthe wheel is wet and the river runs fast",
    "line_dup_chars": ("a b c\nd e f\n" + "grain flows into the old stone mill\n" * 3
                       + "g h i\nj k l\nm n o\np q r\ns t u\nv w x"),
}
DATATROVE_MEASURES = {
    'top2': {'words': 65, 'top2': 270, 'top3': 406, 'top4': 551, 'dup5': 220, 'dup6': 216, 'dup7': 224, 'dup8': 224, 'dup9': 216, 'dup10': 200, 'para': [0, 0], 'line': [0, 0]},
    'top3': {'words': 76, 'top2': 96, 'top3': 168, 'top4': 198, 'dup5': 120, 'dup6': 120, 'dup7': 111, 'dup8': 127, 'dup9': 108, 'dup10': 120, 'para': [0, 0], 'line': [0, 0]},
    'dup5': {'words': 80, 'top2': 28, 'top3': 52, 'top4': 72, 'dup5': 57, 'dup6': 44, 'dup7': 53, 'dup8': 30, 'dup9': 34, 'dup10': 38, 'para': [0, 0], 'line': [0, 0]},
    'dup10': {'words': 140, 'top2': 10, 'top3': 16, 'top4': 22, 'dup5': 20, 'dup6': 12, 'dup7': 14, 'dup8': 16, 'dup9': 18, 'dup10': 20, 'para': [0, 0], 'line': [0, 0]},
    'clean': {'words': 200, 'top2': 11, 'top3': 17, 'top4': 23, 'dup5': 0, 'dup6': 0, 'dup7': 0, 'dup8': 0, 'dup9': 0, 'dup10': 0, 'para': [0, 0], 'line': [0, 0]},
    'list': {'words': 40, 'top2': 15, 'top3': 29, 'top4': 31, 'dup5': 0, 'dup6': 0, 'dup7': 0, 'dup8': 0, 'dup9': 0, 'dup10': 0, 'para': [0, 0], 'line': [0, 0]},
    'para_dup': {'words': 15, 'top2': 16, 'top3': 28, 'top4': 36, 'dup5': 0, 'dup6': 0, 'dup7': 0, 'dup8': 0, 'dup9': 0, 'dup10': 0, 'para': [1, 14], 'line': [1, 14]},
    'line_dup_chars': {'words': 45, 'top2': 33, 'top3': 48, 'top4': 60, 'dup5': 43, 'dup6': 49, 'dup7': 58, 'dup8': 34, 'dup9': 39, 'dup10': 43, 'para': [0, 0], 'line': [2, 70]},
}


@pytest.mark.parametrize("case", list(DATATROVE_CASES))
def test_gopher_repetition_measures_match_datatrove(case):
    text = DATATROVE_CASES[case]
    words = split_words(text)
    got = {"words": len(words), **{f"top{n}": top_ngram_chars(words, n) for n in (2, 3, 4)},
           **{f"dup{n}": duplicate_ngram_chars(words, n) for n in range(5, 11)},
           "para": list(find_duplicates(re.split(r"\n{2,}", text.strip()))),
           "line": list(find_duplicates(re.split("\n+", text)))}
    assert got == DATATROVE_MEASURES[case]


# Line-rule cases and what DataTrove 0.10.1's FineWebQualityFilter and C4QualityFilter
# decide (and C4's rewritten text), printed by
# `benchmarks/peer_stages.py DOCS OUT --stages fineweb_lines c4_lines` in the peers venv.
FINEWEB_CASES = {
    "prose": ("\n".join(f"Sentence {i} says something new about the valley and its farms."
                        for i in range(12)), "keep"),
    "menu": ("\n".join(["Home", "News", "Shop", "Contact",
                        "Grain prices rose again this week in the valley."]), "short_line_ratio"),
    "dup": ("\n".join(["The mill grinds grain into flour every day of the week."] * 2
                      + [f"Line {i} tells a new story of the river and the mill."
                         for i in range(10)]), "char_dup_ratio"),
    "few_punct": ("\n".join([f"line {i} of the ledger lists names and sacks of grain"
                             for i in range(10)] + ["The end."]), "line_punct_ratio"),
    "zero_punct": ("\n".join(f"entry {i} without any ending mark at all here" for i in range(8)),
                   "line_punct_ratio"),
}
C4_CASES = {
    "mixed": ("The mill grinds grain every morning. The farmers bring their sacks by cart.\n"
              "Click here\nEnable JavaScript to view this page, it says.\n"
              "Read our privacy policy before you continue.\n"
              "Flour is sold in the market on Saturdays. Bread is baked on Sundays.\n"
              "Water turns the wheel [1]. Wind turns the sails [citation needed].",
              "keep", "The mill grinds grain every morning. The farmers bring their sacks by "
              "cart.\nFlour is sold in the market on Saturdays. Bread is baked on Sundays.\n"
              "Water turns the wheel . Wind turns the sails ."),
    "lorem": ("The mill grinds grain every morning today.\nLorem ipsum dolor sit amet, it says.",
              "lorem_ipsum", None),
    "curly": ("The mill grinds grain every morning today.\nThe config is {a: 1} here.",
              "curly_bracket", None),
    "short": ("One line only. Two sentences here.", "too_few_sentences", None),
    "ellipsis": ("The mill grinds grain every morning. It rains. It pours. The end is near. "
                 "Really near.\nAnd then it stopped...\nA line without end", "keep",
                 "The mill grinds grain every morning. It rains. It pours. The end is near. "
                 "Really near."),
}


def test_fineweb_and_c4_line_rules_decide_as_datatrove():
    texts = [t for t, _ in FINEWEB_CASES.values()]
    out = FineWebLines().process(_table(texts))
    got = {f"d{i}": "keep" for i in range(len(texts))}
    got.update(zip(out.dropped.column("id").to_pylist(), out.dropped.column("reason").to_pylist(),
                   strict=True))
    assert list(got.values()) == [want for _, want in FINEWEB_CASES.values()]
    texts = [t for t, _, _ in C4_CASES.values()]
    out = C4Lines().process(_table(texts))
    reasons = dict(zip(out.dropped.column("id").to_pylist(),
                       out.dropped.column("reason").to_pylist(), strict=True))
    kept = dict(zip(out.kept.column("id").to_pylist(), out.kept.column("text").to_pylist(),
                    strict=True))
    for i, (_, want_reason, want_text) in enumerate(C4_CASES.values()):
        assert reasons.get(f"d{i}", "keep") == want_reason
        assert kept.get(f"d{i}") == want_text
