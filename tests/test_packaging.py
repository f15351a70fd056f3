"""The sdist and the wheel: sources, shipped recipes, and a core that requires nothing heavy.

This is the fast half of ``scripts/check_wheel.py`` (its ``build`` step, about
10 s); the script's install into a fresh core-only venv, the demo there and
the JIT build from site-packages run as CI's second step (``make wheel-check``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check_wheel():
    spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "scripts" / "check_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _check_wheel().build(tmp_path_factory.mktemp("dist"), isolation=False)


def test_wheel_and_sdist_hold_the_sources_and_recipes_and_a_light_core(built) -> None:
    wheel, sdist = built  # build() itself raises on a missing file or a heavy core requirement
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "gristmill/recipes/demo.yaml" in names
    assert "gristmill/ext/csrc/logprob_kernels.cu" in names
    assert "gristmill/extras.py" in names
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines()
              if line.startswith("Provides-Extra:")}
    assert {"dask", "beam", "torch", "fasttext", "ot", "distill", "all", "dev"} <= extras
    assert 'Requires-Dist: torch>=2.4; extra == "torch"' in meta
    with tarfile.open(sdist) as t:
        snames = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "gristmill/ext/csrc/minhash.cpp",
            "gristmill/recipes/grape.yaml"} <= snames


def test_build_step_refuses_a_wheel_whose_core_requires_torch(tmp_path: Path, built) -> None:
    """The check can fail: the same wheel with torch moved into the core is refused."""
    wheel, _ = built
    bad = tmp_path / "dist" / wheel.name
    bad.parent.mkdir()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("METADATA"):
                data = data.replace(b"Requires-Dist: pyarrow>=17",
                                    b"Requires-Dist: pyarrow>=17\nRequires-Dist: torch==2.13.0")
            dst.writestr(item, data)
    module = _check_wheel()
    with pytest.raises(module.StepFailed, match=r"requires \['torch'\] unconditionally"):
        module.check_metadata(bad)


def test_ninja_from_the_venv_is_found_when_the_venv_is_not_on_path(tmp_path: Path) -> None:
    """torch's extension builder runs `ninja` from PATH; a venv used without activation has
    its ninja (the torch extra) off PATH, so the build puts it there."""
    code = ("import shutil; from gristmill.ext.build import ninja_on_path\n"
            "assert shutil.which('ninja') is None\n"
            "ninja_on_path(); print(shutil.which('ninja'))")
    res = subprocess.run([sys.executable, "-c", code], env={"PATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    found = Path(res.stdout.strip())
    assert found.name == "ninja" and found.parent == Path(sys.executable).parent
