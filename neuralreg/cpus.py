"""The CPUs this process may use (its affinity mask and its cgroup's CPU quota), and whether
a run shares them with other processes by default.

``os.cpu_count()`` counts the machine's CPUs; a job on a cluster node or in a container
often gets fewer (``taskset``, SLURM's ``--cpus-per-task``, Docker's ``--cpus``). Threads
beyond what the process may use wait on each other, and OpenMP threads that spin while they
wait turn that into a collapse. The command line sizes its thread pools by
``available_cpus()``; a run's ``optim.threads.CpuShare`` watches the CPUs of
``process_cpus()``.

This module imports no torch: the command line reads ``shares_cpus_by_default`` to set
OpenMP's wait policy before torch loads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
SHARE_ENV = "NEURALREG_SHARE_CPUS"  # "0": runs keep their thread count (``RunConfig.share_cpus``)


def shares_cpus_by_default() -> bool:
    """``RunConfig.share_cpus``'s default: True unless the environment sets ``NEURALREG_SHARE_CPUS=0``."""
    return os.environ.get(SHARE_ENV, "1") != "0"


def process_cpus() -> set[int] | None:
    """The CPUs of this process's affinity mask; None where the platform has none."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def cgroup_quota(v2: Path = CGROUP_V2, v1: tuple[Path, Path] = CGROUP_V1) -> int | None:
    """CPUs granted by the cgroup's quota, rounded up (``quota / period``); None without a quota."""
    try:
        quota, period = v2.read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota, period = (int(p.read_text()) for p in v1)
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by the cgroup quota (at least 1)."""
    cpus = process_cpus()
    count = len(cpus) if cpus else (os.cpu_count() or 1)
    quota = cgroup_quota()
    return max(1, min(count, quota) if quota else count)
