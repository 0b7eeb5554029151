"""The engine's execution modes: the one list of their names. Torch-free, and cheap to import (the CLI's
``--mode`` choices read it), so nothing here but the names; how each mode runs is ``daemon/modes.py``.

- ``full``: the generalist, every block, no exits, no adapters.
- ``early-exit``: the generalist with its exits.
- ``polymorph``: exits, then context adapters in one batched tail run (the default).
- ``switching``: one whole specialist forward per chosen context (the model-switching baseline).
- ``merged``: adapters merged into the tail weights when the chosen set changes (the weight-merging baseline).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["MODES", "Mode"]

Mode = Literal["full", "early-exit", "polymorph", "switching", "merged"]
MODES: tuple[Mode, ...] = get_args(Mode)
