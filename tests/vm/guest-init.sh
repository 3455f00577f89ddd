#!/bin/busybox sh
# PID 1 of a Baton VM test guest (tests/vm/README.md). Built into the initramfs by tests/vm/image.py.
#
# 1. mounts proc, sys, devtmpfs, tmpfs on /run and /tmp; creates /dev/fd; enables SysRq;
# 2. loads the modules listed in /etc/baton-vm/modules, in order (dependencies first, crc32c before libcrc32c);
# 3. mounts the host's / read-only over 9p at /host (cache=loose) and the harness's share read-write at
#    /mnt/share; mounts the guest's scratch disk (virtio serial "scratch", ext4, made by the harness) at
#    /scratch and binds it onto /host/var/tmp; binds its own root at /mnt/guest; rbinds /proc /sys /dev /run
#    /tmp /mnt into /host;
# 4. runs the agent: every JOB.job file the harness drops into /mnt/share/agent/NAME/ is renamed JOB.run and
#    run as `chroot /host /bin/sh JOB.run` in its own session (in the background, so jobs may overlap or stay
#    running); stdout and stderr go to JOB.out and JOB.err, the exit status to JOB.rc (written last, by rename).
#    The file "poweroff" in that directory makes it sync and power the guest off.
#
# Kernel command line: baton_vm.name=NAME (the hostname and the agent directory); baton_vm.checkout=PATH (the
# checkout, shared as "checkout" and mounted at its host path); baton_vm.hostroot=OPTS
# (9p mount options of the host root instead of cache=loose).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
echo 1 > /proc/sys/kernel/sysrq

say() { echo "baton-vm: $*" > /dev/console; }
fail() {
  say "FATAL: $*"
  echo "$*" > /mnt/share/agent/"$NAME"/failed 2>/dev/null
  sync
  poweroff -f
}

NAME=guest
CHECKOUT=
HOSTROOT_OPTS=cache=loose  # the host's root is read-only and exclusive to this use: cache all of it
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    baton_vm.name=*) NAME=${arg#baton_vm.name=} ;;
    baton_vm.hostroot=*) HOSTROOT_OPTS=${arg#baton_vm.hostroot=} ;;
    baton_vm.checkout=*) CHECKOUT=${arg#baton_vm.checkout=} ;;
  esac
done
hostname "$NAME"
ip link set lo up

say "init at $(cut -d' ' -f1 /proc/uptime) s"
release=$(cat /etc/baton-vm/release)
while read -r ko kind; do
  out=$(insmod "/lib/modules/$release/$ko" 2>&1) || case "$out" in
    *"File exists"*) ;;
    *) [ "$kind" = optional ] || say "insmod $ko: $out" ;;
  esac
done < /etc/baton-vm/modules

say "modules loaded at $(cut -d' ' -f1 /proc/uptime) s"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro${HOSTROOT_OPTS:+,$HOSTROOT_OPTS} hostroot /host || fail "cannot mount the host root"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /mnt/share || fail "cannot mount the share"
AGENT=/mnt/share/agent/$NAME
[ -d "$AGENT" ] || fail "no agent directory $AGENT in the share"

# Disks: /dev/disk/by-id/virtio-SERIAL links (there is no udev); the scratch disk is mounted at /scratch.
mkdir -p /dev/disk/by-id
scratch=
for b in /sys/block/vd*; do
  [ -e "$b/serial" ] || continue
  s=$(cat "$b/serial")
  [ -n "$s" ] && ln -sf "../../${b##*/}" "/dev/disk/by-id/virtio-$s"
  [ "$s" = scratch ] && scratch=/dev/${b##*/}
done
[ -n "$scratch" ] || fail "no scratch disk (virtio serial 'scratch')"
mount -t ext4 "$scratch" /scratch || fail "cannot mount the scratch disk $scratch"
mkdir -p /scratch/baton-spill /scratch/baton-cache /scratch/home
chmod 1777 /scratch

# The guest's own root (busybox, the guest kernel's modules: the host's /lib/modules is for another kernel), for
# `chroot /mnt/guest modprobe xfs` from inside the chroot.
mkdir -p /mnt/guest
mount -o bind / /mnt/guest || fail "cannot bind / onto /mnt/guest"
for d in proc sys dev run tmp mnt; do
  mount -o rbind "/$d" "/host/$d" || fail "cannot bind /$d into /host"
done
mount -o bind /scratch /host/var/tmp || fail "cannot bind /scratch onto /host/var/tmp"
# The checkout (and its venv) at its host path, over whatever the binds above put there (a clone under /tmp).
if [ -n "$CHECKOUT" ]; then
  mkdir -p "/host$CHECKOUT" 2>/dev/null
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro${HOSTROOT_OPTS:+,$HOSTROOT_OPTS} checkout \
    "/host$CHECKOUT" || fail "cannot mount the checkout at $CHECKOUT"
fi


uptime=$(cut -d' ' -f1 /proc/uptime)
echo "$uptime" > "$AGENT/ready.tmp" && mv "$AGENT/ready.tmp" "$AGENT/ready"
say "ready after ${uptime} s"

# The agent loop: a job runs in its own session (its JOB.run writes its PID to JOB.pid first), so the harness
# can kill it and everything it started that stayed in its process group. Each job is double-forked so that it
# is a child of PID 1, which does nothing but reap: a killed daemon must not linger as a zombie (a zombie still
# answers kill -0, and Baton checks daemons' liveness that way).
agent() {
  while :; do
    for job in "$AGENT"/*.job; do
      [ -e "$job" ] || continue
      base=${job%.job}
      mv "$job" "$base.run" || continue
      ( (
        setsid chroot /host /bin/sh "$base.run" < /dev/null > "$base.out" 2> "$base.err"
        echo $? > "$base.rc.tmp"
        mv "$base.rc.tmp" "$base.rc"
      ) & )
    done
    if [ -e "$AGENT/poweroff" ]; then
      say "power off"
      sync
      umount /host/var/tmp 2>/dev/null
      umount /scratch 2>/dev/null
      sync
      poweroff -f
    fi
    sleep 0.05
  done
}
agent &
while :; do
  wait
  say "the agent loop ended; restarting it"
  agent &
done
