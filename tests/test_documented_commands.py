"""Every command line the documentation shows is one its script accepts: the README's, the
checkpoints' README's and the usage lines of the ``evals`` modules' docstrings, extracted at test
time so that a renamed option, a stale choice or a results file that no longer joins fails here
rather than in a reader's shell. Parsing only (plus the checks each script makes right after it,
before any model or data loads); a command whose inputs are committed results is run."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from evals import bench, settings

REPO = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"(?:python\s+-m\s+evals\.|tokenprune-)")
EVALS = sorted(p.stem for p in (REPO / "evals").glob("*.py") if p.stem != "__init__")


def _markdown_commands(path: Path) -> list[str]:
    """Commands in fenced bash blocks (continuations joined, comments dropped, ``X="…"``
    variables substituted) and in inline code spans (which may wrap lines)."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", line)[0].strip()
            assignment = re.fullmatch(r'(\w+)=(?:"(.*)"|(\S+))', line)
            if assignment:
                variables[assignment[1]] = assignment[2] if assignment[2] is not None else assignment[3]
                continue
            for name, value in variables.items():
                line = line.replace("$" + name, value)
            if COMMAND.match(line):
                commands.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        if COMMAND.match(span.strip()):
            commands.append(" ".join(span.split()))
    return commands


def _docstring_commands(module: str) -> list[str]:
    """Usage lines (indented literal blocks) of an evals module's docstring: ``[optional]``
    groups taken as given, a trailing ``...`` (more options) dropped."""
    doc = importlib.import_module(f"evals.{module}").__doc__ or ""
    commands = []
    for line in doc.replace("\\\n", " ").splitlines():
        found = re.search(r"python -m evals\.\S+.*", line)
        if found and line.startswith("    ") and "``" not in line:  # a literal block, not prose
            command = re.split(r"\s#\s", found[0])[0].replace("[", "").replace("]", "")
            commands.append(" ".join(command.removesuffix("...").split()))
    return commands


def _documented() -> list[tuple[str, str]]:
    found = [("README.md", c) for c in _markdown_commands(REPO / "README.md")]
    found += [("evals/checkpoints/README.md", c) for c in _markdown_commands(REPO / "evals/checkpoints/README.md")]
    found += [(f"evals/{m}.py", c) for m in EVALS for c in _docstring_commands(m)]
    return list(dict.fromkeys(found))


DOCUMENTED = _documented()
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_extraction_finds_the_commands() -> None:
    """The extraction itself: the README's bash blocks, its prose and the docstrings all give some."""
    readme = [c for source, c in DOCUMENTED if source == "README.md"]
    assert any(c.startswith("tokenprune-bench --model") for c in readme)
    assert any("$" not in c and c.startswith("python -m evals.fidelity --method tome --method local_global") for c in readme)
    assert any(c.startswith("python -m evals.kinetics") for c in readme)  # wrapped in the prose
    assert any(source == "evals/pareto.py" for source, _ in DOCUMENTED)


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def _parse(module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The namespace the script's own parser makes of argv, stopped right after parsing (each
    script builds its parser in ``main`` or a helper; none does work before parsing)."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> argparse.Namespace:
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    entry = getattr(importlib.import_module(f"evals.{module}"), "parse_args" if module == "train_dynamicvit" else "main")
    try:
        entry(argv)
    except _Parsed as parsed:
        return parsed.namespace
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    raise AssertionError(f"evals.{module} did not parse its arguments")


@pytest.mark.parametrize(("source", "command"), DOCUMENTED, ids=[c[:80] for _, c in DOCUMENTED])
def test_documented_command_is_accepted(source: str, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    argv = shlex.split(command)
    if argv[0].startswith("tokenprune-"):
        assert argv[0] in SCRIPTS, f"{source} names {argv[0]}, which pyproject.toml's [project.scripts] lacks"
        target, function = SCRIPTS[argv[0]].split(":")
        assert callable(getattr(importlib.import_module(target), function))
        module, args = target.removeprefix("evals."), argv[1:]
    else:
        module, args = argv[2].removeprefix("evals."), argv[3:]
        assert module in EVALS, f"{source}: no evals/{module}.py"
    if "…" in command or "..." in args:
        return  # a placeholder for options, not a command to run
    if not args and module in ("pareto", "train_dynamicvit"):
        return  # the script's name in prose: its arguments are required
    namespace = _parse(module, args, monkeypatch)
    # The checks each script makes right after parsing, before loading anything:
    if module == "bench":
        assert bench._resolve_config(namespace)["settings"]
    elif module in ("fidelity", "video_fidelity") and (namespace.method or namespace.r or namespace.budget):
        assert settings.settings_from_args(namespace)
    elif module == "imagenet":
        settings.method_options(namespace.method, namespace.option, r=namespace.r, keep_ratio=namespace.keep_ratio,
                                predictor=namespace.predictor)
    elif module in ("kinetics", "bench_profile"):
        settings.method_options(namespace.method, namespace.option, r=namespace.r)
    elif module == "pareto":
        inputs = [REPO / path for path in map(str, namespace.results)]
        if all(path.is_file() for path in inputs):  # committed results: the join must work
            out = tmp_path / Path(namespace.out).name
            document = importlib.import_module("evals.pareto").main([*map(str, inputs), "--out", str(out)])
            assert document and out.is_file()


def test_documented_results_files_exist() -> None:
    """Every ``evals/results/…`` file the README names (``{a,b}`` expanded) is committed."""
    text = (REPO / "README.md").read_text()
    missing, named = [], set(re.findall(r"evals/results/[\w.{},-]+", text))
    assert len(named) > 10
    for name in named:
        name = name.rstrip(".,")
        braces = re.search(r"\{([^}]*)\}", name)
        names = [name[: braces.start()] + alt + name[braces.end():] for alt in braces[1].split(",")] if braces else [name]
        missing += [n for n in names if "." in Path(n).name and not (REPO / n).is_file()]
    assert not missing


def test_documented_make_targets_exist() -> None:
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    named = set(re.findall(r"`make (\w+)`|^make (\w+)", (REPO / "README.md").read_text(), re.M))
    assert named and {t for pair in named for t in pair if t} <= targets
