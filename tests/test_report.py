"""The run report (parsed HTML), sample records, per-stage time, inspect and diff,
on real runs of the local engine."""

from __future__ import annotations

import json
import random
import re
from html.parser import HTMLParser

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_text, write_jsonl, write_recipe

from gristmill.cli.main import main
from gristmill.pipeline.inspection import diff_outputs
from gristmill.pipeline.report import diff_words
from gristmill.pipeline.runner import run_recipe
from gristmill.pipeline.stage import KEY_POS_BITS, KEY_POS_MASK
from gristmill.selectors.grape import score_margins

HOSTILE = "<script>alert('x')</script> & <b>bold</b>"


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        out = []
        for n in self.iter():
            if tag is not None and n.tag != tag:
                continue
            if all(n.attrs.get(k.rstrip("_").replace("_", "-")) == v if k != "class_"
                   else v in n.classes() for k, v in attrs.items()):
                out.append(n)
        return out

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


VOID = {"meta", "br", "img", "input", "link", "hr", "rect", "line", "polyline"}


class Tree(HTMLParser):
    """A small DOM from the standard library's parser (SVG's empty elements too)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.root = Node("#root", {}, None)
        self.cur = self.root
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, dict(attrs), self.cur))

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One real run with a scorer, filters, exact dedup, a top fraction, a Cooldown
    mixture and a record whose text is HTML."""
    tmp = tmp_path_factory.mktemp("report")
    rng = random.Random(5)
    dups = [make_text(rng, 90) for _ in range(4)]
    for f in range(4):
        recs = []
        for i in range(40):
            text = rng.choice(dups) if rng.random() < 0.15 else make_text(rng, rng.randint(5, 200))
            recs.append({"id": f"f{f}-{i}", "text": text, "domain": "ab"[f % 2]})
        if f == 0:
            recs.append({"id": "hostile", "text": HTML_TEXT, "domain": "a"})
        write_jsonl(tmp / "corpus" / f"part-{f}.jsonl", recs)
    recipe = write_recipe(
        tmp / "r.yaml", name="report", seed=1, sources=[{"path": str(tmp / "corpus")}],
        stages=[{"stage": "length_filter", "min_chars": 40},
                {"stage": "exact_dedup"},
                {"stage": "text_stats"},
                {"stage": "gopher", "min_words": 15},
                {"stage": "filter", "expr": "text_stats_alpha_fraction >= 0.75"},
                {"stage": "top_fraction", "column": "text_stats_words", "fraction": 0.7},
                {"stage": "mix", "sampler": "cooldown", "budget_tokens": 20_000,
                 "tokens_per_step": 1_000, "t_start": 5.0, "t_end": 1.0}],
        output={"path": str(tmp / "out"), "shard_size": "64KB", "write_dropped": True},
        engine={"kind": "local", "workers": 1, "batch_size": 32})
    manifest = run_recipe(recipe, progress=False)
    out = tmp / "out"
    html = (out / "report.html").read_text()
    return {"out": out, "manifest": manifest, "html": html, "tree": Tree(html).root,
            "stats": json.loads((out / "stats.json").read_text()), "tmp": tmp}


# dropped by gopher for its "..." (symbol_word_ratio), alone with that reason, so it is shown
HTML_TEXT = HOSTILE + "\n" + "\n".join(["river stone mill grain flour wheel water..."] * 6)


def _dropped(run) -> pa.Table:
    return pa.concat_tables([pq.read_table(run["out"] / f) for f in run["manifest"]["dropped"]])


def test_report_is_offline_and_small(run):
    tree, html = run["tree"], run["html"]
    assert not tree.find_all("script") and not tree.find_all("link")
    assert not tree.find_all("img") and not tree.find_all("iframe")
    for node in tree.iter():
        for attr in ("src", "href", "xlink:href", "srcset", "action"):
            value = node.attrs.get(attr) or ""
            assert not re.match(r"\s*(https?:)?//", value), (node.tag, attr, value)
    for style in tree.find_all("style"):
        assert "url(" not in style.text() and "@import" not in style.text()
    assert len(html.encode()) < 5_000_000


def test_funnel_has_counts_and_percent_per_stage_and_reason(run):
    counts = run["manifest"]["counts"]
    tree = run["tree"]
    for s in counts["stages"]:
        row = tree.find_all("tr", class_="stage", data_stage=s["stage"])
        assert len(row) == 1
        cells = [c.text() for c in row[0].find_all("td")]
        assert cells[2:5] == [f"{s['in']:,}", f"{s['kept']:,}", f"{s['dropped']:,}"]
        assert cells[5] == (f"{100 * s['dropped'] / s['in']:.1f}%" if s["in"] else "-")
        for reason, n in s["dropped_by_reason"].items():
            r = tree.find_all("tr", class_="reason", data_stage=s["stage"], data_reason=reason)
            rc = [c.text() for c in r[0].find_all("td")]
            assert rc[4] == f"{n:,}" and rc[5] == f"{100 * n / s['in']:.1f}%"


def test_time_per_stage_in_manifest_report_and_inspect(run, capsys):
    timings = {t["stage"]: t for t in run["manifest"]["timings"]["stages"]}
    stages = [s["stage"] for s in run["manifest"]["counts"]["stages"]]
    assert set(stages) | {"read", "write"} <= set(timings)
    for name in stages:
        t = timings[name]
        assert t["wall_s"] > 0 and t["cpu_s"] >= 0
        assert t["records_in"] == next(s["in"] for s in run["manifest"]["counts"]["stages"]
                                       if s["stage"] == name)
        assert t["records_per_s"] == pytest.approx(t["records_in"] / t["wall_s"], rel=1e-2)
    # a barrier stage has its tasks' half and the barrier itself
    assert {"summarize", "barrier", "apply"} <= set(timings["top_fraction"]["phases"])
    assert {"keys", "barrier", "apply"} <= set(timings["exact_dedup"]["phases"])
    rows = {tr.attrs["data-stage"]: [c.text() for c in tr.find_all("td")]
            for tr in run["tree"].find_all("section", id="timing")[0].find_all("tr")
            if "data-stage" in tr.attrs}
    assert float(rows["gopher"][1]) == pytest.approx(timings["gopher"]["wall_s"], abs=1e-3)
    assert main(["inspect", str(run["out"])]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"gopher\s+wall\s+[\d.]+\s+CPU\s+[\d.]+\s+[\d,]+ rec/s", printed)


def test_score_distribution_with_the_top_fraction_threshold(run):
    fig = run["tree"].find_all("figure", data_column="text_stats_words")[0]
    series = fig.find_all("polyline", class_="series")
    assert len(series) == 2  # as scored, in the output
    thr = json.loads((run["out"] / "artifacts/top_fraction/threshold.json").read_text())
    lines = fig.find_all("g", class_="threshold")
    assert [float(g.attrs["data-value"]) for g in lines] == [thr["threshold"]]
    # normalised: each curve's bar heights are shares; the sample holds the scored rows
    col = run["stats"]["columns"]["text_stats_words"]
    assert col["stage"] == "text_stats"
    scored, kept = col["scored"]["v"], col["kept"]["v"]
    assert len(scored) == next(s["kept"] for s in run["manifest"]["counts"]["stages"]
                               if s["stage"] == "text_stats")  # under the reservoir size
    # the output has only records at or above the cut (a mixture repeats some)
    assert min(kept) >= thr["threshold"]


def test_filter_expression_threshold_is_drawn_on_its_column(run):
    fig = run["tree"].find_all("figure", data_column="text_stats_alpha_fraction")[0]
    lines = fig.find_all("g", class_="threshold")
    assert [float(g.attrs["data-value"]) for g in lines] == [0.75]
    assert "filter: >= 0.75" in lines[0].text()


def test_mixture_section_has_tokens_weights_and_cooldown_schedule(run):
    mix = json.loads((run["out"] / "artifacts/mix/mixture.json").read_text())
    sched = json.loads((run["out"] / "artifacts/mix/schedule.json").read_text())
    div = run["tree"].find_all("div", class_="mix", data_stage="mix")[0]
    for d, info in mix["domains"].items():
        cells = [c.text() for c in div.find_all("tr", data_domain=d)[0].find_all("td")]
        assert cells[1] == f"{info['tokens_before']:,}" and cells[2] == f"{info['tokens_after']:,}"
        assert cells[4] == f"{info['weight']:.3f}"
    schedule = div.find_all("div", class_="schedule")[0]
    assert int(schedule.attrs["data-segments"]) == len(sched["segments"]) > 1
    assert len(schedule.find_all("polyline", class_="series")) == len(sched["domains"])


def test_duplicate_pairs_show_survivor_and_member(run):
    pairs = run["tree"].find_all("div", class_="pair", data_stage="exact_dedup")
    assert pairs
    for pair in pairs:
        survivor = pair.find_all("div", class_="survivor")[0]
        member = pair.find_all("div", class_="member")[0]
        # the member's detail names the survivor's input position
        m = re.search(r"survivor=(\d+):(\d+)", member.text())
        s_where = survivor.find_all("span", class_="where")[0].text()
        files = {f["index"]: f["path"] for f in run["manifest"]["files"]}
        assert s_where == f"{files[int(m.group(1))]}, line {m.group(2)}"


def test_diff_words_marks_only_changed_words():
    a, b = diff_words("the mill  turns\tslowly", "the wheel turns slowly")
    assert a == 'the <mark class="diff">mill</mark>  turns\tslowly'
    assert b == 'the <mark class="diff">wheel</mark> turns slowly'
    assert diff_words("<a>", "<b>")[0] == '&lt;<mark class="diff">a</mark>&gt;'


def test_samples_per_stage_and_reason_are_escaped_and_located(run):
    tree, dropped = run["tree"], _dropped(run)
    by_key = {k: (st, r) for k, st, r in zip(dropped.column("_key").to_pylist(),
                                             dropped.column("stage").to_pylist(),
                                             dropped.column("reason").to_pylist(), strict=True)}
    files = {f["index"]: f["path"] for f in run["manifest"]["files"]}
    groups = tree.find_all("details", class_="sample")
    fates = {(g.attrs["data-stage"], g.attrs.get("data-reason") or g.attrs["data-fate"])
             for g in groups}
    for s in run["manifest"]["counts"]["stages"]:
        for reason in s["dropped_by_reason"]:
            assert (s["stage"], reason) in fates
        if s["kept"]:
            assert (s["stage"], "kept") in fates
    for g in groups:
        for art in g.find_all("article", class_="record"):
            key = int(art.attrs["data-key"])
            where = art.find_all("span", class_="where")[0].text()
            assert where == f"{files[key >> KEY_POS_BITS]}, line {key & KEY_POS_MASK}"
            if g.attrs["data-fate"] == "dropped":
                assert by_key[key] == (g.attrs["data-stage"], g.attrs["data-reason"])
    # the HTML record is shown as text, never as markup
    assert fates >= {("gopher", "symbol_word_ratio")}
    assert HOSTILE in run["tree"].text()
    assert not tree.find_all("script") and not any(n.tag == "b" and n.text() == "bold"
                                                  for n in tree.iter())


def test_samples_are_deterministic_bottom_k_of_the_row_key_hash(run):
    from gristmill.pipeline.hashing import mix64
    from gristmill.pipeline.observe import SAMPLE_SALT

    dropped = _dropped(run)
    gopher = dropped.filter(pa.compute.equal(dropped.column("stage"), "gopher"))
    for reason, recs in run["stats"]["samples"]["gopher"]["dropped"].items():
        keys = [k for k, r in zip(gopher.column("_key").to_pylist(),
                                  gopher.column("reason").to_pylist(), strict=True) if r == reason]
        p = mix64(pa.array(keys, pa.uint64()).to_numpy(), 1, SAMPLE_SALT)
        expected = [k for _, k in sorted(zip(p.tolist(), keys, strict=True))][:len(recs)]
        assert [r["key"] for r in recs] == expected


def test_inspect_sample_prints_records_with_their_fate(run, capsys):
    assert main(["inspect", str(run["out"]), "--sample", "2", "--stage", "gopher",
                 "--reason", "word_count"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "== gopher · dropped: word_count"
    ids = [re.match(r"-- id (\S+)", line).group(1) for line in printed if line.startswith("--")]
    dropped = _dropped(run)
    wc = {i for i, st, r in zip(dropped.column("id").to_pylist(),
                                dropped.column("stage").to_pylist(),
                                dropped.column("reason").to_pylist(), strict=True)
          if st == "gopher" and r == "word_count"}
    assert len(ids) == 2 and set(ids) <= wc
    assert main(["inspect", str(run["out"]), "--sample", "1", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert {(s["stage"], s["fate"]) for s in body["samples"]} >= {("gopher", "dropped"),
                                                                  ("mix", "kept")}
    assert body["timings"]["stages"] and body["counts"] == run["manifest"]["counts"]
    assert main(["inspect", str(run["out"]), "--sample", "1", "--reason", "nope"]) == 2
    assert "reasons: " in capsys.readouterr().err


def test_diff_groups_records_by_the_stage_and_reason_that_dropped_them(run, tmp_path, capsys):
    tmp = run["tmp"]
    common = {"sources": [{"path": str(tmp / "corpus")}], "seed": 1,
              "engine": {"kind": "local", "workers": 1, "batch_size": 32}}
    a = write_recipe(tmp_path / "a.yaml", name="a", stages=[{"stage": "text_stats"}],
                     output={"path": str(tmp_path / "a"), "write_dropped": True}, **common)
    b = write_recipe(tmp_path / "b.yaml", name="b",
                     stages=[{"stage": "text_stats"}, {"stage": "gopher", "min_words": 30}],
                     output={"path": str(tmp_path / "b"), "write_dropped": True}, **common)
    ma, mb = run_recipe(a, progress=False), run_recipe(b, progress=False)
    d = diff_outputs(tmp_path / "a", tmp_path / "b")
    gopher = mb["counts"]["stages"][1]
    assert d["only_b"]["count"] == 0 and d["kept_by_both"] == mb["counts"]["kept"]
    assert d["only_a"]["count"] == ma["counts"]["kept"] - mb["counts"]["kept"] == gopher["dropped"]
    assert d["only_a"]["by_stage_reason"] == {f"gopher: {r}": n for r, n in
                                              sorted(gopher["dropped_by_reason"].items(),
                                                     key=lambda kv: -kv[1])}
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert f"only by A: {gopher['dropped']:,}" in printed and "gopher: word_count" in printed


def test_pii_redacted_values_never_reach_samples_or_report(tmp_path):
    emails = [f"person{i}@example.org" for i in range(30)]
    rng = random.Random(3)
    recs = [{"id": f"r{i}", "text": f"write to {emails[i]} " + make_text(rng, rng.choice([3, 40]))}
            for i in range(30)]
    write_jsonl(tmp_path / "in" / "a.jsonl", recs)
    # length_filter drops records *before* pii runs, on the other side of a barrier: their
    # samples must be redacted too
    recipe = write_recipe(tmp_path / "r.yaml", name="pii", seed=0,
                          sources=[{"path": str(tmp_path / "in")}],
                          stages=[{"stage": "length_filter", "min_chars": 120},
                                  {"stage": "exact_dedup"},  # pii runs in a later segment
                                  {"stage": "pii", "max_redactions": 5},
                                  {"stage": "text_stats"}],
                          output={"path": str(tmp_path / "out"), "write_dropped": True})
    m = run_recipe(recipe, progress=False)
    assert m["counts"]["stages"][0]["dropped"] > 0 and m["counts"]["stages"][0]["kept"] > 0
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    samples = stats["samples"]["length_filter"]
    assert samples["dropped"]["too_short"] and samples["kept"]
    assert all("<EMAIL>" in r["text"] for r in samples["dropped"]["too_short"] + samples["kept"])
    for path in (out / "stats.json", out / "report.html", out / "manifest.json"):
        body = path.read_text()
        assert not any(e in body for e in emails), path


def test_grape_margin_is_best_minus_second_best():
    import numpy as np

    m = score_margins([np.array([-2.0, -6.0, -1.0]), np.array([-1.0]), np.array([])],
                      [np.array([1, 10, 1]), np.array([2]), np.array([])])
    assert m[0] == pytest.approx(0.4) and np.isnan(m[1]) and np.isnan(m[2])


def test_grape_section_shows_winning_sources_and_margins(tmp_path):
    import numpy as np

    from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer

    rng = random.Random(2)
    styles = {"terse": "{a}", "plain": "The answer is {a}.", "loud": "ANSWER: {a}!!"}
    recs = []
    for i in range(12):
        a = "".join(rng.choice("abcdefgh") for _ in range(3))
        names = rng.sample(sorted(styles), k=rng.choice([2, 3]))
        recs.append({"id": f"q{i}", "prompt": f"Q: Repeat {a}.",
                     "responses": [styles[n].format(a=a) for n in names],
                     "response_sources": names})
    model = tmp_path / "base"
    build_tokenizer([r["prompt"] + "\n" + x for r in recs for x in r["responses"]] * 3,
                    vocab_size=300, path=model)
    build_tiny_lm(model, model, n_layer=1, n_embd=32, n_head=2, n_positions=64)
    write_jsonl(tmp_path / "sft.jsonl", recs)
    recipe = write_recipe(tmp_path / "g.yaml", name="grape", seed=0,
                          sources=[{"path": str(tmp_path / "sft.jsonl"), "kind": "sft"}],
                          stages=[{"stage": "lm_likelihood", "name": "base_lm",
                                   "model": str(model)},
                                  {"stage": "grape", "scores_from": "base_lm"}],
                          output={"path": str(tmp_path / "out")})
    run_recipe(recipe, progress=False)
    kept = pq.read_table(tmp_path / "out" / "shards").to_pylist()
    tree = Tree((tmp_path / "out" / "report.html").read_text()).root
    div = tree.find_all("div", class_="grape", data_stage="grape")[0]
    won = {}
    for r in kept:
        won[r["grape_source"]] = won.get(r["grape_source"], 0) + 1
    shown = {tr.attrs["data-source"]: int(tr.find_all("td")[1].text())
             for tr in div.find_all("tr") if "data-source" in tr.attrs}
    assert shown == won
    for r in kept:
        s = np.sort(np.asarray(r["base_lm_response_logprob"]) /
                    np.asarray(r["base_lm_response_tokens"]))
        assert r["grape_margin"] == pytest.approx(s[-1] - s[-2])
    margins = div.find_all("div", class_="margins")[0]
    assert len(margins.find_all("polyline", class_="series")) == 1
    median = float(re.search(r"Median margin ([-\d.e]+)", margins.text()).group(1))
    assert median == pytest.approx(np.median([r["grape_margin"] for r in kept]), rel=1e-3)
