"""Baton: incremental backups of failover-cluster shared disks.

The change record travels with the disk, the way a relay baton travels with the runner.
"""

__version__ = "0.1.0"
