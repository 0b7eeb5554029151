"""Test helpers shared across packages: run Python as the board does, with the training-only packages absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# every field of a labels/<camera> message (DESIGN.md, label-stream schema v1)
LABEL_FIELDS = {
    "v",
    "camera",
    "seq",
    "frame_ts",
    "pub_ts",
    "bundle",
    "labels",
    "exit",
    "adapters",
    "latency_ms",
    "energy_mj",
    "energy_source",
    "dropped",
}
# Not on the board: the runtime extra installs none of these.
BLOCKED = ("torch", "onnx", "onnxscript", "transformers", "sklearn")
# A meta-path finder, not sys.modules[name] = None: scipy/sklearn probe sys.modules['torch'] and crash on None.
BLOCK_PRELUDE = (
    "import sys\n"
    "class _Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    f"        if name.split('.')[0] in {BLOCKED!r}:\n"
    "            raise ModuleNotFoundError(f'No module named {name!r} (blocked: not on the board)', name=name)\n"
    "sys.meta_path.insert(0, _Block())\n"
)


def python_without_torch(code: str, *args: str) -> list[str]:
    """argv that runs ``code`` in a fresh interpreter where BLOCKED cannot be imported; args are sys.argv[1:]."""
    return [sys.executable, "-c", BLOCK_PRELUDE + code, *args]


def module_without_torch(module: str, *args: str) -> list[str]:
    """argv for ``python -m module args...`` with BLOCKED unimportable (for long-running processes)."""
    code = f"import runpy\nrunpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    return python_without_torch(code, *args)


def run_without_torch(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter where the training-only packages cannot be imported."""
    return subprocess.run(
        python_without_torch(code), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
