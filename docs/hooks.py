"""MkDocs hook: the benchmark plots under benchmarks/ join the site at the same paths, so the
pages show them without a copy in docs/ (docs/which-method.md links ``benchmarks/<run>/<plot>.png``)."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def on_files(files: Files, config) -> Files:
    for png in sorted((ROOT / "benchmarks").rglob("*.png")):
        uri = png.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files
