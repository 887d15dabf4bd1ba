"""Peak resident memory of a whole process tree (a command and everything it starts)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import psutil


class PeakTreeRSS:
    """Samples the memory of a process and all its descendants (Ray's processes included).

    ``peak_bytes``: the peak of the summed PSS (proportional set size: a page shared by k
    processes counts 1/k in each), i.e. the physical memory the tree uses. ``peak_rss_bytes``:
    the peak of the summed RSS, which counts shared pages (torch, libraries) once per process, an
    upper bound.
    """

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_bytes = self.peak_rss_bytes = 0
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
        total, rss, names = 0, 0, Counter()
        for proc in procs:
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", info.rss)  # PSS is Linux-only
                rss += info.rss
                names[_short_name(proc)] += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
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
