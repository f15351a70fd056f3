"""Is ``preselect probe`` + ``preselect train`` deterministic? (the fastText NaN xfail)

Runs the steps of ``tests/test_preselect_cli.py::test_probe_train_select_end_to_end``
(the same tiny model family, corpus and CLI arguments) ``--repeats`` times in this
process and prints the sha256 of the probe's shards and of the trained fastText
model, and the learning rate fastText used. Run it twice (two processes) and
compare the printed digests: identical digests in and across processes mean
the trainer sees the same file and writes the same model every time, so a
divergence ("Encountered NaN") cannot come from the data or the trainer alone.

    .venv/bin/python benchmarks/preselect_train_determinism.py --repeats 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import torch
    from test_preselect_cli import MATH, SHARED, WEB, _corpus

    from gristmill.cli.main import main as cli
    from gristmill.trainers.tiny import build_tiny_lm, build_tokenizer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tokenizer([" ".join(MATH + WEB + SHARED)] * 30, vocab_size=300, path=root / "tok")
        family = [str(build_tiny_lm(root / "tok", root / f"m{k}", n_layer=1, n_embd=16 * (k + 1),
                                    n_head=2, n_positions=64, seed=k)) for k in range(3)]
        _corpus(root / "docs.jsonl")
        models = [f"--model={p}={s}" for p, s in zip(family, (20.0, 30.0, 40.0), strict=True)]
        for r in range(args.repeats):
            run = root / f"run{r}"
            assert cli(["preselect", "probe", str(root / "docs.jsonl"), "--out", str(run / "probe"),
                        "--max-length", "32", "--device", "cpu", "--quiet", "--no-report",
                        *models]) == 0
            shards = sorted((run / "probe" / "shards").glob("*.parquet"))
            assert cli(["preselect", "train", str(run / "probe"), "--out", str(run / "clf.bin"),
                        "--bucket", "1000", "--valid-fraction", "0"]) == 0
            side = json.loads((run / "clf.json").read_text())
            print(f"run {r}: probe shards {[_sha(s) for s in shards]} model "
                  f"{_sha(run / 'clf.bin')} lr_used {side['hyperparameters']['lr_used']}",
                  flush=True)


if __name__ == "__main__":
    main()
