#!/bin/bash
# PID 1 of one test-cluster node. The harness starts it inside fresh mount, UTS, IPC and PID namespaces, already
# inside the node's network namespace:
#   ip netns exec NETNS unshare --mount --uts --ipc --pid --fork --kill-child node-init.sh NAME NODE_DIR OVERLAY_DIR
#
# It gives the node private copies of everything Pacemaker and Corosync keep per host (config, CIB, logs, /run,
# /dev/shm, /dev/baton), overlays the test fence agent and the OCF agents under test read-only, starts corosync
# and pacemakerd, then becomes the node's reaper. SIGKILL to this process (from the host) kills the whole node,
# like pulling its power: the kernel kills every process in the PID namespace and drops its mounts.
set -u
name=$1 nd=$2 ov=$3

fail() { echo "node-init[$name]: $*" >&2; exit 1; }

# Nothing we mount here may leak back to the host or to sibling nodes.
mount --make-rprivate / || fail "make-rprivate"
hostname "$name"
mount -t proc proc /proc || fail "proc"
# /run holds corosync.pid, the resource-agent state (/run/resource-agents) and Baton's run dir; /dev/shm holds
# libqb's ring buffers, whose names repeat across nodes because the PIDs do; /dev/baton holds the device links.
mount -t tmpfs -o mode=755 tmpfs /run || fail "/run"
mount -t tmpfs -o mode=1777 tmpfs /dev/shm || fail "/dev/shm"
mount -t tmpfs -o mode=755 tmpfs /dev/baton || fail "/dev/baton"
for d in etc/corosync var/lib/corosync var/lib/pacemaker var/log/pacemaker var/log/corosync; do
    mount --bind "$nd/$d" "/$d" || fail "bind /$d"
done
# Read-only overlays add the test fence agent and the OCF agents under test without touching /usr.
mount -t overlay overlay -o "lowerdir=$ov/sbin:/usr/sbin" /usr/sbin || fail "overlay /usr/sbin"
mount -t overlay overlay -o "lowerdir=$ov/ocf:/usr/lib/ocf/resource.d" /usr/lib/ocf/resource.d \
    || fail "overlay resource.d"
mkdir -p /run/resource-agents /run/crm /run/pacemaker
chown hacluster:haclient /run/crm /run/pacemaker 2>/dev/null
ip link set lo up

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
corosync -f >/var/log/corosync/stdout.log 2>&1 &
ok=0
for _ in $(seq 1 200); do
    if corosync-cmapctl totem.cluster_name >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.05
done
[ $ok = 1 ] || fail "corosync did not answer within 10 s"
# No syslog and no systemd in the node: pacemaker logs to its own file.
PCMK_logfile=/var/log/pacemaker/pacemaker.log PCMK_logfacility=none PCMK_debug=no \
    pacemakerd >/var/log/pacemaker/stdout.log 2>&1 &
echo "$$ $(date +%s.%N)" > "$nd/started"

# Become the reaper: orphans of the node are reparented to us and must be waited for.
exec python3 -c '
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
    except InterruptedError:
        pass
'
