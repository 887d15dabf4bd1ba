"""The bench's memory sampler must not take the CPU of the run it measures."""

import os
import time

from bench.memory import MAX_DUTY_WAIT, PeakTreeRSS


class RecordedStop:
    """Stands in for the sampler's stop event: records each wait, stops after three."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def is_set(self) -> bool:
        return len(self.waits) >= 3

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)


def _waits(sample_cpu_s: float, interval_s: float) -> list[float]:
    sampler = PeakTreeRSS(os.getpid(), interval_s=interval_s)

    def costly_sample() -> None:
        start = time.thread_time()
        while time.thread_time() - start < sample_cpu_s:
            pass

    sampler._sample = costly_sample
    sampler._stop = RecordedStop()
    sampler._run()
    return sampler._stop.waits


def test_a_costly_sample_makes_the_sampler_wait_longer():
    # 20 ms of CPU per sample at a 1 ms interval would be a whole core: wait >= 19x instead
    assert all(w >= MAX_DUTY_WAIT * 0.02 for w in _waits(0.02, 0.001))


def test_a_cheap_sample_keeps_the_interval():
    assert _waits(0.0, 0.2) == [0.2, 0.2, 0.2]
