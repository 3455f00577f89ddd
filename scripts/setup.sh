#!/usr/bin/env bash
# Install everything Baton and its tests need on a fresh Debian 12 machine, then the Python package.
#
# Usage: scripts/setup.sh [runtime|test|bench]
#   runtime  the tools Baton itself runs (FUSE, loop, blkid, mkfs, debugfs/xfs_db, NBD clients)
#   test     runtime + what the tests drive: fio, Pacemaker/Corosync, restic, borg, debootstrap and dpkg-dev
#            (the package test), prometheus (promtool, for the alert rules), and for the VM tier (tests/vm)
#            QEMU, dmsetup and thin-provisioning-tools (the guest kernel and busybox are fetched by the tier)
#   bench    test + plotting
#
# Idempotent and quiet: packages already present are not reinstalled, and the virtualenv at .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
level=${1:-runtime}

runtime_pkgs=(fuse3 libfuse3-3 util-linux e2fsprogs xfsprogs attr kmod qemu-utils libnbd-bin)
test_pkgs=(fio restic borgbackup pacemaker pacemaker-cli-utils corosync crmsh resource-agents iproute2 procps psmisc
           debootstrap dpkg-dev git prometheus)  # the packaging tier; promtool checks the alert rules
# The VM tier's guests run the host's userland (dmsetup, era_* tools) and boot a Debian kernel with a busybox
# initramfs that tests/vm/image.py builds from downloaded .debs (`apt-get download`: busybox-static is not
# installed here, it would replace the busybox package); without recommends (QEMU's include a GUI).
vm_pkgs=(qemu-system-x86 qemu-utils dmsetup thin-provisioning-tools)
pkgs=("${runtime_pkgs[@]}")
case "$level" in
  runtime) ;;
  test|bench) pkgs+=("${test_pkgs[@]}") ;;
  *) echo "setup.sh: unknown level '$level' (runtime|test|bench)" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: Baton drives loop devices, FUSE and mounts; run it as root, from a root shell: make demo, make test" >&2
  exit 1
fi

# On machines without systemd, package scripts must not start host-wide daemons (corosync, pacemaker).
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ "$level" != runtime ]; then
  missing=()
  for p in "${vm_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]} (VM tier)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends \
      "${missing[@]}" >/dev/null
  fi
fi

py=${PYTHON:-python3}
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup.sh: Baton needs Python 3.11 or newer ($py is $("$py" -V 2>&1))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
extra=""
case "$level" in test) extra="[test]" ;; bench) extra="[test,bench]" ;; esac
stamp=".setup-stamp-$level"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e ".$extra" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
  .venv/bin/python -c "import baton" 
  touch "$stamp"
fi
# The Pacemaker resource agent is installed where the cluster looks for ocf:baton:disk.
if [ -d /usr/lib/ocf/resource.d ] || [ "$level" != runtime ]; then
  install -D -m 755 packaging/ocf/disk /usr/lib/ocf/resource.d/baton/disk 2>/dev/null || true
fi
ln -sf "$PWD/.venv/bin/baton" /usr/local/bin/baton
