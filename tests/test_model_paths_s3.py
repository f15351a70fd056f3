"""Model and tokenizer paths on object storage (issue 11, item 1): a recipe names a
fastText model file and a transformers model/tokenizer folder by ``s3://`` URL (moto's
S3 server on loopback, started once per session by tests/object_store_cluster.py), the
stages load them through the per-machine model cache, ``output.tokenize`` writes
Megatron shards to an ``s3://`` output, and everything equals the run with local paths,
with the local engine and on a Dask cluster whose workers share no folder."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_text, write_jsonl
from object_store_cluster import files, new_bucket, upload

from gristmill.pipeline import model_cache, storage
from gristmill.pipeline.recipe import RecipeError, check_recipe, parse_recipe
from gristmill.pipeline.runner import run_recipe

TOKENIZED = ["tokenized/tokens.bin", "tokenized/tokens.idx", "tokenized/tokens.dom.npy"]


PLAIN = "river stone mill grain flour wheel water".split()
TARGET = "theorem proof lemma integral matrix vector".split()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A fastText classifier trained here, a byte-level BPE tokenizer and a tiny
    Llama built from a config (random weights), plus a two-file corpus."""
    pytest.importorskip("fasttext")
    pytest.importorskip("transformers")
    from gristmill.trainers.fasttext import train_fasttext
    from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer

    rng = random.Random(7)
    root = tmp_path_factory.mktemp("model_paths")
    texts, labels = [], []
    for i in range(160):
        words = TARGET if i % 2 else PLAIN
        texts.append(" ".join(rng.choice(words) for _ in range(30)) + " " + make_text(rng, 15))
        labels.append(i % 2)
    train_fasttext(texts, labels, root / "models" / "clf.bin", epoch=3, dim=16, bucket=20000)
    build_tokenizer(texts, vocab_size=300, path=root / "tok")
    build_tiny_lm(root / "tok", root / "models" / "lm", n_layer=1, n_embd=32, n_head=2,
                  n_positions=128)
    for f in range(2):
        write_jsonl(root / "corpus" / f"part-{f}.jsonl",
                    [{"id": f"{f}-{i}", "text": t} for i, t in enumerate(texts[f::4])])
    return root


def _recipe(corpus: str, models: str, out: str, engine: dict | None = None) -> dict:
    # a named source: its records' ``source`` is the name, not the (local or s3://) path
    return {"name": "models", "seed": 3, "sources": [{"path": corpus, "name": "web"}],
            "stages": [{"stage": "fasttext", "name": "preselect", "model": f"{models}/clf.bin",
                        "label": "__label__1"},
                       {"stage": "lm_likelihood", "name": "lm", "model": f"{models}/lm",
                        "max_length": 64, "device": "cpu", "dtype": "float32"},
                       {"stage": "top_fraction", "column": "preselect", "fraction": 0.5}],
            "output": {"path": out, "shard_size": "8KB",
                       "tokenize": {"tokenizer": f"{models}/lm"}},
            "engine": engine or {"kind": "local", "workers": 1, "batch_size": 16}}


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory) -> tuple[Path, dict]:
    """The recipe with local model paths, local input and local output, run once."""
    out = tmp_path_factory.mktemp("model-reference") / "out"
    manifest = run_recipe(parse_recipe(_recipe(str(models / "corpus"), str(models / "models"),
                                               str(out))), progress=False, report=False)
    assert manifest["shards"] and manifest["counts"]["dropped"] > 0
    return out, manifest


@pytest.fixture(scope="module")
def on_s3(models, s3_server) -> str:
    """The models and the corpus uploaded once to a bucket of their own: its URL."""
    url = f"s3://{new_bucket()}"
    upload(models / "models", f"{url}/models")
    upload(models / "corpus", f"{url}/corpus")
    return url


def _same_as_reference(reference: tuple[Path, dict], out: str, got: dict, models_url: str,
                       models: Path) -> None:
    """Shards and tokenized files byte for byte the reference's; the sidecar names the
    tokenizer URL, not the cache folder; the manifest lists what is there."""
    ref_out, ref = reference
    a, b = files(str(ref_out)), files(out)
    shards = [s["path"] for s in ref["shards"]]
    assert [s["path"] for s in got["shards"]] == shards
    for name in shards + TOKENIZED:  # .domains.json names the tokenizer
        assert a[name] == b[name], name
    side_a, side_b = (json.loads(x["tokenized/tokens.domains.json"]) for x in (a, b))
    assert side_a.pop("tokenizer") == str(models / "models" / "lm")
    assert side_b.pop("tokenizer") == f"{models_url}/lm"  # the URL, not the cache
    assert side_a == side_b and side_a["num_documents"] == ref["counts"]["kept"]
    ta, tb = dict(ref["tokenized"]), dict(got["tokenized"])
    assert ta.pop("tokenizer") != tb.pop("tokenizer")
    assert ta["num_tokens"] == tb["num_tokens"] and ta["num_documents"] == tb["num_documents"]
    # the manifest is the commit point and lists the tokenized files
    assert {f["path"] for f in tb["files"]} <= set(b)
    assert not [k for k in b if k.startswith("_work/")]


def _cache_urls(cache: Path) -> list[str]:
    """The URLs of a model cache's entries (no temporary download may be left)."""
    if not cache.is_dir():
        return []
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert not any(p.name.startswith(".") for p in entries)
    return sorted(json.loads((p / "source.json").read_text())["url"] for p in entries)


def test_recipe_with_s3_models_and_tokenizer_writes_what_local_paths_write(
        models, reference, on_s3, tmp_path, bucket, monkeypatch):
    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path / "cache"))
    remote_out = f"s3://{bucket}/out"
    remote = run_recipe(parse_recipe(_recipe(str(models / "corpus"), f"{on_s3}/models",
                                             remote_out)), progress=False, report=False)
    _same_as_reference(reference, remote_out, remote, f"{on_s3}/models", models)
    # one cache entry per remote object or folder: the tokenizer is the model's folder,
    # fetched once for the stage and the tokenizing step
    assert _cache_urls(tmp_path / "cache" / "models") == [f"{on_s3}/models/clf.bin",
                                                          f"{on_s3}/models/lm"]


def test_dask_workers_without_a_shared_folder_load_s3_models_through_their_own_cache(
        models, reference, on_s3, tmp_path, bucket, monkeypatch, s3_dask_cluster):
    """Input, models, tokenizer and output on S3; a ``dask scheduler`` and two ``dask
    worker`` processes, each with its own folder and model cache: each worker that ran a
    task fetched both models into its own cache, and the output is the local run's."""
    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path / "cache"))
    remote_out = f"s3://{bucket}/dask-out"
    engine = {"kind": "dask", "scheduler": s3_dask_cluster.address, "batch_size": 16}
    got = run_recipe(parse_recipe(_recipe(f"{on_s3}/corpus", f"{on_s3}/models", remote_out,
                                          engine)), progress=False, report=False)
    _same_as_reference(reference, remote_out, got, f"{on_s3}/models", models)
    want = [f"{on_s3}/models/clf.bin", f"{on_s3}/models/lm"]
    worker_caches = [[u for u in _cache_urls(s3_dask_cluster.cache(i)) if u.startswith(on_s3)]
                     for i in range(len(s3_dask_cluster.homes))]
    assert want in worker_caches, worker_caches  # the scoring ran on the workers
    assert all(c in ([], want) for c in worker_caches), worker_caches
    for home in s3_dask_cluster.homes:  # nothing of the run was written in a worker's folder
        assert not list(home.rglob("*.parquet")) and not list(home.rglob("tokens.*"))


def test_racing_processes_download_a_model_folder_once(models, tmp_path, bucket,
                                                       s3_server):
    url = f"s3://{bucket}/race/lm"
    upload(models / "models" / "lm", url)
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            "from gristmill.pipeline.model_cache import localize\n"
            f"print(localize({url!r}))")
    env = {**os.environ, "GRISTMILL_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    paths = {o.strip() for o, _ in outs}
    assert len(paths) == 1
    downloads = sum(e.count("model cache: ") for _, e in outs)
    assert downloads == 1  # the others waited on the lock and found the folder complete
    got = Path(paths.pop())
    want = models / "models" / "lm"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    for f in want.iterdir():
        assert (got / f.name).read_bytes() == f.read_bytes()


def test_a_changed_object_gets_a_new_cache_entry(tmp_path, bucket, monkeypatch):
    import fsspec

    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3")
    url = f"s3://{bucket}/m/clf.bin"
    fs.pipe_file(url, b"version one")
    first = model_cache.localize(url)
    assert Path(first).read_bytes() == b"version one"
    assert model_cache.localize(url) == first  # cached: same path, no new entry
    # a download killed half way leaves a temporary folder: the next one removes it
    key = Path(first).parent.name
    fs.pipe_file(url, b"version two, longer")
    listing = model_cache.remote_listing(url)
    new_key = model_cache.cache_key(url, listing)
    stale = tmp_path / "cache" / "models" / f".{new_key}.tmp-99999"
    (stale / "clf.bin").parent.mkdir(parents=True)
    (stale / "clf.bin").write_bytes(b"vers")
    second = model_cache.localize(url)
    assert Path(second).read_bytes() == b"version two, longer"
    assert Path(second).parent.name == new_key != key and not stale.exists()
    assert Path(first).read_bytes() == b"version one"  # the old entry is left as it was


def test_a_missing_s3_model_is_a_recipe_error_naming_the_field(models, tmp_path,
                                                               bucket):
    body = _recipe(str(models / "corpus"), f"s3://{bucket}/nothing-here", str(tmp_path / "o"))
    with pytest.raises(RecipeError, match=r"preselect\.model: .*s3://.*/nothing-here/clf\.bin"):
        check_recipe(parse_recipe(body))
    body["stages"] = []
    with pytest.raises(RecipeError, match="output.tokenize.tokenizer: s3://"):
        check_recipe(parse_recipe(body))
    assert not storage.exists(tmp_path / "o")


def test_url_lists_and_eval_sets_on_s3_are_read_through_the_cache(tmp_path, bucket,
                                                                   monkeypatch):
    import fsspec
    import pyarrow as pa

    from gristmill.selectors.filters.decontaminate import Decontaminate
    from gristmill.selectors.filters.url import UrlFilter

    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{bucket}/lists/block.txt", b"# farms\nspam.example\n")
    f = UrlFilter({"block_domains_files": [f"s3://{bucket}/lists/block.txt"]})
    f.check(".")
    f.setup()
    out = f.process(pa.table({"id": ["a", "b"], "url": ["https://x.spam.example/", "https://ok.org"]}))
    assert out.kept.column("id").to_pylist() == ["b"]
    with pytest.raises(ValueError, match="block_domains_files"):
        UrlFilter({"block_domains_files": [f"s3://{bucket}/lists/none.txt"]}).check(".")

    item = "the miller grinds the grain of the valley every single day before dawn"
    fs.pipe_file(f"{bucket}/evals/qa/part-0.jsonl", (json.dumps({"text": item}) + "\n").encode())
    st = Decontaminate({"eval_sets": [{"name": "qa", "path": f"s3://{bucket}/evals/qa"}],
                        "cache_dir": str(tmp_path / "ngrams")})
    st.check(".")
    st.setup()
    out = st.process(pa.table({"id": ["a", "b"], "text": ["x " + item, "nothing to see here"]}))
    assert out.dropped.column("reason").to_pylist() == ["contaminated_qa"]
    with pytest.raises(ValueError, match="globs are not expanded"):
        Decontaminate({"eval_sets": [{"name": "qa", "path": f"s3://{bucket}/evals/*.jsonl"}]}
                      ).check(".")


def test_tokenize_command_takes_a_tokenizer_url(models, tmp_path, bucket, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gristmill.cli.main import main
    from gristmill.pipeline.tokenized import IndexedTokens

    monkeypatch.setenv("GRISTMILL_CACHE", str(tmp_path / "cache"))
    upload(models / "tok", f"s3://{bucket}/tok")
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"text": ["river stone", "mill wheel water"]}),
                   tmp_path / "shards" / "part-00000.parquet")
    for tok, out in ((str(models / "tok"), "local"), (f"s3://{bucket}/tok", "remote")):
        assert main(["tokenize", "--tokenizer", tok, "--out", str(tmp_path / out),
                     str(tmp_path / "shards")]) == 0
    assert IndexedTokens(tmp_path / "remote").tokenizer_path == f"s3://{bucket}/tok"
    for ext in (".bin", ".idx", ".dom.npy"):
        assert (tmp_path / f"remote{ext}").read_bytes() == (tmp_path / f"local{ext}").read_bytes()
