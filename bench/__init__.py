"""Baton's benchmark command: ``python -m bench`` (or ``make bench``).

It measures Baton side by side with restic, borg and the raw device, in one run on one machine, and writes
``bench/results/latest.json`` (every figure with its samples, the machine, tool versions and exact commands),
``bench/results/latest.md`` (a summary with ratios) and PNG plots under ``docs/img/``.

Modules, one per benchmark plus the shared kit:

- :mod:`bench.common`       process measurement (wall, block-layer bytes read, peak RSS), statistics, cold cache,
                            loop devices, machine and tool descriptions
- :mod:`bench.batonctl`     the ``baton`` CLI as the benchmarks drive it, with graceful "unavailable" rows
- :mod:`bench.peers`        restic and borg drivers
- :mod:`bench.diskgen`      test images with realistic content, chunk changes, device read/write rates
- :mod:`bench.fio`          fio jobs and their parsed results
- :mod:`bench.incremental`  1. incremental after A->B->C kill -9 takeovers
- :mod:`bench.tracking`     2. tracking cost per frontend
- :mod:`bench.full`         3. full backup, restore and verify
- :mod:`bench.scale`        4. attach and planning time against disk size, memory, snapshot metadata
- :mod:`bench.rollback`     5. rollback after 1 % changed against a full restore of the same snapshot
- :mod:`bench.guest`        6. the dm-era frontend in a QEMU TCG guest against dm-linear and a bare era stack
                            (only with ``--only guest``: it boots a guest of the VM test tier)
- :mod:`bench.report`       markdown summary, plots and the figures block of docs/performance.md

No benchmark asserts speed. A benchmark that cannot run a step records ``{"available": false, "error": ...}``
for that row and carries on.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
