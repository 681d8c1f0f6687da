"""The CPU thread policy: how many threads torch computes with, and how OpenMP's idle threads wait, from what this
process may really use (its CPU affinity, a cgroup CPU quota) and how busy those CPUs are with other work.

On a shared CPU, more threads than free cores is the costly mistake: an OpenMP team waits at every barrier for a
thread that has no core (measured in docs/performance.md, "Threads on a shared CPU"). So the count is the CPUs free
of other work (`thread_count`), re-checked between optimizer steps while training (`ThreadWatch`). The decisions
are pure functions of (CPUs, quota, busy CPUs, environment, config); `machine` and `cpu_counters` read them from
Linux. torch-free: the CLI calls `prepare_openmp` before torch is imported (OpenMP reads its wait settings once).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

OPENMP_WAIT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""The settings OpenMP (GNU's libgomp, Intel's libiomp) reads once, at start, on how idle threads wait."""

PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
"""Idle threads sleep at once instead of spinning (spinning burns a CPU quota's time that the work needs)."""

RECHECK_SECONDS = 1.0
"""While training, the busy CPUs are measured over windows of at least this long (one per optimizer step at most)."""

SAMPLE_SECONDS = 0.1
"""At the start, how long the CPUs' busy time is sampled for."""


@dataclass(frozen=True)
class Machine:
    """What this process may use: the CPUs of its affinity, its cgroup CPU quota in CPUs (None: none), and how many
    CPUs' worth of time other processes kept busy on those CPUs when sampled."""

    cpus: int
    quota: float | None = None
    busy: float = 0.0


@dataclass(frozen=True)
class ThreadPolicy:
    """torch's CPU thread count (None: torch's own), whether it follows the machine while training, and why."""

    threads: int | None
    follows: bool
    reason: str


# ------------------------------------------------------------------------------------------------ deciding (pure)


def usable(machine: Machine) -> int:
    """The CPUs this process may run on at once: its affinity, capped by its quota (a 1.5-CPU quota: 1)."""
    cap = machine.cpus if machine.quota is None else min(machine.cpus, max(1, math.floor(machine.quota + 1e-9)))
    return max(1, cap)


def thread_count(machine: Machine) -> int:
    """The threads to compute with: the usable CPUs less those other work keeps busy (rounded: a process that holds
    more than half a CPU takes it), at least one."""
    return max(1, min(usable(machine), math.floor(machine.cpus - machine.busy + 0.5)))


def decide(machine: Machine, env: Mapping[str, str], configured: int | None, switch: str = "auto") -> ThreadPolicy:
    """The thread policy of a run on `machine`: `hardware.num_threads` (`configured`) wins, then OMP_NUM_THREADS in
    the environment (torch reads it), then `speed.threads: off` (torch's own count); else `thread_count`, re-checked
    while training."""
    if configured:
        return ThreadPolicy(configured, False, f"hardware.num_threads={configured}")
    if env.get("OMP_NUM_THREADS"):
        return ThreadPolicy(None, False, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} in the environment")
    if switch == "off":
        return ThreadPolicy(None, False, "speed.threads: off")
    count = thread_count(machine)
    return ThreadPolicy(count, True, f"{count} ({describe_machine(machine)}; re-checked between steps)")


def describe_machine(machine: Machine) -> str:
    """'2 CPUs, 1.0 busy with other work', '2 CPUs under a cgroup quota of 1.0', ..."""
    words = f"{machine.cpus} CPU{'s' if machine.cpus > 1 else ''}"
    if machine.quota is not None and machine.quota < machine.cpus:
        words += f" under a cgroup quota of {machine.quota:g}"
    return words + (f", {machine.busy:.1f} busy with other work" if machine.busy >= 0.05 else ", free")


def openmp_settings(env: Mapping[str, str], machine: Machine) -> dict[str, str]:
    """The OpenMP wait settings to set before torch loads: idle threads sleep (`PASSIVE`) under a cgroup quota below
    the CPUs (where spinning spends the quota); nothing where the environment sets any of them (the user's win) or
    where threads have CPUs of their own (spinning is faster there: measured in docs/performance.md)."""
    if any(key in env for key in OPENMP_WAIT):
        return {}
    if machine.quota is not None and machine.quota < machine.cpus:
        return dict(PASSIVE)
    return {}


# ------------------------------------------------------------------------------------------------ reading Linux


def affinity() -> tuple[int, ...]:
    """The CPUs this process may run on (its affinity mask; every CPU where the OS has none)."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def cgroup_quota(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """This process's cgroup CPU quota in CPUs (quota / period; the smallest on the way up to the root), from
    cgroup v2's cpu.max or v1's cpu.cfs_quota_us and cpu.cfs_period_us; None where there is none or it is unreadable."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one unified hierarchy
            quotas += _walk(Path(root), path, _v2_quota)
        elif "cpu" in controllers.split(","):
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                if (Path(root) / mount).is_dir():
                    quotas += _walk(Path(root) / mount, path, _v1_quota)
                    break
    return min(quotas) if quotas else None


def _walk(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas of the cgroup at `path` under `mount` and of its parents (in a container the mount's root is the
    container's own cgroup, whatever /proc says its path is)."""
    parts = [p for p in path.strip().split("/") if p]
    folders = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    found = [read(f) for f in folders if f.is_dir()]
    return [q for q in found if q is not None]


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def cpu_counters(cpus: tuple[int, ...]) -> tuple[float, float, float]:
    """(now, seconds the CPUs `cpus` have been busy, seconds of CPU this process and its live children have used:
    data-loading workers are this run's work too): two readings give how much other work kept those CPUs busy between
    them (`busy_between`). Busy: every /proc/stat column but idle and iowait (steal included: time the hypervisor gave
    elsewhere is not ours either). Without /proc/stat: (now, 0, 0)."""
    now, own = time.monotonic(), sum(os.times()[:2])
    try:
        rows = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return now, 0.0, 0.0
    wanted, busy, hz = {f"cpu{c}" for c in cpus}, 0, os.sysconf("SC_CLK_TCK")
    for row in rows:
        name, *ticks = row.split()
        if name in wanted:
            values = [int(t) for t in ticks[:8]]
            busy += sum(values) - values[3] - values[4]  # user nice system [idle iowait] irq softirq steal
    return now, busy / hz, own + _children_ticks() / hz


def _children_ticks() -> int:
    """The CPU ticks (user + system) the live child processes of this process have used (0 where unreadable)."""
    ticks = 0
    for children in Path("/proc/self/task").glob("*/children"):
        try:
            pids = children.read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return ticks


def busy_between(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """CPUs' worth of other work between two `cpu_counters` readings (the CPUs' busy time less this process's)."""
    wall = after[0] - before[0]
    if wall <= 0:
        return 0.0
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall)


def machine(sample_s: float = SAMPLE_SECONDS) -> Machine:
    """This process's machine now: its affinity, its cgroup quota, and the other work on its CPUs over `sample_s`."""
    cpus = affinity()
    before = cpu_counters(cpus)
    time.sleep(sample_s)
    return Machine(len(cpus), cgroup_quota(), busy_between(before, cpu_counters(cpus)))


SET_AT_START: dict[str, str] = {}
"""The OpenMP settings `prepare_openmp` set in this process (the run header says them)."""


def prepare_openmp(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set `openmp_settings` for this machine in `env` (before torch loads: OpenMP reads them once); return them."""
    settings = openmp_settings(env, Machine(len(affinity()), cgroup_quota()))
    env.update(settings)
    SET_AT_START.update(settings)
    return settings


# ------------------------------------------------------------------------------------------------ following


class ThreadWatch:
    """Called after each optimizer step: every `RECHECK_SECONDS` or more it measures the other work on this
    process's CPUs since the last check and sets the thread count `thread_count` gives (fewer at once, more only
    when two checks in a row agree, so a short burst elsewhere costs no flapping); returns the log line of a change.
    Inactive (`threads` None: the count is the user's, or torch's own) it does nothing."""

    def __init__(
        self,
        threads: int | None,
        cpus: tuple[int, ...] = (),
        quota: float | None = None,
        set_threads: Callable[[int], None] = lambda n: None,
        counters: Callable[[tuple[int, ...]], tuple[float, float, float]] = cpu_counters,
    ) -> None:
        self.threads, self.cpus, self.quota = threads, cpus, quota
        self.set_threads, self.counters = set_threads, counters
        self.last = counters(cpus) if threads is not None else (0.0, 0.0, 0.0)
        self.wanted_more = 0
        """How many checks in a row have wanted more threads than now."""

    @property
    def active(self) -> bool:
        return self.threads is not None

    def __call__(self) -> str | None:
        if self.threads is None:
            return None
        now = self.counters(self.cpus)
        if now[0] - self.last[0] < RECHECK_SECONDS:
            return None
        seen = Machine(len(self.cpus), self.quota, busy_between(self.last, now))
        self.last, target = now, thread_count(seen)
        self.wanted_more = self.wanted_more + 1 if target > self.threads else 0
        if target == self.threads or (target > self.threads and self.wanted_more < 2):
            return None
        line = f"CPU threads: {self.threads} -> {target} ({describe_machine(seen)})"
        self.threads, self.wanted_more = target, 0
        self.set_threads(target)
        return line
