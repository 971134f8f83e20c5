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


class TreeMemory:
    """Samples the summed PSS of ``root``'s process tree every ``every_s`` seconds until stopped."""

    def __init__(self, root: int, every_s: float = 1.0):
        self.root, self.every_s = root, every_s
        self.peak_bytes, self.peak_processes, self.samples = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree(self.root)
            total = sum(pss_bytes(p) for p in pids)
            self.samples += 1
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_processes = total, len(pids)
            self._stop.wait(self.every_s)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 1024**3

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
    print(f"peak PSS {mem.peak_gib:.2f} GiB over {mem.peak_processes} processes "
          f"({mem.samples} samples in {time.time() - start:.0f} s)")
    sys.exit(rc)
