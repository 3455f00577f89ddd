"""Cluster integration: ownership signals for watch mode (:mod:`baton.cluster.watch`: the probe write, which
mount and udev events concern a disk). The Pacemaker resource agent is packaging/ocf/disk, a shell script that
drives the `baton` CLI. Attaching and serving a disk is the per-disk daemon's job: :mod:`baton.daemon`."""
