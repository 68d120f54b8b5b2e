"""Packaging: platform/ is a source root, never a package that shadows the stdlib `platform`."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def test_platform_dir_is_not_a_package():
    assert (ROOT / "platform" / "secsweep" / "__init__.py").is_file()
    assert not (ROOT / "platform" / "__init__.py").exists(), (
        "platform/__init__.py shadows the stdlib module `platform` (docs/design.md, 'Layout'): delete it"
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
    # editable_mode=compat (a .pth pointing at the repo root layout) is ruled out by docs/design.md "Layout"
    assert "editable_mode" not in pyproject["tool"]["setuptools"]


# -- declared dependencies ------------------------------------------------------------------------

FIRST_PARTY = {"secsweep", "trainables"}


def _requirement_name(spec: str) -> str:
    """Distribution name of a PEP 508 requirement string, normalised (PEP 503)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level(folders: list[str]) -> dict[str, str]:
    """Top-level module -> first file importing it, over every absolute import (also inside
    functions) of the .py files under `folders`, stdlib and first-party modules left out."""
    found: dict[str, str] = {}
    files = [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]
    # test modules may import each other (tests/ is on sys.path); the library imports itself only
    # as `secsweep.*` / `trainables.*` or relatively
    local = FIRST_PARTY | {path.stem for path in files if path.relative_to(ROOT).parts[0] in ("tests", "bench")}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _undeclared(modules: dict[str, str], declared: set[str]) -> list[str]:
    dists = importlib.metadata.packages_distributions()
    missing = []
    for module, where in sorted(modules.items()):
        candidates = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(module, [module])}
        if not candidates & declared:
            missing.append(f"{module} (imported by {where}; distributions {sorted(candidates)})")
    return missing


def _declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project["optional-dependencies"][extra]
    return {_requirement_name(s) for s in specs}


def test_every_library_import_is_a_declared_dependency():
    modules = _imported_top_level(["platform", "trainables", "sweeps"])
    # the scan itself works: it sees imports at module level and inside functions
    assert {"torch", "ray", "mlflow", "PIL", "sklearn"} <= set(modules), sorted(modules)
    assert not _undeclared(modules, _declared()), _undeclared(modules, _declared())


def test_every_test_import_is_declared_with_the_test_extra():
    modules = _imported_top_level(["tests", "bench"])
    assert {"pytest", "yaml", "jsonschema"} <= set(modules), sorted(modules)
    declared = _declared("test")
    assert not _undeclared(modules, declared), _undeclared(modules, declared)


def test_requires_python_allows_only_versions_with_tomllib():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert spec.replace(" ", "") == ">=3.11"  # tomllib, used by these tests, is new in 3.11


# -- the README's set-up commands ---------------------------------------------------------------

def _readme_commands() -> list[str]:
    """The README's two set-up commands (its first two ```bash blocks)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def _apt_steps(command: str) -> str:
    return " && ".join(step for step in command.split(" && ") if "apt-get" in step)


def _fake_bin(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.parametrize("with_sudo", [False, True], ids=["root-without-sudo", "user-with-sudo"])
def test_readme_apt_steps_work_with_and_without_sudo(tmp_path, with_sudo):
    """Run the README's apt-get steps with a PATH holding only a recording apt-get (and a recording
    sudo that runs its arguments): without sudo they must call apt-get directly, with it through sudo."""
    log = tmp_path / "calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}')
    if with_sudo:
        _fake_bin(bin_dir, "sudo", f'echo "sudo" >> {log}; "$@"')
    for command in _readme_commands():
        log.write_text("")
        steps = _apt_steps(command)
        assert steps.count("apt-get") == 2, command
        proc = subprocess.run(["/bin/bash", "-c", steps], env={"PATH": str(bin_dir)}, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        calls = log.read_text().split("\n")[:-1]
        apt = ["apt-get update", "apt-get install -y dataset-fashion-mnist"]
        assert calls == (["sudo", apt[0], "sudo", apt[1]] if with_sudo else apt), calls


def test_ci_runs_the_readme_test_command():
    """.ci/run performs every step of the README's test command, in order (quiet flags aside)."""
    def normal(step: str) -> str:
        return re.sub(r"\s+-q{1,2}\b", "", step).strip()

    steps = [normal(s) for s in _readme_commands()[1].split(" && ")]
    ci = [normal(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    positions = [ci.index(step) for step in steps]  # ValueError = a README step CI does not run
    assert positions == sorted(positions), (steps, ci)


# -- citations of docs/methods.md and docs/design.md ---------------------------------------------

def _cited_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "cluster.yaml"]
    for folder in ("platform", "trainables", "sweeps", "tests", "bench", "docs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml")]
    return [p for p in files if p.is_file()]


def test_every_docs_citation_names_an_existing_section():
    """`docs/methods.md §5.3` and `docs/design.md "Stages and their artifacts"` must point at a
    heading of that file, so the repository's citations stay meaningful when the docs change."""
    methods = (ROOT / "docs" / "methods.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", methods, flags=re.M))
    headings = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "design.md").read_text(), flags=re.M))
    assert {"2.3", "5.3", "6.1"} <= sections and "Stages and their artifacts" in headings
    bad, seen = [], 0
    for path in _cited_files():
        text = path.read_text(errors="replace")
        for m in re.finditer(r"docs/methods\.md([\s§0-9.,/\-–]*)", text):
            for sec in re.findall(r"§(\d+(?:\.\d+)?)", m.group(1)):
                seen += 1
                if sec.rstrip(".") not in sections:
                    bad.append(f"{path.relative_to(ROOT)}: docs/methods.md §{sec}")
        for m in re.finditer(r"docs/design\.md,? [\"']([^\"']+)[\"']", text):
            seen += 1
            if m.group(1) not in headings:
                bad.append(f"{path.relative_to(ROOT)}: docs/design.md {m.group(1)!r}")
    assert seen > 50  # the scan finds the citations
    assert not bad, bad


def test_no_citation_of_files_outside_the_repository():
    pattern = re.compile(r"\.\./shared|METHODS\.md|DESIGN\.md")
    hits = [str(p.relative_to(ROOT)) for p in _cited_files() if pattern.search(p.read_text(errors="replace"))]
    assert not hits, hits
