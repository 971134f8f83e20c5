"""Peak memory of a process tree as the sum of PSS (proportional set size), sampled in a thread (also benchmarks/predict_nih.py).

RSS counts a page shared by N processes N times (torch's libraries are mapped into every Ray worker),
so the sum of RSS over a Ray study overstates what it needs; PSS charges each process 1/N of a shared
page, so the sum over the tree is what the tree occupies. Read from ``/proc/PID/smaps_rollup``
(Linux >= 4.14); the tree is every descendant of the root by parent pid, which includes a private
Ray head that the driver started (``start_new_session`` changes the session, not the parent).

    with TreeMemory(proc.pid) as mem:
        proc.wait()
    print(mem.peak_gib, mem.peak_processes)
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (``/proc/PID/task/*/children``; [] for a process gone meanwhile)."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children(pid))
    return out


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> tuple[int, int] | None:
    """(user + system CPU of ``pid`` itself, all its threads, in clock ticks; its start time in ticks
    after boot) from ``/proc/PID/stat``; None for a process gone meanwhile."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state): utime 14, stime 15, starttime 22
    return int(fields[11]) + int(fields[12]), int(fields[19])


def _uptime_ticks() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * CLOCK_TICKS)


class TreeMemory:
    """Samples the summed PSS of ``root``'s process tree every ``every_s`` seconds until stopped,
    and the CPU time the tree spent meanwhile (:attr:`cpu_s`).

    CPU: for every process seen in the tree (keyed by pid and start time), the CPU it used between
    the start of the measurement (or its own start, if later) and its last sample. A process that
    exits between two samples loses at most ``every_s`` of CPU; a long-lived process (a Ray worker
    or the Ray head started before) counts only what it used during the measurement."""

    def __init__(self, root: int, every_s: float = 1.0):
        self.root, self.every_s = root, every_s
        self.peak_bytes, self.peak_processes, self.samples = 0, 0, 0
        self._cpu: dict[tuple[int, int], list[int]] = {}  # (pid, start) -> [baseline ticks, last ticks]
        self._started = _uptime_ticks()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample_cpu(self, pids: list[int]) -> None:
        with self._lock:
            self._sample_cpu_locked(pids)

    def _sample_cpu_locked(self, pids: list[int]) -> None:
        for pid in pids:
            got = cpu_ticks(pid)
            if got is None:
                continue
            ticks, start = got
            entry = self._cpu.get((pid, start))
            if entry is None:  # born during the measurement: all of its CPU counts
                self._cpu[(pid, start)] = [0 if start >= self._started else ticks, ticks]
            else:
                entry[1] = ticks

    def _run(self) -> None:
        while True:
            pids = tree(self.root)
            self._sample_cpu(pids)
            total = sum(pss_bytes(p) for p in pids)
            self.samples += 1
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_processes = total, len(pids)
            if self._stop.wait(self.every_s):
                self._sample_cpu(tree(self.root))  # a last CPU sample at the stop
                return

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 1024**3

    @property
    def cpu_s(self) -> float:
        """CPU seconds (user + system, every thread) of the tree during the measurement (so far, when read
        before the end: sampled now)."""
        if not self._stop.is_set():
            self._sample_cpu(tree(self.root))
        with self._lock:
            return sum(last - base for base, last in self._cpu.values()) / CLOCK_TICKS

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


if __name__ == "__main__":
    import subprocess
    import sys

    proc = subprocess.Popen(sys.argv[1:])
    start = time.time()
    with TreeMemory(proc.pid) as mem:
        rc = proc.wait()
    print(f"peak PSS {mem.peak_gib:.2f} GiB over {mem.peak_processes} processes, {mem.cpu_s:.1f} CPU s "
          f"({mem.samples} samples in {time.time() - start:.0f} s)")
    sys.exit(rc)
