"""tokenprune as users get it: built into a wheel and installed, not run from the checkout.

The wheel is built from a copy of the sources (the build writes build/ and *.egg-info beside
them) and unpacked into a ``site-packages`` inside another git repository, as a virtual
environment inside a user's project is; a fresh interpreter, started outside both, imports it
from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the installed copy says of itself: where it was imported from, where results go, the
# commit and state it records, and the checkpoints evals.fmnist_pruning loads by default.
PROBE = """
import json, evals, evals.fmnist_pruning as fmnist
from evals import harness
print(json.dumps({
    "evals": evals.__file__,
    "results_dir": str(harness.RESULTS_DIR.resolve()),
    "git_commit": harness._git_commit(),
    "git_dirty": harness._git_dirty(),
    "checkpoints": {p.name: str(p) for p in fmnist.CHECKPOINTS.glob("*.safetensors")},
}))
"""


def _git(cwd: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    pytest.importorskip("setuptools", minversion="77", reason="builds the wheel in place of pip's isolated build")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    for package in ("tokenprune", "kernels", "evals"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    build = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"
    subprocess.run([sys.executable, "-c", build, str(out)], cwd=source, check=True, capture_output=True, timeout=300)
    (path,) = out.glob("tokenprune-*.whl")
    return path


def test_installed_wheel_ships_its_checkpoints_and_keeps_out_of_site_packages(wheel: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"  # the user's repository, with the environment inside it
    site = project / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    (project / "main.py").write_text("print('hello')\n")
    _git(project, "init", "-q")
    _git(project, "add", "main.py")
    _git(project, "commit", "-qm", "user's project")
    zipfile.ZipFile(wheel).extractall(site)  # a pure wheel's install: its files into site-packages
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("TOKENPRUNE_GIT_COMMIT", None)
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=run, env=env, check=True, capture_output=True, text=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])

    assert Path(probe["evals"]).is_relative_to(site)  # the installed copy, not the checkout
    # Results where --help says (evals/results, from the working directory), not in site-packages.
    assert Path(probe["results_dir"]) == run.resolve() / "evals" / "results"
    # Not a checkout of tokenprune: no commit, and not the user's repository's.
    assert probe["git_commit"] is None and probe["git_dirty"] is None
    # The committed checkpoints, byte for byte.
    committed = {p.name: _sha256(p) for p in (REPO / "evals" / "checkpoints").glob("*.safetensors")}
    assert committed and {name: _sha256(Path(p)) for name, p in probe["checkpoints"].items()} == committed


def test_wheel_holds_the_packages_and_licence_not_the_tests_nor_the_results(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"tokenprune", "kernels", "evals"}
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert not [name for name in names if name.startswith("evals/results/")]


@pytest.mark.parametrize("case", ["shadowed", "remains"])
def test_import_names_a_kernels_package_that_is_not_ours(tmp_path: Path, case: str) -> None:
    """Hugging Face's ``kernels`` (``pip install kernels``) is a top-level package of the same name.
    Earlier on sys.path, or written over ours by pip, it is what ``import kernels`` finds
    ("shadowed"); uninstalled after that, it takes our ``kernels/__init__.py`` with it and leaves a
    namespace package of our other modules ("remains"). Either way ``import tokenprune`` says so,
    and what to do, instead of ``cannot import name 'MemberLists'``."""
    site = tmp_path / "site"
    site.mkdir()
    if case == "shadowed":  # a stand-in for Hugging Face's package, first on the path
        (site / "kernels").mkdir()
        (site / "kernels" / "__init__.py").write_text('__version__ = "0.17.2"\n\ndef get_kernel(repo_id): ...\n')
        path, found = f"{site}{os.pathsep}{REPO}", str(site / "kernels" / "__init__.py")
    else:
        shutil.copytree(REPO / "tokenprune", site / "tokenprune", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "kernels", site / "kernels", ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
        path, found = str(site), f"{site / 'kernels'} without its __init__.py"
    env = {**os.environ, "PYTHONPATH": path}
    command = [sys.executable, "-c", "import tokenprune"]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 1
    message = out.stderr.strip().splitlines()[-1]
    assert f"'import kernels' found {found}." in message
    assert "pip uninstall kernels, then pip install --force-reinstall --no-deps tokenprune" in message
