"""Static tools resolve ``polymorphd.*`` imports from the source tree (pyproject's [tool.pyright] / [tool.mypy]).

setuptools maps ``polymorphd.models`` onto ``models/`` (package-dir) only when installed; an editor or type
checker reading the tree finds the packages through ``.pyright/polymorphd/``, one symlink per folder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _search_root() -> Path:
    cfg = _pyproject()["tool"]
    (extra,) = cfg["pyright"]["extraPaths"]
    assert cfg["mypy"]["mypy_path"] == extra  # one layout for both tools
    return ROOT / extra


def test_links_match_the_package_dir_mapping() -> None:
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    root = _search_root()
    for package, folder in mapping.items():
        link = root / Path(*package.split("."))
        assert link.is_symlink(), f"{link} should link to {folder}/"
        assert link.resolve() == (ROOT / folder).resolve()


def _resolves(module: str, root: Path) -> bool:
    base = root / Path(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def test_every_polymorphd_import_in_the_tree_resolves_through_the_search_path() -> None:
    root = _search_root()
    missing = []
    for folder in ("daemon", "models", "export", "tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("polymorphd."):
                    # "from pkg import name": name is a module or an attribute of pkg
                    ok = _resolves(node.module, root) or all(
                        _resolves(f"{node.module}.{a.name}", root) for a in node.names
                    )
                    missing += [] if ok else [f"{path.relative_to(ROOT)}: {node.module}"]
                elif isinstance(node, ast.Import):
                    missing += [
                        f"{path.relative_to(ROOT)}: {a.name}"
                        for a in node.names
                        if a.name.startswith("polymorphd.") and not _resolves(a.name, root)
                    ]
    assert missing == []
