#!/usr/bin/env bash
# Prepares this host for the agent and its tests, idempotently:
#   1. Debian packages (libvirt, QEMU, build tools for libvirt-python), only the missing ones;
#   2. container-friendly QEMU settings, only where no systemd runs (see below);
#   3. virtlogd and libvirtd, started if not running;
#   4. the Python virtual environment in .venv with the package and its test tools.
# Safe to run again and again; every step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils
  libvirt-dev pkg-config gcc   # libvirt-python is built against the host's libvirt
  nbdkit libnbd-bin            # NBD peers for the tests; nbdcopy for the benchmark
  nats-server                  # JetStream for the scheduler-message tests (started by them)
  libfuse3-3                   # mfusepy's library: the hung-filesystem fault test's FUSE mount
  prometheus                   # promtool (alert rule tests) and a real server (the alert test)
  python3-guestfs              # libguestfs for `backup-agent files` (its appliance VM) ...
  linux-image-cloud-amd64      # ... needs a kernel of the host's to boot
  e2fsprogs                    # mkfs.ext4 -d: the filesystem the `files` test backs up
)

say() { printf '==> %s\n' "$*" >&2; }

# A killed daemon can linger as a zombie until PID 1 reaps it; only live ones count.
running() { pgrep -x --runstates R,S,D,T "$1" >/dev/null; }

install_packages() {
  local missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  # A Python without venv or headers (Debian's own) needs its -venv and -dev packages.
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  [ -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
    || missing+=(python3-dev)
  [ ${#missing[@]} -eq 0 ] && return
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # No service starts from the packages' scripts (prometheus would start a server of its
  # own on :9090): the daemons the tests need are started below, or by the tests.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    # Never left behind, whatever ends the script (a failed download, Ctrl-C).
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ $made_policy -eq 1 ]; then
    rm -f "$policy"
    trap - EXIT
  fi
}

# Inside containers (no systemd) QEMU cannot use cgroups, namespaces or a security
# driver, and runs as root. On a host managed by systemd the file is left alone.
configure_qemu() {
  local conf=/etc/libvirt/qemu.conf
  [ -d /run/systemd/system ] && return
  local wanted=('cgroup_controllers = [ ]' 'security_driver = "none"' 'namespaces = [ ]'
                'user = "root"' 'group = "root"')
  local line missing=0
  for line in "${wanted[@]}"; do
    grep -qxF "$line" "$conf" || missing=1
  done
  [ $missing -eq 0 ] && return
  say "writing container settings to $conf"
  {
    echo "# libvirt-backup-agent: settings for hosts without systemd (containers)"
    printf '%s\n' "${wanted[@]}"
  } >>"$conf"
  if running libvirtd; then
    say "restarting libvirtd to apply them"
    pkill -x libvirtd
    while running libvirtd; do sleep 0.2; done
  fi
}

start_daemons() {
  if [ -d /run/systemd/system ]; then
    systemctl is-active --quiet libvirtd || systemctl start libvirtd
    return
  fi
  running virtlogd || { say "starting virtlogd"; virtlogd -d; }
  if ! running libvirtd; then
    say "starting libvirtd"
    libvirtd -d
  fi
  for _ in $(seq 1 150); do
    virsh -q -c qemu:///system version >/dev/null 2>&1 && return
    sleep 0.2
  done
  echo "libvirtd did not answer on qemu:///system within 30 s" >&2
  exit 1
}

python_env() {
  local stamp=.venv/.installed
  local want
  want=$(sha256sum <pyproject.toml | cut -d" " -f1)
  [ -x .venv/bin/python ] || { say "creating .venv"; python3 -m venv .venv; }
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return
  say "installing the package and its test tools into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  echo "$want" >"$stamp"
}

install_packages
configure_qemu
start_daemons
python_env
