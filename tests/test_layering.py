"""Layering (DESIGN.md, MUST): nothing the daemon imports may need torch; models/ never imports export/ or daemon/."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

from tests.helpers import run_without_torch

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE_SHARED = (
    "polymorphd.models.errors",
    "polymorphd.models.tao",
    "polymorphd.models.synth",
    "polymorphd.models.contexts",
    "polymorphd.models.metrics",
    "polymorphd.models.calibrate",
    "polymorphd.models.preprocess",
    "polymorphd.models.cost",
    "polymorphd.export.manifest",
    "polymorphd.export.verify",
    "polymorphd.export.signing",
    "polymorphd.export.timing",
)


def _daemon_modules() -> list[str]:
    return sorted(f"polymorphd.daemon.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "daemon")]))


def test_every_daemon_module_and_shared_core_imports_without_torch():
    modules = _daemon_modules() + [m for m in TORCH_FREE_SHARED if _exists(m)]
    assert "polymorphd.daemon.cli" in modules
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    proc = run_without_torch(code)
    assert proc.returncode == 0, proc.stderr


def test_cli_explains_missing_train_extra():
    proc = run_without_torch(
        "from polymorphd.daemon.cli import main\nsys.exit(main(['train', '--data', 'x', '--out', 'y']))"
    )
    assert proc.returncode == 2
    assert "pip install 'polymorphd[train]'" in proc.stderr


@pytest.mark.parametrize("package", ["models"])
def test_models_never_import_export_or_daemon(package):
    offenders = []
    for path in (ROOT / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}" for n in names if n.startswith(("polymorphd.export", "polymorphd.daemon"))
            ]
    assert offenders == []


def _exists(module: str) -> bool:
    package, _, name = module.rpartition(".")
    folder = {"polymorphd.models": "models", "polymorphd.export": "export", "polymorphd.daemon": "daemon"}[
        package
    ]
    return (ROOT / folder / f"{name}.py").exists()
