"""The installed layout: engine/, kernels/ and pipelines/ land under `fastdino`, never at the top level."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_install_puts_code_under_fastdino_only(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("fastdino", "engine", "kernels", "pipelines"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(source)],
        check=True,
    )
    top_level = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    assert top_level - {"bin"} == {"fastdino"}, f"unexpected top-level entries in site-packages: {top_level}"
    for sub in ("engine", "kernels", "pipelines"):
        assert (target / "fastdino" / sub / "__init__.py").is_file(), f"fastdino.{sub} missing from the install"
    assert (target / "bin" / "fastdino").is_file(), "the fastdino console script was not installed"
    # -S: without site-packages, so the package can only be found in the fresh install (torch is not there:
    # find_spec locates fastdino.kernels without running it).
    where = subprocess.run(
        [sys.executable, "-S", "-c", "import importlib.util; print(importlib.util.find_spec('fastdino.kernels').origin)"],
        env={"PYTHONPATH": str(target)}, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(target / "fastdino" / "kernels")
