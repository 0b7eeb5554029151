#!/usr/bin/env bash
# Remove what install.sh installed. Config (/etc/polymorphd) and state (bundles, TensorRT cache) stay
# unless --purge: they are the operator's, not the package's.
set -euo pipefail

prog=$(basename -- "$0")
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/polymorphd}
link_bin=/usr/local/bin
purge=0
user=polymorphd

usage() {
  cat <<EOF
Usage: $prog [options]

Stops and disables polymorphd.service and every polymorphd@*.service (without DESTDIR, when systemd
runs), removes the units and their jetson.conf drop-ins from /etc/systemd/system and /lib/systemd/system,
the virtualenv \$DESTDIR\$PREFIX and the symlinks in $link_bin. Keeps /etc/polymorphd and /var/lib/polymorphd.

Options (DESTDIR and PREFIX from the environment work too):
  --prefix DIR      install prefix (default: $PREFIX)
  --destdir DIR     staged tree to clean (no systemctl, no user removal)
  --link-bin DIR    where install.sh put its symlinks (default: $link_bin; 'none' to skip)
  --purge           also remove /etc/polymorphd, /var/lib/polymorphd (bundles!) and the '$user' user
  -h, --help        this text
EOF
}

die() { echo "$prog: error: $*" >&2; exit 1; }
say() { echo "$prog: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --destdir) DESTDIR=${2?--destdir needs a directory}; shift 2 ;;
    --link-bin) link_bin=${2:?--link-bin needs a directory or none}; shift 2 ;;
    --purge) purge=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case "$PREFIX" in /?*) ;; *) die "--prefix must be an absolute path other than /, got '$PREFIX'" ;; esac
PREFIX=${PREFIX%/}
if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
  die "uninstalling from / needs root: run with sudo, or pass --destdir DIR"
fi
[ -z "$DESTDIR" ] || [ -d "$DESTDIR" ] || die "--destdir '$DESTDIR' does not exist"

systemd_up=0
[ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && systemd_up=1
if [ "$systemd_up" -eq 1 ]; then
  mapfile -t instances < <(systemctl list-units --all --plain --no-legend 'polymorphd@*.service' | awk '{print $1}')
  for u in polymorphd.service "${instances[@]}"; do
    if systemctl disable --now "$u" >/dev/null 2>&1; then say "stopped and disabled $u"; fi
  done
  # Enabled instances that are not loaded right now still have WantedBy symlinks.
  rm -f /etc/systemd/system/multi-user.target.wants/polymorphd@*.service
fi

for dir in "$DESTDIR/etc/systemd/system" "$DESTDIR/lib/systemd/system"; do
  for u in polymorphd.service polymorphd@.service; do
    if [ -e "$dir/$u" ] || [ -d "$dir/$u.d" ]; then
      rm -f -- "$dir/$u" "$dir/$u.d/jetson.conf"
      rmdir -- "$dir/$u.d" 2>/dev/null || true
      say "removed $dir/$u"
    fi
  done
done
[ "$systemd_up" -eq 0 ] || systemctl daemon-reload

venv="$DESTDIR$PREFIX"
if [ -e "$venv" ]; then
  # Only delete what looks like our virtualenv: a wrong --prefix must not wipe an unrelated tree.
  if [ ! -f "$venv/pyvenv.cfg" ] || [ ! -e "$venv/bin/polymorphd" ]; then
    die "$venv is not a polymorphd virtualenv (no pyvenv.cfg or bin/polymorphd); check --prefix"
  fi
  rm -rf -- "$venv"
  say "removed $venv"
fi
if [ "$link_bin" != none ]; then
  for b in polymorphd polymorphd-install-bundle; do
    l="$DESTDIR$link_bin/$b"
    if [ -L "$l" ] && [ "$(readlink -- "$l")" = "$PREFIX/bin/$b" ]; then rm -f -- "$l"; say "removed $l"; fi
  done
fi

if [ "$purge" -eq 1 ]; then
  rm -rf -- "$DESTDIR/etc/polymorphd" "$DESTDIR/var/lib/polymorphd"
  say "purged $DESTDIR/etc/polymorphd and $DESTDIR/var/lib/polymorphd"
  if [ -z "$DESTDIR" ] && getent passwd "$user" >/dev/null; then
    userdel "$user" && say "removed user $user"
  fi
else
  say "kept $DESTDIR/etc/polymorphd and $DESTDIR/var/lib/polymorphd (--purge removes them)"
fi
