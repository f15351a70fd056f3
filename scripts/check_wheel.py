"""Build the sdist and wheel, install the wheel with only the core into a fresh venv, use it.

A user's view of a release, outside the repository::

    python scripts/check_wheel.py                # about 2-3 minutes on a loaded 2-core box
    python scripts/check_wheel.py --with-torch   # also: the [torch] extra, JIT build from
                                                 # site-packages (a few more minutes)

Steps, each timed; any failure exits 1 naming the step:

1. ``python -m build`` (sdist, then the wheel from the sdist) into a temporary
   folder; both must hold the C++/CUDA sources and the shipped recipes, and
   the wheel's metadata must require none of the heavy libraries outside an extra.
2. A fresh venv (outside the repository) with ``pip install <wheel>`` only;
   ``pip list`` must hold none of apache-beam, dask, distributed, torch,
   transformers, fasttext, POT, scikit-learn, matplotlib.
3. From an empty folder: ``gristmill check`` on a recipe that needs the
   ``torch`` extra and ``gristmill run --engine dask`` must stop with the one
   line naming the extra; ``gristmill examples grape`` likewise.
4. ``gristmill demo`` runs end to end there (shipped recipe, stdlib corpus,
   report), and ``gristmill examples mix`` + ``gristmill run
   recipes/mix_unimax.yaml`` runs a second shipped recipe.
5. With ``--with-torch``: ``pip install '<wheel>[torch]'`` (pip keeps a torch
   already satisfying the range; on these machines the CPU build from the
   local wheel folder), then from the empty folder, with the venv *not* on
   PATH, build the C++ token log-likelihood op and the MinHash kernel; their
   build cache must lie outside the installed package.

The venv and the build stay in a temporary folder that is removed at the end
(``--keep`` keeps it and prints where).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"apache-beam", "dask", "distributed", "torch", "transformers", "fasttext-numpy2",
         "pot", "scikit-learn", "matplotlib", "ninja"}
SOURCES = {"logprob_cpu.cpp", "logprob_cuda.cpp", "logprob_kernels.cu", "logprob_kernels.h",
           "minhash.cpp"}
TORCH_RECIPE = """name: needs-torch
sources:
  - path: ../data/demo
stages:
  - stage: lm_likelihood
    model: ../models/none
output:
  path: ../out/needs-torch
"""


class StepFailed(RuntimeError):
    pass


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
         expect: int = 0) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != expect:
        raise StepFailed(f"{' '.join(map(str, cmd))} exited {res.returncode} (expected {expect})"
                         f"\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}")
    return res


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise StepFailed(what)


def build(tmp: Path, isolation: bool) -> tuple[Path, Path]:
    """``python -m build`` into ``tmp/dist``; checks both files (see below)."""
    dist = tmp / "dist"
    cmd = [sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)]
    _run(cmd if isolation else cmd[:3] + ["--no-isolation"] + cmd[3:], cwd=tmp)
    wheel = next(dist.glob("gristmill-*.whl"))
    sdist = next(dist.glob("gristmill-*.tar.gz"))
    check_contents(wheel, sdist)
    check_metadata(wheel)
    return wheel, sdist


def check_contents(wheel: Path, sdist: Path) -> None:
    """Both hold the C++/CUDA sources and every shipped recipe."""
    shipped = {p.name for p in (REPO / "gristmill" / "recipes").glob("*.yaml")}
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    with tarfile.open(sdist) as t:
        snames = t.getnames()
    for label, listing in (("wheel", names), ("sdist", snames)):
        have = {Path(n).name for n in listing if "/gristmill/ext/csrc/" in f"/{n}"}
        _expect(SOURCES <= have, f"{label} lacks C++/CUDA sources {sorted(SOURCES - have)}")
        have = {Path(n).name for n in listing if "/gristmill/recipes/" in f"/{n}"}
        _expect(shipped <= have, f"{label} lacks shipped recipes {sorted(shipped - have)}")


def check_metadata(wheel: Path) -> None:
    """The wheel requires none of ``HEAVY`` outside an extra, and pins nothing exactly."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
    core = [line.split(":", 1)[1].strip() for line in meta.decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    names = {re.split(r"[\[<>=!~; ]", c, maxsplit=1)[0].lower() for c in core}
    _expect(not names & HEAVY, f"the wheel requires {sorted(names & HEAVY)} unconditionally")
    _expect(not any("==" in c for c in core), f"exact pins in the core requirements: {core}")


def core_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp)
    _run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], cwd=tmp)
    listed = json.loads(_run([str(venv / "bin" / "pip"), "list", "--format=json"], cwd=tmp).stdout)
    installed = {p["name"].lower() for p in listed}
    _expect(not installed & HEAVY, f"a core install holds {sorted(installed & HEAVY)}")
    print(f"  core install: {len(installed)} distributions, none of {sorted(HEAVY)}")
    return venv


def _env_without_venv_on_path() -> dict[str, str]:
    """The user's environment: the venv is called by path, not activated."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p + "/"]
    env["PATH"] = os.pathsep.join(parts)
    return env


def missing_extras(venv: Path, work: Path) -> None:
    gm = str(venv / "bin" / "gristmill")
    env = _env_without_venv_on_path()
    res = _run([gm, "examples", "grape"], cwd=work, env=env, expect=2)
    _expect("pip install 'gristmill[torch]'" in res.stderr and len(res.stderr.splitlines()) == 1,
            f"examples grape without torch: {res.stderr!r}")
    print(f"  {res.stderr.strip()}")
    (work / "recipes").mkdir(exist_ok=True)
    (work / "recipes" / "needs_torch.yaml").write_text(TORCH_RECIPE)
    res = _run([gm, "check", "recipes/needs_torch.yaml"], cwd=work, env=env, expect=2)
    _expect(res.stderr.strip() == "gristmill: recipe error at stages[0] (lm_likelihood): needs "
            "the 'torch' extra (torch, transformers not installed): pip install 'gristmill[torch]'",
            f"check without torch: {res.stderr!r}")
    print(f"  {res.stderr.strip()}")
    res = _run([gm, "run", "recipes/demo.yaml", "--engine", "dask"], cwd=work, env=env, expect=2)
    _expect("pip install 'gristmill[dask]'" in res.stderr, f"run --engine dask: {res.stderr!r}")
    _expect(not (work / "out" / "needs-torch").exists(), "a refused recipe wrote output")
    print(f"  {res.stderr.strip()}")


def demo(venv: Path, work: Path) -> None:
    gm = str(venv / "bin" / "gristmill")
    env = _env_without_venv_on_path()
    _run([gm, "demo"], cwd=work, env=env)
    manifest = json.loads((work / "out" / "demo" / "manifest.json").read_text())
    c = manifest["counts"]
    _expect(c["reconciled"] and c["kept"] > 0, f"demo counts {c}")
    _expect((work / "recipes" / "demo.yaml").is_file(), "demo did not write recipes/demo.yaml")
    _expect((work / "out" / "demo" / "report.html").is_file(), "demo wrote no report")
    print(f"  demo: read {c['read']:,} kept {c['kept']:,} dropped {c['dropped']:,} "
          f"rejected {c['rejected']:,} (reconciled)")


def demo_first(venv: Path, work: Path) -> None:
    """The demo writes recipes/demo.yaml, which the missing-extra step runs with --engine dask."""
    demo(venv, work)
    missing_extras(venv, work)


def mix_example(venv: Path, work: Path) -> None:
    gm = str(venv / "bin" / "gristmill")
    env = _env_without_venv_on_path()
    _run([gm, "examples", "mix"], cwd=work, env=env)
    _run([gm, "run", "recipes/mix_unimax.yaml", "--quiet"], cwd=work, env=env)
    manifest = json.loads((work / "out" / "mix_unimax" / "manifest.json").read_text())
    _expect(manifest["counts"]["reconciled"], "mix_unimax did not reconcile")
    print(f"  mix_unimax: read {manifest['counts']['read']:,} kept {manifest['counts']['kept']:,}")


def torch_extra(venv: Path, wheel: Path, work: Path, tmp: Path) -> None:
    pip = str(venv / "bin" / "pip")
    _run([pip, "install", "-q", f"{wheel}[torch]"], cwd=tmp)
    cache = tmp / "ext-cache"
    env = {**_env_without_venv_on_path(), "GRISTMILL_EXT_CACHE": str(cache)}
    code = ("import gristmill, torch\n"
            "from gristmill.ext import backend, minhash_native\n"
            "print('logprob backend:', backend('cpu'))\n"
            "print('minhash kernel:', 'native' if minhash_native.module() else 'numpy')\n"
            "print('package:', gristmill.__file__)\n")
    res = _run([str(venv / "bin" / "python"), "-c", code], cwd=work, env=env)
    print("  " + res.stdout.strip().replace("\n", "\n  "))
    _expect("logprob backend: cpp" in res.stdout, "the C++ op did not build from site-packages")
    _expect("minhash kernel: native" in res.stdout, "the MinHash kernel did not build")
    site = Path(res.stdout.split("package:")[1].strip()).parent
    built = [p for p in cache.rglob("*.so")]
    _expect(len(built) >= 2, f"no built libraries under {cache}")
    _expect(not list(site.rglob("*.so")), f"built files inside the package folder {site}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--with-torch", action="store_true", help="also install the torch extra "
                    "and build the C++ op and the MinHash kernel from site-packages")
    ap.add_argument("--isolation", action="store_true",
                    help="build in an isolated env (downloads setuptools) instead of this one")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gristmill-wheel-"))
    work = tmp / "work"  # an empty folder outside the repository
    work.mkdir()
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        print("build sdist and wheel")
        wheel, sdist = build(tmp, args.isolation)
        print(f"  {wheel.name} ({wheel.stat().st_size / 1e3:.0f} kB), {sdist.name} "
              f"({sdist.stat().st_size / 1e3:.0f} kB)  [{time.perf_counter() - t0:.0f} s]")
        t0 = time.perf_counter()
        print("core-only venv")
        venv = core_venv(tmp, wheel)
        print(f"  [{time.perf_counter() - t0:.0f} s]")
        for label, step in [("gristmill demo in an empty folder, then missing extras",
                             lambda: demo_first(venv, work)),
                            ("gristmill examples mix and a shipped recipe",
                             lambda: mix_example(venv, work))] + (
                [("the torch extra: JIT builds from site-packages",
                  lambda: torch_extra(venv, wheel, work, tmp))] if args.with_torch else []):
            t0 = time.perf_counter()
            print(label)
            step()
            print(f"  [{time.perf_counter() - t0:.0f} s]")
    except StepFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        print(f"(kept {tmp})", file=sys.stderr)
        return 1
    print(f"wheel check passed in {time.perf_counter() - t_all:.0f} s")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
