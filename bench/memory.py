"""Peak resident memory of a whole process tree (a command and everything it starts)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import psutil


class PeakTreeRSS:
    """Samples the summed RSS of a process and all its descendants (Ray's included).

    RSS counts pages shared between processes (libraries, torch) once per process, so the sum
    is an upper bound on the memory the tree really uses.
    """

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_bytes = 0
        self.peak_processes: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakTreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total, names = 0, Counter()
        for proc in procs:
            try:
                total += proc.memory_info().rss
                names[_short_name(proc)] += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, names

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)


def _short_name(proc: psutil.Process) -> str:
    """'ray::ClientAppActor', 'raylet', 'python', ... (Ray renames its workers' titles)."""
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        cmd = []
    first = cmd[0] if cmd else proc.name()
    if first.startswith("ray::"):
        return first.split()[0]
    return first.rsplit("/", 1)[-1]
