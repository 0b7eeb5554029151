#!/usr/bin/env bash
# Install polymorphd as a systemd service: a runtime-only virtualenv, the units, the example config,
# the bundle store and the polymorphd-install-bundle helper. See docs/deploy.md.
set -euo pipefail

here=$(cd -- "$(dirname -- "$0")" && pwd)
prog=$(basename -- "$0")

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/polymorphd}
python=${PYTHON:-python3}
source_dir=$(cd -- "$here/.." && pwd)
wheel=""
extras=""
pip_args=""
venv_args=""
unitdir=/etc/systemd/system
jetson=auto
bundle=""
link_bin=/usr/local/bin
create_user=auto
user=polymorphd

usage() {
  cat <<EOF
Usage: $prog [options]

Installs into \$DESTDIR\$PREFIX a virtualenv with polymorphd and its runtime dependencies only
(no torch), plus:
  \$DESTDIR/etc/systemd/system/polymorphd.service, polymorphd@.service (+ jetson.conf drop-ins on a Jetson)
  \$DESTDIR/etc/polymorphd/polymorphd.yaml   the example config, only if no config is there yet
  \$DESTDIR/var/lib/polymorphd/bundles       the bundle store ('current' symlink), trt-cache
  \$PREFIX/bin/polymorphd-install-bundle      verify + copy a bundle into the store, swap 'current'
As root without DESTDIR it also creates the system user '$user' and runs systemctl daemon-reload.
It never starts or enables the service: the last lines say how.

Options (environment variables DESTDIR, PREFIX and PYTHON work too):
  --prefix DIR         install prefix, the virtualenv (default: $PREFIX)
  --destdir DIR        stage everything under DIR (packaging, tests): no user, no systemctl
  --python PY          interpreter for the virtualenv (default: $python; >= 3.10)
  --source DIR         polymorphd source tree to pip install (default: $source_dir)
  --wheel FILE         pip install this wheel instead of the source tree (offline installs)
  --extras LIST        optional extras, comma-separated, e.g. jetson (default: none)
  --pip-args "ARGS"    extra pip install arguments, e.g. "--no-index --find-links /media/wheels"
  --venv-args "ARGS"   extra 'python -m venv' arguments, e.g. --system-site-packages (Jetson's
                       system onnxruntime-gpu / OpenCV with GStreamer, docs/jetson.md)
  --lib-units          install units into /lib/systemd/system instead of /etc/systemd/system
  --unitdir DIR        install units into DIR (under DESTDIR)
  --jetson|--no-jetson install the Jetson drop-in or not (default: when /etc/nv_tegra_release exists)
  --bundle DIR         also install this bundle into the store (polymorphd-install-bundle)
  --link-bin DIR       symlink polymorphd and the helper into DIR (default: $link_bin; 'none' to skip)
  --no-user            do not create the '$user' system user
  -h, --help           this text

An existing virtualenv at \$DESTDIR\$PREFIX is reused (upgrade in place).
EOF
}

die() { echo "$prog: error: $*" >&2; exit 1; }
say() { echo "$prog: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --destdir) DESTDIR=${2?--destdir needs a directory}; shift 2 ;;
    --python) python=${2:?--python needs an interpreter}; shift 2 ;;
    --source) source_dir=${2:?--source needs a directory}; shift 2 ;;
    --wheel) wheel=${2:?--wheel needs a file}; shift 2 ;;
    --extras) extras=${2?--extras needs a list}; shift 2 ;;
    --pip-args) pip_args=${2?--pip-args needs a string}; shift 2 ;;
    --venv-args) venv_args=${2?--venv-args needs a string}; shift 2 ;;
    --lib-units) unitdir=/lib/systemd/system; shift ;;
    --unitdir) unitdir=${2:?--unitdir needs a directory}; shift 2 ;;
    --jetson) jetson=yes; shift ;;
    --no-jetson) jetson=no; shift ;;
    --bundle) bundle=${2:?--bundle needs a directory}; shift 2 ;;
    --link-bin) link_bin=${2:?--link-bin needs a directory or none}; shift 2 ;;
    --no-user) create_user=no; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path, got '$PREFIX'" ;; esac
PREFIX=${PREFIX%/}
if [ -n "$DESTDIR" ]; then
  mkdir -p -- "$DESTDIR"
  DESTDIR=$(cd -- "$DESTDIR" && pwd)
fi
is_root=0; [ "$(id -u)" -eq 0 ] && is_root=1
if [ -z "$DESTDIR" ] && [ "$is_root" -eq 0 ]; then
  die "installing into / needs root: run with sudo, or stage with --destdir DIR"
fi
if [ "$create_user" = auto ]; then
  if [ -z "$DESTDIR" ] && [ "$is_root" -eq 1 ]; then create_user=yes; else create_user=no; fi
fi
if [ "$jetson" = auto ]; then
  if [ -e /etc/nv_tegra_release ]; then jetson=yes; else jetson=no; fi
fi
for f in polymorphd.service polymorphd@.service example.yaml jetson.conf polymorphd-install-bundle; do
  [ -f "$here/$f" ] || die "$here/$f is missing: run $prog from a polymorphd source tree"
done
if [ -n "$wheel" ]; then
  [ -f "$wheel" ] || die "wheel '$wheel' does not exist"
else
  [ -f "$source_dir/pyproject.toml" ] || die "'$source_dir' has no pyproject.toml; pass --source DIR or --wheel FILE"
fi
command -v "$python" >/dev/null 2>&1 || die "interpreter '$python' not found; pass --python"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$python is $("$python" -V 2>&1); polymorphd needs Python >= 3.10"

venv="$DESTDIR$PREFIX"
state="$DESTDIR/var/lib/polymorphd"
etc="$DESTDIR/etc/polymorphd"
units="$DESTDIR$unitdir"

# ---- user ------------------------------------------------------------------------------------------------
# A static system user rather than DynamicUser=: the camera needs the 'video' group (and 'jtop' for
# energy), and the bundle store must keep its owner across restarts and uninstalls.
if [ "$create_user" = yes ]; then
  if getent passwd "$user" >/dev/null; then
    say "user $user exists"
  else
    command -v useradd >/dev/null || die "useradd not found: create a system user '$user' by hand, then rerun with --no-user"
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    useradd --system --user-group --home-dir /var/lib/polymorphd --no-create-home \
      --shell "$nologin" --comment "polymorphd daemon" "$user"
    say "created system user $user"
  fi
  for g in video jtop; do
    if getent group "$g" >/dev/null; then usermod -a -G "$g" "$user"; say "$user is in group $g"; fi
  done
fi

# ---- virtualenv ------------------------------------------------------------------------------------------
if [ -x "$venv/bin/python" ]; then
  say "reusing the virtualenv at $venv"
else
  say "creating a virtualenv at $venv"
  mkdir -p -- "$(dirname -- "$venv")"
  # shellcheck disable=SC2086  # word splitting of the user's argument string is intended
  "$python" -m venv $venv_args "$venv"
fi
target=${wheel:-$source_dir}
[ -z "$extras" ] || target="${target}[${extras}]"
say "pip install $target (runtime dependencies only)"
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install --disable-pip-version-check --no-warn-script-location $pip_args "$target"

# pip writes '#!$DESTDIR$PREFIX/bin/python' into scripts. Replace it with a /bin/sh line that finds the
# python beside the script (pip's own trick for long paths), so the same tree runs both from the staging
# directory and at $PREFIX, and through the symlinks in $link_bin.
relocate() {
  local f first
  for f in "$venv"/bin/*; do
    if [ ! -f "$f" ] || [ -L "$f" ]; then continue; fi
    first=$(head -c 256 -- "$f" | head -n 1)
    case "$first" in
      "#!$venv/bin/python"*)
        { printf '%s\n' '#!/bin/sh' \
            "'''exec' \"\$(dirname -- \"\$(readlink -f -- \"\$0\")\")/python\" \"\$0\" \"\$@\"" \
            "' '''"
          tail -n +2 -- "$f"; } > "$f.tmp"
        chmod --reference="$f" -- "$f.tmp"
        mv -f -- "$f.tmp" "$f" ;;
    esac
  done
  if [ -n "$DESTDIR" ]; then  # informational paths: the tree's final place
    sed -i "s#$venv#$PREFIX#g" "$venv"/bin/activate* "$venv/pyvenv.cfg" 2>/dev/null || true
  fi
}
relocate
"$venv/bin/polymorphd" --help >/dev/null || die "the installed $venv/bin/polymorphd does not run (output above)"

sed "s#@PREFIX@#$PREFIX#g" "$here/polymorphd-install-bundle" > "$venv/bin/polymorphd-install-bundle"
chmod 0755 "$venv/bin/polymorphd-install-bundle"
docs="$venv/share/doc/polymorphd"
mkdir -p -- "$docs"
for d in deploy.md jetson.md; do
  [ ! -f "$source_dir/docs/$d" ] || install -m 0644 -- "$source_dir/docs/$d" "$docs/$d"
done
if [ "$link_bin" != none ]; then
  mkdir -p -- "$DESTDIR$link_bin"
  for b in polymorphd polymorphd-install-bundle; do
    ln -sfn -- "$PREFIX/bin/$b" "$DESTDIR$link_bin/$b"
  done
fi

# ---- units -----------------------------------------------------------------------------------------------
mkdir -p -- "$units"
for u in polymorphd.service polymorphd@.service; do
  sed "s#/opt/polymorphd/#$PREFIX/#g" "$here/$u" > "$units/$u.tmp"
  chmod 0644 "$units/$u.tmp"
  mv -f -- "$units/$u.tmp" "$units/$u"
  if [ "$jetson" = yes ]; then
    install -d -m 0755 -- "$units/$u.d"
    install -m 0644 -- "$here/jetson.conf" "$units/$u.d/jetson.conf"
  fi
done
if [ "$jetson" = yes ]; then say "units in $units, with the Jetson drop-in"; else say "units in $units"; fi

# ---- config ----------------------------------------------------------------------------------------------
install -d -m 0755 -- "$etc"
install -m 0644 -- "$here/example.yaml" "$etc/example.yaml"
if [ -e "$etc/polymorphd.yaml" ]; then
  say "kept the existing $etc/polymorphd.yaml (the new example is $etc/example.yaml)"
else
  install -m 0644 -- "$here/example.yaml" "$etc/polymorphd.yaml"
  say "config $etc/polymorphd.yaml (from the example: edit source, then --validate-config)"
fi

# ---- state: bundle store and TensorRT engine cache -------------------------------------------------------
install -d -m 0750 -- "$state" "$state/trt-cache"
install -d -m 0750 -- "$state/bundles"
if [ -z "$DESTDIR" ] && getent passwd "$user" >/dev/null; then
  chown "$user:$user" "$state" "$state/trt-cache"
  chown "root:$user" "$state/bundles"   # bundles are read-only to the daemon
fi

if [ -n "$bundle" ]; then
  "$venv/bin/polymorphd-install-bundle" --store "$state/bundles" --polymorphd "$venv/bin/polymorphd" "$bundle"
fi

# ---- systemd ---------------------------------------------------------------------------------------------
if [ -z "$DESTDIR" ]; then
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "systemctl daemon-reload done"
  else
    say "systemd is not running here: skipped daemon-reload"
  fi
fi

[ -e "$state/bundles/current" ] || say "no bundle yet: polymorphd-install-bundle /path/to/bundle"
say "done. Next: edit /etc/polymorphd/polymorphd.yaml, then"
say "  systemctl enable --now polymorphd      (or polymorphd@<name> with /etc/polymorphd/<name>.yaml)"
say "  systemctl status polymorphd; journalctl -u polymorphd -f"
