"""Peak resident memory of a whole process tree (a command and everything it starts)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import psutil

# The sampler waits at least this many times what a sample cost (under 5 % of one core).
MAX_DUTY_WAIT = 19.0


class PeakTreeRSS:
    """Samples the memory of a process and all its descendants (Ray's processes included).

    ``peak_bytes``: the peak of the summed PSS (proportional set size: a page shared by k
    processes counts 1/k in each), i.e. the physical memory the tree uses. ``peak_rss_bytes``:
    the peak of the summed RSS, which counts shared pages (torch, libraries) once per process, an
    upper bound. Samples every ``interval_s``, or less often where a sample costs more than
    5 % of one core at that rate (see ``_run``): a spike shorter than the wait can be missed.
    """

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_bytes = self.peak_rss_bytes = 0
        self.peak_processes: Counter = Counter()
        # pid -> (short name, its own peak PSS): where the peak is, process by process
        self.process_peaks: dict[int, tuple[str, int]] = {}
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
                pss = getattr(info, "pss", info.rss)  # PSS is Linux-only
                total += pss
                rss += info.rss
                name = _short_name(proc)
                names[name] += 1
                _, before = self.process_peaks.get(proc.pid, (name, 0))
                self.process_peaks[proc.pid] = (name, max(before, pss))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, names

    def root_peak(self) -> int:
        """The peak PSS of the command's own process (a simulation's driver)."""
        return self.process_peaks.get(self.pid, ("", 0))[1]

    def largest_peak(self, prefix: str) -> int:
        """The largest peak PSS of the processes whose short name starts with ``prefix``."""
        return max((b for n, b in self.process_peaks.values() if n.startswith(prefix)),
                   default=0)  # fmt: skip

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.thread_time()
            self._sample()
            cost = time.thread_time() - start
            # Reading PSS makes the kernel walk every mapping: 70 ms of CPU per sample for a
            # 1,024-node run's 9 processes, a quarter of a core at 0.2 s, taken from the run
            # being measured. Waiting 19x the cost keeps the sampler under 5 % of one core.
            self._stop.wait(max(self.interval_s, MAX_DUTY_WAIT * cost))


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
