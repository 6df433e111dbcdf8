"""The benchmarks (``cgfac_bench``) use only the library's public names, and the library never imports them.

A name is public when it is in the ``__all__`` of a module none of whose path parts starts with ``_``.
"""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

import cgfac
import cgfac_bench

SRC = Path(cgfac.__file__).resolve().parents[1]
BENCH_FILES = sorted(Path(cgfac_bench.__file__).resolve().parent.rglob("*.py"))
LIBRARY_FILES = sorted(Path(cgfac.__file__).resolve().parent.rglob("*.py"))


def _public(module: types.ModuleType, name: str) -> bool:
    parts = module.__name__.split(".")
    return not any(p.startswith("_") for p in parts) and name in getattr(module, "__all__", ())


def _chain(node: ast.Attribute) -> list[str] | None:
    """``cgfac.a.b`` as ``["cgfac", "a", "b"]``; None when not rooted at a plain name."""
    names = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        names.append(current.attr)
        current = current.value
    if not isinstance(current, ast.Name):
        return None
    return [current.id, *reversed(names)]


def _non_public_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cgfac":
            module = importlib.import_module(node.module)
            bad += [f"{path.name}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                    if a.name.startswith("_") or not _public(module, a.name)]
        elif isinstance(node, ast.Import):
            bad += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names
                    if a.name.split(".")[0] == "cgfac" and a.name != "cgfac"]
        elif isinstance(node, ast.Attribute):
            names = _chain(node)
            if not names or names[0] != "cgfac":
                continue
            obj: object = cgfac
            for attr in names[1:]:
                if attr.startswith("__") or not isinstance(obj, types.ModuleType):
                    break
                if not _public(obj, attr):
                    bad.append(f"{path.name}:{node.lineno}: {'.'.join(names)}")
                    break
                obj = getattr(obj, attr)
    return bad


@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: p.name)
def test_bench_uses_public_names_only(path: Path) -> None:
    assert _non_public_uses(path) == []


def test_library_does_not_import_the_benchmarks() -> None:
    offenders = []
    for path in LIBRARY_FILES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                       else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.relative_to(SRC)}:{node.lineno}" for m in modules
                          if m.split(".")[0] == "cgfac_bench"]
    assert offenders == []
