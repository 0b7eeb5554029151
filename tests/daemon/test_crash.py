"""Power cut and SIGKILL: killed at any injected point of a swap, the store's ``current`` still points at a
complete, verified bundle and a restarted daemon serves the last good one. Config errors: a bad reload keeps
the old config, a bad config at start exits non-zero naming the field. docs/RELIABILITY.md lists them.

The fault points are the documented ``POLYMORPHD_FAULT`` hook (daemon/store.py, the installer script): the
process SIGKILLs itself there, which is what a power cut does to it, minus the page cache (fsync'ed anyway).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from polymorphd.daemon.cli import main
from polymorphd.daemon.config import load_config
from polymorphd.daemon.control import request
from polymorphd.export.core.verify import verify_bundle
from tests.daemon.fakes import FakeBackend, FlakyOpener, Sub, config, make_bundle, running
from tests.helpers import ROOT, module_without_torch
from tests.systemd.test_install import FAKE_POLYMORPHD, helper, sh

SYNTH = "synthetic:?classes=10&contexts=3&width=64&height=64"  # the tiny bundle's 10 classes

pytestmark = pytest.mark.slow  # real bundles and, for the daemon's own crash points, a daemon subprocess


@pytest.fixture
def store(tiny_bundle: Path, tmp_path: Path) -> dict[str, Path]:
    """A store serving v1 of the tiny bundle, and v2 (same graphs, next version) waiting to be installed.

    The installer runs with a stand-in ``polymorphd`` (tests/systemd/test_install.py) so that these tests time
    the crash handling, not the verifier; the store's contents are verified for real afterwards.
    """
    (tmp_path / "store").mkdir()
    fake = tmp_path / "bin" / "polymorphd"
    fake.parent.mkdir()
    fake.write_text(FAKE_POLYMORPHD)
    fake.chmod(0o755)
    v1 = Path(shutil.copytree(tiny_bundle, tmp_path / "in" / "v1"))
    v2 = Path(shutil.copytree(tiny_bundle, tmp_path / "in" / "v2"))
    manifest = json.loads((v2 / "manifest.json").read_text())  # the manifest is not in its own hash list
    (v2 / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    assert helper(tmp_path / "store", v1).returncode == 0
    return {"store": tmp_path / "store", "v1": v1, "v2": v2, "name": Path(f"{manifest['bundle_id']}-v1")}


def restarted_bundle(store: Path, tmp_path: Path) -> str:
    """Start a daemon (the real engine) on <store>/current, as the unit does; the bundle it serves."""
    cfg = config(tmp_path / "restart", store / "current", bundle_store=str(store), threads=1)
    (tmp_path / "restart").mkdir(exist_ok=True)
    with running(cfg, None, FlakyOpener()) as d:
        sub = Sub(d.publisher.address, "labels/")
        _, first = sub.recv()
        sub.close()
        return first["bundle"]


@pytest.mark.parametrize("point", ["install:copied", "install:stored", "install:linked"])
def test_installer_killed_at_any_point_leaves_current_on_a_complete_bundle(store, point, tmp_path):
    root = store["store"]
    fake = root.parent / "bin" / "polymorphd"
    installer = ROOT / "systemd/polymorphd-install-bundle"
    proc = sh(installer, "--store", root, "--polymorphd", fake, store["v2"], env={"POLYMORPHD_FAULT": point})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert f"fault injection: SIGKILL at {point}" in proc.stderr
    assert os.readlink(root / "current") == str(store["name"])  # still the old one, and it is whole:
    m = verify_bundle(root / "current")
    assert m.version == 1
    assert restarted_bundle(root, tmp_path).endswith("@1")
    # the next run cleans up after the killed one and completes the install
    again = helper(root, store["v2"])
    assert again.returncode == 0, again.stderr
    assert os.readlink(root / "current").endswith("-v2") and verify_bundle(root / "current").version == 2
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no .incoming-* / .current.*


@pytest.mark.parametrize("point", ["load:prepared", "load:swapped"])
def test_daemon_killed_mid_swap_restarts_on_the_last_good_bundle(store, point, tmp_path):
    """`ctl load` of v2 kills the daemon half way; `current` was never moved, so v1 serves after the restart
    (the installer only moves `current` once the daemon has answered the load: test_install.py)."""
    root = store["store"]
    assert helper(root, "--no-activate", store["v2"]).returncode == 0
    ctl, log = f"ipc://{tmp_path}/ctl", tmp_path / "daemon.log"
    argv = module_without_torch(
        "polymorphd.daemon.cli", "serve", "--bundle", str(root / "current"), "--source", SYNTH,
        "--pub", f"ipc://{tmp_path}/pub", "--ctl", ctl, "--fps", "20",
    )  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "POLYMORPHD_FAULT": point},
        )
        try:
            status = None
            for _ in range(300):  # up to 60 s on a busy 2-core runner
                status = request(ctl, {"cmd": "status"}, 0.2)
                if status or proc.poll() is not None:
                    break
            assert status and status["bundle"].endswith("@1"), log.read_text()[-3000:]
            v2 = root / store["name"].name.replace("-v1", "-v2")
            with ThreadPoolExecutor(1) as pool:  # the request waits for a reply that never comes
                reply = pool.submit(request, ctl, {"cmd": "load", "path": str(v2)}, 5)
                assert proc.wait(30) == -signal.SIGKILL
                assert reply.result() is None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert f"fault injection: SIGKILL at {point}" in log.read_text()
    assert os.readlink(root / "current") == str(store["name"])
    assert restarted_bundle(root, tmp_path).endswith("@1")


def test_a_bad_config_reload_keeps_the_old_config_serving(tmp_path):
    b1 = make_bundle(tmp_path / "bundles", "alpha", 1)
    cfg_file = tmp_path / "polymorphd.yaml"
    good = {
        "bundle": str(b1),
        "pub": f"ipc://{tmp_path}/pub",
        "ctl": f"ipc://{tmp_path}/ctl",
        "heartbeat_s": 0.5,
    }
    cfg_file.write_text(yaml.safe_dump(good))
    with running(load_config(cfg_file), FakeBackend(), config_path=str(cfg_file)) as d:
        before = d.cfg
        for bad, field in (("heartbeat_s: 9\n", "heartbeat_s"), ("{not yaml", "not valid YAML")):
            cfg_file.write_text(yaml.safe_dump(good) + bad if field != "not valid YAML" else bad)
            reply = request(d.control.address, {"cmd": "reload"}, 5)
            assert reply is not None and reply["ok"] is False and field in reply["error"], reply
            assert d.cfg is before and d.engine.bundle_id == "alpha@1"
        sub = Sub(d.publisher.address, "labels/")
        target = d.publisher.seq + 3
        seqs = [p["seq"] for _, p in sub.until(lambda t, p: p["seq"] >= target)]
        sub.close()
        assert seqs[-1] - seqs[0] == len(seqs) - 1  # still publishing, no gap


def test_a_bad_config_at_start_exits_non_zero_naming_the_field(tmp_path, capsys):
    b1 = make_bundle(tmp_path / "bundles", "alpha", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"bundle": str(b1), "reconnect": {"initial_s": -1}}))
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"config {bad}: reconnect.initial_s: " in err and "greater than 0" in err
