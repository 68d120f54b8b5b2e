"""Packaging: platform/ is a source root, never a package that shadows the stdlib `platform`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def test_platform_dir_is_not_a_package():
    assert (ROOT / "platform" / "secsweep" / "__init__.py").is_file()
    assert not (ROOT / "platform" / "__init__.py").exists(), (
        "platform/__init__.py shadows the stdlib module `platform` (DESIGN.md Layout): delete it"
    )


def test_stdlib_platform_wins_from_repo_root():
    code = (
        "import sys; sys.path.insert(0, '.'); "
        "import platform, uuid; "
        "assert hasattr(platform, 'system'), platform; "
        "print(platform.system()); print(platform.__file__); "
        "uuid.uuid4(); "
        "import secsweep, trainables; print(secsweep.__file__); print(trainables.__file__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    system, platform_file, secsweep_file, trainables_file = proc.stdout.split("\n")[:4]
    assert system  # e.g. "Linux"
    assert not Path(platform_file).resolve().is_relative_to(ROOT), platform_file  # the stdlib module
    assert Path(secsweep_file).resolve() == ROOT / "platform" / "secsweep" / "__init__.py"
    assert Path(trainables_file).resolve() == ROOT / "trainables" / "__init__.py"


def test_pyproject_package_discovery():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = pyproject["tool"]["setuptools"]["packages"]["find"]
    assert "platform" in find["where"]
    assert "." in find["where"]  # trainables/ lives at the repo root
    assert "secsweep*" in find["include"]
    assert "trainables*" in find["include"]
    # editable_mode=compat (a .pth pointing at the repo root layout) is ruled out by DESIGN.md
    assert "editable_mode" not in pyproject["tool"]["setuptools"]
