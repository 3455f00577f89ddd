"""What every benchmark gets: scratch space, the Baton driver, the cache dropper, sizes and a logger."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.batonctl import Baton
from bench.common import WARM, ColdCache


@dataclass
class Context:
    """Shared, mutable run state. ``smoke`` selects tiny sizes; ``size`` is the main disk image size."""

    scratch: Path
    baton: Baton
    cold: ColdCache
    size: int
    reps: int
    smoke: bool
    seed: int = 20261124
    scratch_device: str = ""
    started: float = field(default_factory=time.monotonic)

    def log(self, msg: str) -> None:
        """Progress goes to stderr, with seconds since the run started."""
        print(f"[bench {time.monotonic() - self.started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def subdir(self, name: str) -> Path:
        d = self.scratch / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def cold_for(self, tool: str, step: str, *paths: Path) -> None:
        """Cold data cache before timing ``tool``'s ``step``, with the tool's program files warmed."""
        if tool == "baton":
            self.cold(*paths, warm=self.baton.warm_commands(step), env=self.baton.env)
        else:
            self.cold(*paths, warm=WARM.get(tool, []))
