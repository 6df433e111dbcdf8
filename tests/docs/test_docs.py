"""The documentation site (``mkdocs.yml``, ``docs/``): every public name has an API entry with a
docstring, and the pages' Python blocks run as written. ``scripts/test.sh`` builds the site with
``mkdocs build --strict`` (a broken link, a missing snippet or a docstring that cannot be rendered
fails it)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
API = "\n".join(p.read_text() for p in sorted((DOCS / "api").glob("*.md")))
ENTRIES = set(re.findall(r"^::: (\S+)$", API, flags=re.M))
# the modules whose public names (``__all__``) must each have an entry
MODULES = ["cgfac", "cgfac.optim", "cgfac.checkpoint", "cgfac.curvature", "cgfac.solvers",
           "cgfac.integrations.transformers", "cgfac.integrations.lightning"]
# rendered whole, each name of their ``__all__`` (mkdocstrings' ``filters: public``)
WHOLE = {"cgfac.curvature", "cgfac.solvers"}
PAGES = ["index.md", "getting-started.md", "which-method.md", "maths.md", "distributed.md", "failure.md",
         "examples.md", "code-organisation.md", "changelog.md"]
README_BLOCKS = set(re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S))
# the pages' own blocks: not the examples they include (tests/docs/test_examples.py runs those), nor
# those copied verbatim from the README (tests/docs/test_readme.py runs those)
BLOCKS = [(page, i, block) for page in PAGES
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S))
          if "--8<--" not in block and block not in README_BLOCKS]


def public_names() -> list[str]:
    names = []
    for module in MODULES:
        obj = importlib.import_module(module)
        for name in obj.__all__:
            value = getattr(obj, name)
            names.append(value.__name__ if isinstance(value, type(importlib)) else f"{module}.{name}")
    return names


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages == set(PAGES) | {f"api/{p.name}" for p in (DOCS / "api").glob("*.md")}
    for page in pages:
        assert f": {page}" in nav, page


@pytest.fixture(scope="module")
def package():
    """cgfac as mkdocstrings sees it: griffe's static analysis of the sources."""
    griffe = pytest.importorskip("griffe")
    return griffe.load("cgfac", search_paths=[str(ROOT / "src")], allow_inspection=False)


@pytest.mark.parametrize("name", public_names())
def test_public_name_has_an_api_entry_with_a_docstring(name: str, package) -> None:
    module = name.rsplit(".", 1)[0]
    assert name in ENTRIES or module in WHOLE, f"no '::: {name}' in docs/api/"
    obj = package[name.split(".", 1)[1]] if "." in name else package
    assert obj.docstring is not None and obj.docstring.value.strip(), f"{name} has no docstring"


def test_the_pages_have_python_blocks() -> None:
    assert {page for page, _, _ in BLOCKS} >= {"getting-started.md"}


@pytest.mark.parametrize(("page", "index", "block"), BLOCKS, ids=[f"{p}-{i}" for p, i, _ in BLOCKS])
def test_page_block_runs(page: str, index: int, block: str) -> None:
    exec(compile(block, f"docs/{page} block {index}", "exec"), {"__name__": "__docs__"})
