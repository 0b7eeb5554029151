"""install.sh / uninstall.sh into a DESTDIR, and the bundle store helper polymorphd-install-bundle.

The installs run offline: the virtualenv is pre-created with a .pth file pointing at this environment's
site-packages (install.sh reuses an existing venv), and pip gets --no-deps --no-build-isolation --no-index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
PIP_OFFLINE = "--no-deps --no-build-isolation --no-index -q"


def sh(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def source_copy(dest: Path) -> Path:
    """What pip needs to build polymorphd; a copy, so pip's in-tree build/ never lands in the checkout."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for pkg in ("daemon", "models", "export"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "docs", dest / "docs")
    return dest


def offline_venv(venv: Path) -> None:
    """A venv that sees this environment's packages (pip, setuptools, numpy, ...) but not its polymorphd."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = next((venv / "lib").glob("python3*/site-packages"))
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_polymorphd_test_reuse.pth").write_text("\n".join(sorted(paths)) + "\n")


def install(
    destdir: Path, src: Path, *extra: str, prefix: str = "/opt/polymorphd"
) -> subprocess.CompletedProcess:
    venv = destdir / prefix.lstrip("/")
    if not venv.exists():
        offline_venv(venv)
    return sh(
        SYSTEMD / "install.sh",
        "--destdir",
        destdir,
        "--prefix",
        prefix,
        "--source",
        src,
        "--pip-args",
        PIP_OFFLINE,
        *extra,
    )


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return source_copy(tmp_path_factory.mktemp("src") / "polymorphd")


@pytest.fixture(scope="module")
def staged(tmp_path_factory, src) -> tuple[Path, subprocess.CompletedProcess]:
    dest = tmp_path_factory.mktemp("stage")
    return dest, install(dest, src, "--no-jetson")


@pytest.mark.slow
def test_destdir_install_produces_the_tree(staged) -> None:
    dest, proc = staged
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rel in (
        "etc/systemd/system/polymorphd.service",
        "etc/systemd/system/polymorphd@.service",
        "etc/polymorphd/polymorphd.yaml",
        "etc/polymorphd/example.yaml",
        "opt/polymorphd/bin/polymorphd-install-bundle",
        "opt/polymorphd/share/doc/polymorphd/deploy.md",
        "opt/polymorphd/share/doc/polymorphd/jetson.md",
    ):
        assert (dest / rel).is_file(), rel
    assert (dest / "var/lib/polymorphd/bundles").is_dir() and (dest / "var/lib/polymorphd/trt-cache").is_dir()
    assert not (dest / "etc/systemd/system/polymorphd.service.d").exists()  # --no-jetson
    assert (dest / "etc/polymorphd/polymorphd.yaml").read_text() == (SYSTEMD / "example.yaml").read_text()
    assert os.readlink(dest / "usr/local/bin/polymorphd") == "/opt/polymorphd/bin/polymorphd"
    assert "no bundle yet" in proc.stdout
    # DESTDIR mode never touches the host: no user, no systemctl.
    assert "created system user" not in proc.stdout and "daemon-reload" not in proc.stdout


@pytest.mark.slow
def test_staged_entry_point_runs_and_is_the_installed_copy(staged) -> None:
    dest, _ = staged
    venv = dest / "opt/polymorphd"
    proc = sh(venv / "bin/polymorphd", "--help")
    assert proc.returncode == 0 and "usage: polymorphd" in proc.stdout, proc.stderr
    where = sh(venv / "bin/python", "-c", "import polymorphd.daemon.cli as c; print(c.__file__)")
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    # The script finds the python beside it, so the tree also runs once moved from DESTDIR to PREFIX.
    assert (venv / "bin/polymorphd").read_text().startswith("#!/bin/sh\n'''exec' ")
    assert str(dest) not in (venv / "pyvenv.cfg").read_text()
    assert "@PREFIX@" not in (venv / "bin/polymorphd-install-bundle").read_text()


@pytest.mark.slow
def test_reinstall_keeps_an_edited_config_and_adds_jetson_drop_ins(staged, src) -> None:
    dest, _ = staged
    config = dest / "etc/polymorphd/polymorphd.yaml"
    config.write_text("camera: dock\n")
    proc = install(dest, src, "--jetson")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reusing the virtualenv" in proc.stdout and "kept the existing" in proc.stdout
    assert config.read_text() == "camera: dock\n"
    for unit in ("polymorphd.service", "polymorphd@.service"):
        drop_in = dest / f"etc/systemd/system/{unit}.d/jetson.conf"
        assert drop_in.read_text() == (SYSTEMD / "jetson.conf").read_text()


@pytest.mark.slow
def test_prefix_is_written_into_the_units(tmp_path, src) -> None:
    proc = install(tmp_path, src, "--no-jetson", "--lib-units", "--link-bin", "none", prefix="/srv/pmd")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    unit = (tmp_path / "lib/systemd/system/polymorphd.service").read_text()
    assert "ExecStart=/srv/pmd/bin/polymorphd serve --config /etc/polymorphd/polymorphd.yaml" in unit
    assert "/opt/polymorphd" not in unit
    assert not (tmp_path / "etc/systemd").exists() and not (tmp_path / "usr").exists()
    assert sh(tmp_path / "srv/pmd/bin/polymorphd", "--help").returncode == 0
    helper = (tmp_path / "srv/pmd/bin/polymorphd-install-bundle").read_text()
    assert 'PREFIX_DEFAULT="/srv/pmd"' in helper


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frobnicate"], "unknown argument '--frobnicate'"),
        (["--prefix", "opt/x"], "--prefix must be an absolute path"),
        (["--wheel", "/nonexistent/polymorphd.whl"], "wheel '/nonexistent/polymorphd.whl' does not exist"),
        (["--source", "/"], "'/' has no pyproject.toml"),
        (["--python", "no-such-python3"], "interpreter 'no-such-python3' not found"),
    ],
)
def test_install_refuses_bad_arguments_before_touching_anything(tmp_path, args, message) -> None:
    proc = sh(SYSTEMD / "install.sh", "--destdir", tmp_path / "d", *args)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "d" / "opt").exists()


def test_help_describes_the_options() -> None:
    for script in ("install.sh", "uninstall.sh", "polymorphd-install-bundle"):
        proc = sh(SYSTEMD / script, "--help")
        assert proc.returncode == 0 and proc.stdout.startswith("Usage: "), script
    assert "--pip-args" in sh(SYSTEMD / "install.sh", "--help").stdout


@pytest.mark.slow
def test_uninstall_removes_the_install_and_keeps_config_and_state(tmp_path, src) -> None:
    assert install(tmp_path, src, "--jetson").returncode == 0
    (tmp_path / "var/lib/polymorphd/bundles/b-v1").mkdir()
    proc = sh(SYSTEMD / "uninstall.sh", "--destdir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "opt/polymorphd").exists()
    assert not list((tmp_path / "etc/systemd/system").iterdir())
    assert not (tmp_path / "usr/local/bin/polymorphd").is_symlink()
    assert (tmp_path / "etc/polymorphd/polymorphd.yaml").exists() and (
        tmp_path / "var/lib/polymorphd/bundles/b-v1"
    ).exists()
    proc = sh(SYSTEMD / "uninstall.sh", "--destdir", tmp_path, "--purge")
    assert proc.returncode == 0 and not (tmp_path / "etc/polymorphd").exists()
    assert not (tmp_path / "var/lib/polymorphd").exists()


def test_uninstall_refuses_a_prefix_that_is_not_our_venv(tmp_path) -> None:
    (tmp_path / "opt/other/bin").mkdir(parents=True)
    proc = sh(SYSTEMD / "uninstall.sh", "--destdir", tmp_path, "--prefix", "/opt/other")
    assert proc.returncode == 1 and "is not a polymorphd virtualenv" in proc.stderr
    assert (tmp_path / "opt/other/bin").is_dir()


# ---- polymorphd-install-bundle with a stand-in verifier ------------------------------------------------------
FAKE_POLYMORPHD = """#!/bin/sh
# Stand-in for `polymorphd bundle verify` / `polymorphd ctl`: logs each call; a bundle with a BAD file fails.
echo "$*" >> "$(dirname "$0")/calls.log"
if [ "$1 $2" = "bundle verify" ]; then
  if [ -e "$3/BAD" ]; then echo "error: $3/BAD: sha256 mismatch" >&2; exit 2; fi
  exit 0
fi
if [ "$1" = ctl ]; then
  if [ -e "$(dirname "$0")/ctl-refuses" ]; then echo '{"ok": false, "error": "input size mismatch"}'; exit 1; fi
  exit 0
fi
exit 3
"""


@pytest.fixture
def store(tmp_path) -> Path:
    (tmp_path / "store").mkdir()
    fake = tmp_path / "bin" / "polymorphd"
    fake.parent.mkdir()
    fake.write_text(FAKE_POLYMORPHD)
    fake.chmod(0o755)
    return tmp_path / "store"


def make_bundle(path: Path, bundle_id: str = "tiny", version: int = 1, bad: bool = False) -> Path:
    (path / "adapters").mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"bundle_id": bundle_id, "version": version}))
    (path / "seg0.onnx").write_bytes(b"onnx")
    (path / "adapters" / "ctx0.onnx_adapter").write_bytes(b"lora")
    if bad:
        (path / "BAD").write_text("")
    return path


def helper(store: Path, *args: str | Path) -> subprocess.CompletedProcess:
    fake = store.parent / "bin" / "polymorphd"
    return sh(SYSTEMD / "polymorphd-install-bundle", "--store", store, "--polymorphd", fake, *args)


def calls(store: Path) -> list[str]:
    log = store.parent / "bin" / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_helper_stores_verifies_the_copy_and_points_current_at_it(store, tmp_path) -> None:
    src = make_bundle(tmp_path / "in" / "b1", "tiny", 1)
    proc = helper(store, src)
    assert proc.returncode == 0, proc.stderr
    dest = store / "tiny-v1"
    assert (dest / "adapters" / "ctx0.onnx_adapter").read_bytes() == b"lora"
    assert os.readlink(store / "current") == "tiny-v1"  # relative: the store can move (DESTDIR)
    verified = [c.split()[2] for c in calls(store) if c.startswith("bundle verify")]
    assert verified[0] == str(src) and verified[1].startswith(f"{store}/.incoming-tiny-v1.")
    assert sorted(p.name for p in store.iterdir()) == ["current", "tiny-v1"]  # no temporaries left
    assert "hot-swap with: polymorphd ctl" in proc.stdout


def test_helper_swaps_current_to_a_newer_bundle_and_keeps_the_old(store, tmp_path) -> None:
    helper(store, make_bundle(tmp_path / "b1", "tiny", 1))
    proc = helper(store, make_bundle(tmp_path / "b2", "tiny", 2), "--ctl", "ipc:///run/polymorphd/ctl.sock")
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(store / "current") == "tiny-v2" and (store / "tiny-v1").is_dir()
    assert (
        calls(store)[-1]
        == f"ctl --endpoint ipc:///run/polymorphd/ctl.sock --timeout 300 load {store}/tiny-v2"
    )


def test_helper_leaves_current_alone_when_the_daemon_refuses_the_hot_swap(store, tmp_path) -> None:
    helper(store, make_bundle(tmp_path / "b1", "tiny", 1))
    (store.parent / "bin" / "ctl-refuses").touch()
    proc = helper(store, "--ctl", "ipc:///run/polymorphd/ctl.sock", make_bundle(tmp_path / "b2", "tiny", 2))
    assert proc.returncode == 1 and "'current' is unchanged" in proc.stderr
    assert "input size mismatch" in proc.stdout
    assert os.readlink(store / "current") == "tiny-v1" and (store / "tiny-v2").is_dir()


def test_helper_refuses_a_bundle_that_fails_verification(store, tmp_path) -> None:
    helper(store, make_bundle(tmp_path / "good", "tiny", 1))
    proc = helper(store, make_bundle(tmp_path / "bad", "tiny", 2, bad=True))
    assert proc.returncode == 1
    assert "sha256 mismatch" in proc.stderr and "nothing installed" in proc.stderr
    assert os.readlink(store / "current") == "tiny-v1"
    assert sorted(p.name for p in store.iterdir()) == ["current", "tiny-v1"]


def test_helper_with_no_activate_leaves_current_alone(store, tmp_path) -> None:
    helper(store, make_bundle(tmp_path / "b1", "tiny", 1))
    assert helper(store, "--no-activate", make_bundle(tmp_path / "b2", "tiny", 2)).returncode == 0
    assert os.readlink(store / "current") == "tiny-v1" and (store / "tiny-v2").is_dir()


def test_helper_reinstalling_the_same_version_reverifies_the_stored_copy(store, tmp_path) -> None:
    src = make_bundle(tmp_path / "b1", "tiny", 1)
    helper(store, src)
    (store / "tiny-v1" / "BAD").write_text("")  # the stored copy went bad since
    proc = helper(store, src)
    assert proc.returncode == 1 and "stored copy" in proc.stderr and "remove it" in proc.stderr


def test_helper_with_a_key_never_moves_current_to_an_older_version(store, tmp_path) -> None:
    key = tmp_path / "bundle.key.pub"
    key.write_text("stand-in: the fake verifier accepts any key")
    assert helper(store, "--pubkey", key, make_bundle(tmp_path / "b2", "tiny", 2)).returncode == 0
    older = make_bundle(tmp_path / "b1", "tiny", 1)
    proc = helper(store, "--pubkey", key, older)
    assert proc.returncode == 1 and "version 1 is older than current's 2" in proc.stderr
    assert os.readlink(store / "current") == "tiny-v2"
    assert helper(store, "--pubkey", key, "--allow-older", older).returncode == 0  # an intended rollback
    assert os.readlink(store / "current") == "tiny-v1"
    assert helper(store, make_bundle(tmp_path / "b0", "tiny", 0)).returncode == 0  # no key: no version rule


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "is not a directory"),
        ("no-manifest", "has no manifest.json"),
        ("no-store", "bundle store"),
    ],
)
def test_helper_explains_what_is_wrong(store, tmp_path, setup, message) -> None:
    target = tmp_path / "x"
    if setup == "no-manifest":
        target.mkdir()
    if setup == "no-store":
        make_bundle(target)
        shutil.rmtree(store)
    proc = helper(store, target)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


# ---- the installed tree end to end: real bundle, real verifier, the daemon as the unit runs it ---------------
# The unit's MemoryDenyWriteExecute=yes, reproduced with PR_SET_MDWE (inherited across exec) where the kernel has it.
MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0 and sys.argv[1] == 'strict':\n"
    "    raise SystemExit('PR_SET_MDWE refused')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def notify_socket(path: Path):
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(60)
    return sock


def wait_for(sock, word: str) -> list[str]:
    """Datagrams until one contains word (each recv bounded by the socket timeout)."""
    seen = []
    while not seen or word not in seen[-1]:
        seen.append(sock.recv(4096).decode())
    return seen


@pytest.mark.slow
def test_store_to_running_daemon_with_hot_swap_reload_and_stop(staged, tiny_run, tmp_path) -> None:
    export = pytest.importorskip("polymorphd.export.bundle")
    pytest.importorskip("polymorphd.daemon.app")
    zmq = pytest.importorskip("zmq")
    import signal

    dest, _ = staged
    venv, store = dest / "opt/polymorphd", dest / "var/lib/polymorphd/bundles"
    polymorphd, install_bundle = venv / "bin/polymorphd", venv / "bin/polymorphd-install-bundle"
    v1 = export.export_bundle(tiny_run, tmp_path / "v1", progress=False)
    manifest = json.loads((v1 / "manifest.json").read_text())
    v2 = Path(
        shutil.copytree(v1, tmp_path / "v2")
    )  # the next version of the same export (manifest is not hashed)
    (v2 / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    bad = Path(shutil.copytree(v1, tmp_path / "bad"))
    (bad / manifest["segments"][0]).write_bytes(b"not the exported graph")

    refused = sh(install_bundle, "--store", store, bad)
    assert refused.returncode == 1 and manifest["segments"][0] in refused.stdout + refused.stderr
    assert not (store / "current").exists()
    assert sh(install_bundle, "--store", store, v1).returncode == 0
    name = f"{manifest['bundle_id']}-v1"
    assert os.readlink(store / "current") == name

    ctl = f"ipc://{tmp_path}/ctl.sock"
    config = tmp_path / "cam.yaml"
    config.write_text(
        "camera: e2e\nsource: 'synthetic:?seed=1&classes=10&contexts=3'\n"
        f"bundle: {store}/current\npub: ipc://{tmp_path}/pub.sock\nctl: {ctl}\n"
        "source_fps: 15\nthreads: 1\n"  # leave CPU for the test and the loads on a 2-core runner
    )
    notify = notify_socket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"}
    daemon = subprocess.Popen(
        [sys.executable, "-c", MDWE_EXEC, "lenient", str(polymorphd), "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ctx = zmq.Context()
    try:
        assert "STATUS=" in wait_for(notify, "READY=1")[-1]
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVTIMEO, 30_000)
        sub.setsockopt(zmq.SUBSCRIBE, b"labels/e2e")
        sub.connect(f"ipc://{tmp_path}/pub.sock")
        topic, payload = sub.recv_multipart()
        assert topic == b"labels/e2e" and json.loads(payload)["bundle"] == f"{manifest['bundle_id']}@1"
        wait_for(notify, "WATCHDOG=1")

        swap = sh(install_bundle, "--store", store, "--ctl", ctl, v2)  # hot swap through the control channel
        assert swap.returncode == 0, swap.stdout + swap.stderr
        assert os.readlink(store / "current") == f"{manifest['bundle_id']}-v2"
        status = sh(polymorphd, "ctl", "--endpoint", ctl, "status")
        assert status.returncode == 0 and json.loads(status.stdout)["bundle"] == f"{manifest['bundle_id']}@2"

        daemon.send_signal(signal.SIGHUP)  # systemctl reload
        assert "MONOTONIC_USEC=" in wait_for(notify, "RELOADING=1")[-1]
        wait_for(notify, "READY=1")
        status = sh(
            polymorphd, "ctl", "--endpoint", ctl, "status"
        )  # same config: the hot-swapped bundle stays
        assert json.loads(status.stdout)["bundle"] == f"{manifest['bundle_id']}@2"
        daemon.send_signal(signal.SIGTERM)  # systemctl stop
        assert daemon.wait(timeout=30) == 0, daemon.stderr.read()[-3000:]
        assert "STOPPING=1" in "".join(wait_for(notify, "STOPPING=1"))
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        ctx.destroy(linger=0)
        notify.close()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shell_scripts_pass_shellcheck() -> None:
    scripts = [SYSTEMD / s for s in ("install.sh", "uninstall.sh", "polymorphd-install-bundle")]
    proc = sh("shellcheck", *scripts)
    assert proc.returncode == 0, proc.stdout
