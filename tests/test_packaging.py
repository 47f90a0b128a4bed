"""Packaging: compatible ranges in pyproject.toml, the exact set in the lock, Python 3.10 compatibility.

The package's requirements are read from the installed metadata (scripts/setup_env.sh reinstalls whenever
pyproject.toml or the lock changes), so these tests see what `pip install fuselab` would ask for.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock-cpu.txt"
SOURCE_DIRS = ["harness", "fusion", "baselines", "studies", "tests", "benchmarks", "scripts"]

# Standard-library names that appeared after Python 3.10 (import name, attribute or None for the module).
NEWER_THAN_310 = {
    ("tomllib", None), ("typing", "Self"), ("typing", "LiteralString"), ("typing", "Never"),
    ("typing", "assert_never"), ("typing", "reveal_type"), ("typing", "TypeVarTuple"), ("typing", "Unpack"),
    ("typing", "NotRequired"), ("typing", "Required"), ("datetime", "UTC"), ("enum", "StrEnum"),
    ("contextlib", "chdir"), ("asyncio", "TaskGroup"), ("asyncio", "timeout"), ("itertools", "batched"),
    ("hashlib", "file_digest"), ("typing", "override"),
}
NEWER_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in md.requires("fuselab") or []]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = list(req.specifier)
            assert spec.operator == "==", f"{LOCK.name}: {line!r} is not an exact pin"
            pins[_norm(req.name)] = Version(spec.version)
    return pins


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_requires_python_admits_310_to_313():
    spec = md.metadata("fuselab")["Requires-Python"]
    from packaging.specifiers import SpecifierSet

    admitted = SpecifierSet(spec)
    assert all(v in admitted for v in ("3.10.0", "3.11.7", "3.12.3", "3.13.5")), spec
    assert "3.9.18" not in admitted


def test_core_dependencies_are_ranges_not_pins():
    core = [r for r in _requirements() if r.marker is None]
    assert len(core) >= 15
    pinned = [str(r) for r in core if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"exact pins belong in {LOCK.name}, not in the package's requirements: {pinned}"
    names = {_norm(r.name) for r in core}
    for needed in ("torch", "transformers", "lm-eval", "mergekit", "deepspeed", "mlflow", "optuna", "datasets",
                   "pandas", "numpy"):
        assert needed in names


def test_lock_is_inside_every_range():
    pins = _lock()
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue  # the `real` extra is checked against the packaged-model registry below
        name = _norm(req.name)
        assert name in pins, f"{req.name} is a requirement but has no exact version in {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside pyproject's range {req.specifier}")


def test_mlflow_3_18_0_is_excluded():
    (mlflow,) = [r for r in _requirements() if _norm(r.name) == "mlflow"]
    assert not mlflow.specifier.contains("3.18.0")
    assert mlflow.specifier.contains("3.17.2") and mlflow.specifier.contains("3.18.1")


def test_lock_pins_torch_without_a_local_label():
    # '==2.13.0' matches the CPU build (2.13.0+cpu) on these machines and the plain wheel elsewhere.
    pins = [l for l in LOCK.read_text().splitlines() if l.startswith("torch==")]
    assert len(pins) == 1 and "+" not in pins[0], pins


def test_real_extra_is_the_packaged_registry():
    from harness import packaged

    real = sorted(str(r).split(";")[0].strip() for r in _requirements()
                  if r.marker is not None and r.marker.evaluate({"extra": "real"})
                  and not r.marker.evaluate({"extra": "test"}))
    assert real == sorted(packaged.real_extra_requirements())


def _newer_than_310(src: str, rel: str) -> list[str]:
    """Problems that stop `src` from running on Python 3.10 (grammar: ast with feature_version 3.10; standard-
    library names that appeared later) or from compiling on 3.13 (docstrings holding lone surrogates)."""
    try:
        tree = ast.parse(src, filename=rel, feature_version=(3, 10))
    except SyntaxError as exc:
        return [f"{rel}:{exc.lineno}: not Python 3.10 syntax: {exc.msg}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"{rel}:{node.lineno}: import {a.name}" for a in node.names if (a.name, None) in NEWER_THAN_310]
        elif isinstance(node, ast.ImportFrom) and node.module:
            problems += [f"{rel}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                         if (node.module, a.name) in NEWER_THAN_310 or (node.module, None) in NEWER_THAN_310]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in NEWER_THAN_310:
                problems.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in NEWER_BUILTINS:
            problems.append(f"{rel}:{node.lineno}: {node.id}")
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node, clean=False)
            try:  # Python 3.13 dedents docstrings when it compiles them, through UTF-8: a lone surrogate fails
                (doc or "").encode("utf-8")
            except UnicodeEncodeError:
                line = node.body[0].lineno
                problems.append(f"{rel}:{line}: a docstring holds a lone surrogate (Python 3.13 cannot compile it): "
                                "escape the backslash, e.g. '\\\\udcc3'")
    return problems


@pytest.mark.parametrize("folder", SOURCE_DIRS)
def test_sources_are_python_310_compatible(folder):
    problems = []
    for path in sorted((REPO / folder).rglob("*.py")):
        rel = str(path.relative_to(REPO))
        problems += _newer_than_310(path.read_text(encoding="utf-8"), rel)
    assert not problems, "newer than Python 3.10:\n" + "\n".join(problems)


def test_the_310_check_finds_newer_code():
    assert _newer_than_310("try:\n    pass\nexcept* ValueError:\n    pass\n", "a.py")[0].startswith(
        "a.py:4: not Python 3.10 syntax")
    src = ("import tomllib\nfrom typing import Self\nimport datetime\nx = datetime.UTC\n"
           "raise ExceptionGroup('x', [])\n")
    assert _newer_than_310(src, "b.py") == ["b.py:1: import tomllib", "b.py:2: from typing import Self",
                                            "b.py:4: datetime.UTC", "b.py:5: ExceptionGroup"]
    assert _newer_than_310("import datetime\nx = datetime.timezone.utc\n", "c.py") == []
    assert _newer_than_310('def f():\n    """a \\udcc3 b"""\n', "d.py")[0].startswith("d.py:2: a docstring holds")
    assert _newer_than_310('def f():\n    """a \\\\udcc3 b"""\n    return "\\udcc3"\n', "e.py") == []
