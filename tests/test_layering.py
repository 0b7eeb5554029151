"""Layering (DESIGN.md, MUST), checked by package prefix in both directions, with no list of exceptions.

- What runs on the board: ``polymorphd.daemon`` and the torch-free subpackages ``models.core``,
  ``models.data`` and ``export.core``. None of them imports torch, onnx or a torch module of this project,
  anywhere in a file (static check) or indirectly (every module imported with torch blocked).
- ``daemon.tools`` holds the offline tools (eval, bench, demo). eval and bench run on a board too, so the
  package imports without torch; the demo builds its bundle with the training extra, imported lazily
  (inside functions) and only there.
- ``models`` never imports ``export`` or ``daemon``; ``export`` never imports ``daemon``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import run_without_torch

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"models": "models", "export": "export", "daemon": "daemon"}
# Subpackages whose modules run on the board (the whole daemon runs there).
TOOLS = "polymorphd.daemon.tools"  # offline tools: lazy imports of the training extra allowed
TORCH_FREE = (
    "polymorphd.daemon",
    "polymorphd.models.core",
    "polymorphd.models.data",
    "polymorphd.export.core",
)
# Third-party packages the board does not have (the runtime extra installs none of them).
TRAINING_ONLY = ("torch", "onnx", "onnxscript", "transformers", "safetensors")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["polymorphd", *parts])


def _modules(prefix: str) -> dict[str, Path]:
    """Every module under a package prefix, e.g. ``polymorphd.models.core`` -> {name: path}."""
    top, *rest = prefix.split(".")[1:]
    folder = ROOT / FOLDERS[top] / Path(*rest) if rest else ROOT / FOLDERS[top]
    return {_module_name(p): p for p in sorted(folder.rglob("*.py"))}


def _imports(path: Path, top_level_only: bool = False) -> list[str]:
    """Every module a file imports at run time (anywhere, or at module level only), absolute names.

    Imports under ``if TYPE_CHECKING:`` are for the type checker only and never run: they are skipped.
    """
    names: list[str] = []
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}:
            todo += node.orelse
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, (ast.If, ast.Try)) or not top_level_only:
            todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler))]
    return names


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_torch_free(name: str) -> bool:
    """A project module that may run on the board; third-party names are judged by TRAINING_ONLY."""
    return _under(name, TORCH_FREE) or name in {"polymorphd", *(f"polymorphd.{t}" for t in FOLDERS)}


def _offenders(prefix: str, bad) -> list[str]:
    return [
        f"{mod}: {n}"
        for mod, path in _modules(prefix).items()
        for n in _imports(path, top_level_only=_under(mod, (TOOLS,)))
        if bad(n)
    ]


def test_the_tree_holds_every_module_once():
    every = [m for p in TORCH_FREE for m in _modules(p)]
    assert len(every) == len(set(every))
    assert "polymorphd.daemon.cli" in every
    assert "polymorphd.models.core.calibrate" in every
    assert "polymorphd.export.core.verify" in every


@pytest.mark.parametrize("prefix", TORCH_FREE)
def test_torch_free_packages_never_import_torch_or_torch_modules(prefix):
    def bad(n: str) -> bool:
        if n.startswith("polymorphd."):
            return not _is_torch_free(n)
        return n.split(".")[0] in TRAINING_ONLY

    assert _offenders(prefix, bad) == []


@pytest.mark.parametrize(
    ("prefix", "forbidden"),
    [
        ("polymorphd.models", ("polymorphd.export", "polymorphd.daemon")),
        ("polymorphd.export", ("polymorphd.daemon",)),
    ],
)
def test_lower_layers_never_import_higher_ones(prefix, forbidden):
    assert _offenders(prefix, lambda n: _under(n, forbidden)) == []


def test_every_torch_free_module_imports_with_torch_blocked():
    modules = [m for p in TORCH_FREE for m in _modules(p)]
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    proc = run_without_torch(code)
    assert proc.returncode == 0, proc.stderr


def test_cli_explains_missing_train_extra():
    proc = run_without_torch(
        "from polymorphd.daemon.cli import main\nsys.exit(main(['train', '--data', 'x', '--out', 'y']))"
    )
    assert proc.returncode == 2
    assert "pip install 'polymorphd[train]'" in proc.stderr
