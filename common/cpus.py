"""CPU-core pinning for engines and learner ranks on CPU machines (as they would hold separate GPUs)."""
from __future__ import annotations

import os


def parse_cpus(spec: str) -> set[int]:
    """"0,2-3" -> {0, 2, 3}."""
    out: set[int] = set()
    for part in str(spec).split(","):
        lo, _, hi = part.strip().partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def pin_to_cpus(spec: str) -> set[int]:
    """Restrict this process's current thread (and threads it starts later) to these cores."""
    cpus = parse_cpus(spec)
    missing = cpus - os.sched_getaffinity(0)
    if missing:
        raise ValueError(f"CPU cores {sorted(missing)} (from {spec!r}) are not available to this process; "
                         f"available: {sorted(os.sched_getaffinity(0))}")
    os.sched_setaffinity(0, cpus)
    return cpus
