"""The bundle store as the daemon sees it: which paths ``ctl load`` may read, and the crash-test hook.

The store (``systemd/polymorphd-install-bundle``) holds ``<store>/<bundle_id>-v<version>/`` directories and
``current``, a relative symlink to one of them, swapped with rename(2). The daemon never writes it. With
``bundle_store`` configured, a load request's path is resolved (symlinks and ``..`` included) and must land
inside the store, so a control client cannot make the daemon read anything else as a bundle; the resolved
path is what gets loaded, so a symlink swapped after the check changes nothing. Torch-free.

``POLYMORPHD_FAULT=<point>`` (tests only, see docs/RELIABILITY.md) makes the daemon SIGKILL itself when it
reaches that point of a hot swap, to prove that a power cut mid-swap leaves a daemon that restarts on the last
good bundle. Points: ``load:prepared`` (new engine loaded, not yet serving), ``load:swapped`` (serving it, the
reply not yet sent). The installer script honours the same variable at its own points.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from polymorphd.models.core.errors import PolymorphError

log = logging.getLogger(__name__)

FAULT_ENV = "POLYMORPHD_FAULT"
FAULT_POINTS = ("load:prepared", "load:swapped")


def resolve_load_path(path: str, store: str | None) -> str:
    """The path to load for a ``load`` request: its real path inside ``store`` (any path when store is None).

    PolymorphError (an ``ok: false`` reply) names the path when it is unusable or resolves outside the store.
    """
    if "\x00" in path:
        raise PolymorphError("load: path contains a NUL byte")
    if store is None:
        return path
    try:
        real = Path(os.path.realpath(path))
        root = Path(os.path.realpath(store))
    except (OSError, ValueError) as exc:
        raise PolymorphError(f"load: cannot resolve {path!r}: {exc}") from exc
    if real == root or root not in real.parents:
        raise PolymorphError(
            f"load: {path!r} resolves to {str(real)!r}, outside the bundle store {str(root)!r}; install the "
            "bundle with polymorphd-install-bundle and load it from the store"
        )
    return str(real)


def crash_point(env: Mapping[str, str], point: str) -> None:
    """SIGKILL this process when ``env[FAULT_ENV]`` names ``point`` (crash tests; a no-op otherwise)."""
    assert point in FAULT_POINTS, point
    if env.get(FAULT_ENV) == point:
        log.critical("fault injection: SIGKILL at %s (%s is set)", point, FAULT_ENV)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
