"""The web filters: docs/s per core on real text, and DataTrove on the same documents.

Documents are the Debian Reference in eight languages (``apt-get install
debian-reference-{de,en,es,fr,it,ja,pt,zh-cn}``), cut into documents of
about ``--doc-chars`` characters at blank lines, as the text files have them:
prose, command listings, ASCII tables, link lists. Every document gets a URL
(a few hosts, one of them blocked). The ``decontaminate`` evaluation set is
200 English paragraphs, so some documents are contaminated.

Each stage runs alone on every document (not chained), in this process, in
batches of 512; the figure is documents per CPU-second of ``process`` (after
``setup``, whose time is printed separately), which is docs/s per core and
less sensitive than wall time to other jobs on a shared machine.

``--peers`` installs DataTrove (with spaCy) and lingua into a separate
virtualenv under ``benchmarks/_work/`` (never into gristmill's), runs
``peer_stages.py`` there on the same documents and prints, per stage, the
speed ratio and how often the keep/drop decisions agree (and, for C4, the
kept text). DataTrove's ``PIIFormatter`` redacts only e-mail and IP
addresses, so the PII ratio is against gristmill's ``pii`` with
``types: [email, ip_address]``. ``--compare-langid`` measures langid (97
languages, and restricted to the eight) against lingua (75 languages) on
the labelled paragraphs of ``debian_reference.debian_paragraphs``.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_stages.py --docs 3000 --peers --compare-langid
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from debian_reference import LANGUAGES, PACKAGES, ROOT, debian_paragraphs  # noqa: E402

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / "_work" / "peers-venv"
PEER_PACKAGES = ["datatrove==0.10.1", "spacy>=3.7", "lingua-language-detector>=2.0"]
HOSTS = ["www.debian.org", "wiki.debian.org", "ads.spam.example", "mirror.example.org"]


def make_docs(n: int, doc_chars: int) -> list[dict]:
    docs = []
    for lang in LANGUAGES:
        path = ROOT / f"debian-reference.{lang}.txt.gz"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: apt-get install {PACKAGES}")
        blocks = re.split(r"\n\s*\n", gzip.decompress(path.read_bytes()).decode())
        cur: list[str] = []
        size = 0
        for b in blocks:
            cur.append(b.strip("\n"))
            size += len(b)
            if size >= doc_chars:
                docs.append({"lang": lang, "text": "\n\n".join(cur)})
                cur, size = [], 0
    # interleave the languages, then take n
    by_lang = {lang: [d for d in docs if d["lang"] == lang] for lang in LANGUAGES}
    mixed = [d for group in zip(*by_lang.values(), strict=False) for d in group]
    mixed = mixed[:n]
    for i, d in enumerate(mixed):
        d["id"] = f"doc{i}"
        d["url"] = f"https://{HOSTS[i % len(HOSTS)]}/doc/manuals/debian-reference/{i}.{d['lang']}.html"
    return mixed


def stage_specs(eval_path: Path, cache: Path) -> dict[str, dict]:
    return {
        "language_id": {},
        "pii": {},
        "pii_email_ip": {"types": ["email", "ip_address"]},
        "decontaminate": {"eval_sets": [{"name": "ref", "path": str(eval_path)}],
                          "cache_dir": str(cache)},
        "url_filter": {"block_domains": ["spam.example"], "banned_words": ["casino", "porn"],
                       "soft_banned_words": ["free", "win", "prize"]},
        "filter": {"expr": "len(text) > 500 and len(text) < 100000"},
        "gopher_repetition": {},
        "c4_lines": {},
        "fineweb_lines": {},
    }


def run_ours(docs: list[dict], specs: dict[str, dict]) -> dict[str, dict]:
    from gristmill.pipeline.registry import stage_class

    table = pa.table({"id": [d["id"] for d in docs], "text": [d["text"] for d in docs],
                      "url": [d["url"] for d in docs]})
    out = {}
    for name, params in specs.items():
        cls = stage_class("pii" if name.startswith("pii") else name)
        stage = cls(params)
        t0 = time.process_time()
        stage.setup()
        setup_s = time.process_time() - t0
        decisions: dict[str, str] = {d["id"]: "keep" for d in docs}
        texts: dict[str, str] = {}
        cpu = 0.0
        for start in range(0, table.num_rows, 512):
            batch = table.slice(start, 512)
            t0 = time.process_time()
            res = stage.process(batch)
            cpu += time.process_time() - t0
            for rid, reason in zip(res.dropped.column("id").to_pylist(),
                                   res.dropped.column("reason").to_pylist(), strict=True):
                decisions[rid] = reason
            texts.update(zip(res.kept.column("id").to_pylist(),
                             res.kept.column("text").to_pylist(), strict=True))
        out[name] = {"cpu_s": cpu, "setup_s": setup_s, "docs": len(docs),
                     "decisions": [decisions[d["id"]] for d in docs],
                     "texts": [texts.get(d["id"]) for d in docs]}
    return out


def ensure_peers() -> Path:
    py = PEERS_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    probe = subprocess.run([str(py), "-c", "import datatrove, spacy, lingua"],
                           capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return py


def run_peers(docs: list[dict], stages: list[str], work: Path) -> dict[str, dict]:
    py = ensure_peers()
    src = work / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    dst = work / "peers.json"
    subprocess.run([str(py), str(HERE / "peer_stages.py"), str(src), str(dst), "--stages",
                    *stages], check=True)
    return json.loads(dst.read_text())


def compare_langid(peers: bool, work: Path) -> None:
    from gristmill.selectors.filters.language_id import LanguageId

    pairs = debian_paragraphs()
    gold = [lang.split("-")[0] for lang, _ in pairs]
    texts = [t for _, t in pairs]
    table = pa.table({"id": [str(i) for i in range(len(texts))], "text": texts})
    print(f"\nlanguage id on {len(texts):,} labelled Debian Reference paragraphs "
          f"({dict(Counter(gold))})")
    for label, params in (("langid, 97 languages", {}),
                          ("langid, the 8 languages", {"languages": sorted(set(gold))})):
        st = LanguageId(params)
        t0 = time.process_time()
        st.setup()
        load = time.process_time() - t0
        t0 = time.process_time()
        got = st.process(table).kept.column("language_id_lang").to_pylist()
        cpu = time.process_time() - t0
        acc = sum(g == p for g, p in zip(gold, got, strict=True)) / len(gold)
        print(f"  {label:<26} accuracy {acc:.4f}  {len(texts) / cpu:8.0f} docs/CPU-s  "
              f"(setup {load:.1f} s; langid's model is decoded once per process)")
    if peers:
        res = run_peers([{"id": str(i), "text": t} for i, t in enumerate(texts)], ["lingua"], work)
        lin = res["lingua"]
        labels = [("zh" if p == "zh" else p) for p in lin["decisions"]]
        acc = sum(g == p for g, p in zip(gold, labels, strict=True)) / len(gold)
        print(f"  {'lingua, 75 languages':<26} accuracy {acc:.4f}  "
              f"{lin['docs'] / lin['cpu_s']:8.0f} docs/CPU-s  (load {lin['load_s']:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--docs", type=int, default=3000, help="documents in the corpus")
    ap.add_argument("--doc-chars", type=int, default=3000, help="characters per document")
    ap.add_argument("--peers", action="store_true", help="DataTrove in a separate venv")
    ap.add_argument("--compare-langid", action="store_true", help="langid vs lingua")
    args = ap.parse_args()
    docs = make_docs(args.docs, args.doc_chars)
    chars = sum(len(d["text"]) for d in docs)
    print(f"{len(docs):,} documents, {chars / 1e6:.1f} M characters, "
          f"{dict(Counter(d['lang'] for d in docs))}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        en = [t for lang, t in debian_paragraphs() if lang == "en"]
        eval_path = work / "eval.jsonl"
        eval_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in en[::7][:200]))
        specs = stage_specs(eval_path, work / "cache")
        ours = run_ours(docs, specs)
        shared = ["gopher_repetition", "c4_lines", "fineweb_lines", "pii"]
        peers = run_peers(docs, shared, work) if args.peers else {}
        print(f"\n{'stage':<20} {'docs/CPU-s':>11} {'setup s':>8} {'dropped':>8}  "
              f"{'DataTrove docs/CPU-s':>20} {'ratio':>6} {'agree':>7}")
        for name, r in ours.items():
            rate = r["docs"] / r["cpu_s"]
            dropped = sum(d != "keep" for d in r["decisions"])
            line = f"{name:<20} {rate:11.0f} {r['setup_s']:8.2f} {dropped:8d}"
            peer = peers.get("pii" if name == "pii_email_ip" else name)
            if peer is not None and name != "pii":
                prate = peer["docs"] / peer["cpu_s"]
                if "decisions" in peer:
                    agree = sum((a == "keep") == (b == "keep") for a, b in
                                zip(r["decisions"], peer["decisions"], strict=True)) / len(docs)
                else:  # a formatter: same redacted spans (placeholders differ)
                    agree = float("nan")
                line += f"  {prate:20.0f} {rate / prate:6.2f} {agree:7.3f}"
            print(line)
        for name in ("gopher_repetition", "c4_lines", "fineweb_lines"):
            if name not in peers:
                continue
            a, b = ours[name]["decisions"], peers[name]["decisions"]
            same_reason = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
            diff = Counter((x, y) for x, y in zip(a, b, strict=True) if (x == "keep") != (y == "keep"))
            langs = Counter(d["lang"] for d, x, y in zip(docs, a, b, strict=True)
                            if (x == "keep") != (y == "keep"))
            print(f"  {name}: same reason {same_reason:.3f}; disagreements (ours, DataTrove): "
                  f"{dict(diff.most_common(4))}; by language {dict(langs.most_common())}")
        if "c4_lines" in peers:
            both = [(x, y) for x, y in zip(ours["c4_lines"]["texts"], peers["c4_lines"]["texts"],
                                           strict=True)
                    if x is not None and (y or "").strip()]
            same = sum(x == y for x, y in both)
            print(f"  c4_lines: kept text identical in {same}/{len(both)} documents both keep")
        if args.compare_langid:
            compare_langid(args.peers, work)


if __name__ == "__main__":
    main()
