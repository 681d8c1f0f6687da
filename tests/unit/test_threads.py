"""The CPU thread policy (`speed.threads`): the count from the CPUs, a cgroup quota and other work; who wins
(hardware.num_threads, OMP_NUM_THREADS, speed.threads: off); OpenMP's wait settings before torch loads; cgroup v1
and v2 quotas read from their files; the re-check between steps. Pure functions over made-up machines: no busy
machine needed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fulltune.speed import threads
from fulltune.speed.threads import PASSIVE, Machine, ThreadPolicy, ThreadWatch, decide, openmp_settings, thread_count


@pytest.mark.parametrize(
    "machine,count",
    [
        (Machine(2), 2),  # quiet
        (Machine(2, busy=0.3), 2),  # a light process elsewhere
        (Machine(2, busy=0.67), 1),  # one busy loop beside two threads of ours (each of three gets 2/3 of a CPU)
        (Machine(2, busy=1.0), 1),
        (Machine(2, busy=3.0), 1),  # never none
        (Machine(16, busy=2.0), 14),
        (Machine(2, quota=1.0), 1),  # a container's one-CPU quota on a two-CPU host
        (Machine(8, quota=2.5), 2),
        (Machine(4, quota=8.0), 4),
    ],
)
def test_thread_count_is_the_cpus_free_of_other_work(machine: Machine, count: int) -> None:
    assert thread_count(machine) == count


def test_a_count_the_user_sets_wins_and_is_not_followed() -> None:
    busy = Machine(2, busy=1.0)
    followed = "1 (2 CPUs, 1.0 busy with other work; re-checked between steps)"
    assert decide(busy, {}, None) == ThreadPolicy(1, True, followed)
    assert decide(Machine(2), {}, None).reason == "2 (2 CPUs, free; re-checked between steps)"
    assert decide(busy, {"OMP_NUM_THREADS": "2"}, 4) == ThreadPolicy(4, False, "hardware.num_threads=4")
    assert decide(busy, {"OMP_NUM_THREADS": "2"}, None) == ThreadPolicy(
        None, False, "OMP_NUM_THREADS=2 in the environment"
    )
    assert decide(busy, {}, None, "off") == ThreadPolicy(None, False, "speed.threads: off")
    quota = decide(Machine(2, quota=1.0), {}, None).reason
    assert quota == "1 (2 CPUs under a cgroup quota of 1, free; re-checked between steps)"


def test_idle_threads_sleep_under_a_quota_unless_the_environment_says() -> None:
    assert openmp_settings({}, Machine(2, quota=1.0)) == PASSIVE == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
    assert openmp_settings({}, Machine(2)) == {}  # threads with CPUs of their own: spinning is faster
    assert openmp_settings({}, Machine(2, quota=4.0)) == {}
    assert openmp_settings({"GOMP_SPINCOUNT": "1000"}, Machine(2, quota=1.0)) == {}


def test_cgroup_quotas_v1_and_v2_the_smallest_on_the_way_up(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    (v2 / "box" / "job").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "box" / "cpu.max").write_text("150000 100000\n")
    (v2 / "box" / "job" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "cg2").write_text("0::/box/job\n")
    assert threads.cgroup_quota(str(tmp_path / "cg2"), str(v2)) == 1.5
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "job").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cg1").write_text("4:memory:/job\n3:cpu,cpuacct:/job\n0::/\n")
    assert threads.cgroup_quota(str(tmp_path / "cg1"), str(v1)) == 0.5
    (tmp_path / "none").write_text("0::/\n")
    assert threads.cgroup_quota(str(tmp_path / "none"), str(tmp_path / "empty")) is None
    assert threads.cgroup_quota(str(tmp_path / "missing"), str(v1)) is None


class FakeCPUs:
    """`cpu_counters` for a two-CPU machine on which other work keeps `others` CPUs busy and this process `own`."""

    def __init__(self) -> None:
        self.now, self.busy, self.own, self.others = 0.0, 0.0, 0.0, 0.0

    def advance(self, seconds: float, others: float, own: float = 1.0) -> None:
        self.now += seconds
        self.busy += (others + own) * seconds
        self.own += own * seconds

    def __call__(self, cpus: tuple[int, ...]) -> tuple[float, float, float]:
        return self.now, self.busy, self.own


def test_the_count_follows_other_work_between_steps() -> None:
    """Fewer threads at the first check that sees the CPUs taken; more again only when two checks in a row agree;
    a step shorter than the re-check's window checks nothing; each change says so in one line."""
    cpus, set_to = FakeCPUs(), []
    watch = ThreadWatch(2, (0, 1), None, set_to.append, counters=cpus)
    cpus.advance(threads.RECHECK_SECONDS / 4, others=1.0)
    assert watch() is None and set_to == []  # too short a window
    cpus.advance(2.0, others=0.7, own=1.3)
    assert watch() == "CPU threads: 2 -> 1 (2 CPUs, 0.7 busy with other work)" and set_to == [1]
    cpus.advance(2.0, others=1.0)
    assert watch() is None
    cpus.advance(2.0, others=0.0)
    assert watch() is None and set_to == [1]  # one quiet check is not enough
    cpus.advance(2.0, others=0.1)
    assert watch() == "CPU threads: 1 -> 2 (2 CPUs, 0.1 busy with other work)" and set_to == [1, 2]
    quota = ThreadWatch(1, (0, 1), 1.0, set_to.append, counters=cpus)
    for _ in range(3):
        cpus.advance(2.0, others=0.0)
        assert quota() is None  # a one-CPU quota: never more than one
    assert ThreadWatch(None)() is None and not ThreadWatch(None).active


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc (Linux)")
def test_a_child_process_counts_as_this_runs_work() -> None:
    """Data-loading workers are processes of their own: their CPU time is this run's, not other work's."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for _ in range(200):  # until the child has used a clock tick (a few ms), at most ~10 s
            if threads._children_ticks() > 0:
                break
            time.sleep(0.05)
        assert threads._children_ticks() > 0
    finally:
        child.kill()
        child.wait()


def test_the_command_sets_openmp_before_torch_loads(tmp_path: Path) -> None:
    """`fulltune` decides OpenMP's wait settings at import, with no torch loaded yet (OpenMP reads them once)."""
    code = (
        "import sys; from fulltune.speed import threads; threads.cgroup_quota = lambda: 0.5; "
        "import fulltune.cli; print('torch' in sys.modules, threads.SET_AT_START)"
    )
    env = {k: v for k, v in os.environ.items() if k not in threads.OPENMP_WAIT}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split(" ", 1) == ["False", f"{PASSIVE}\n"]
