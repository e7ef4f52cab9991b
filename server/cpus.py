"""How many CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (what
Docker's --cpus and a Kubernetes CPU limit set). os.cpu_count() sees neither."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def available_cpus(cgroup: Path = CGROUP) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_quota(cgroup)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def cgroup_quota(cgroup: Path = CGROUP) -> float | None:
    """CPUs allowed by the quota (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`); None when unlimited or unknown."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None
