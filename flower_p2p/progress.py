"""Progress of a long run: round, elapsed time and an estimate of the time left."""

from __future__ import annotations

import statistics


class Progress:
    """Round timings and the estimate they give of the rest of the run.

    The estimate is the median of the rounds timed so far (the first one left out once there
    are others: it also builds every node's model and data) times the rounds left, so one slow
    round (a checkpoint, an evaluation) does not swing it.
    """

    def __init__(self, last_round: int) -> None:
        self.last_round = last_round
        self.durations: list[float] = []
        self._previous: float | None = None

    def tick(self, rnd: int, elapsed: float) -> str:
        """Round ``rnd`` ended at ``elapsed`` seconds into the run: the progress line."""
        if self._previous is not None:
            self.durations.append(elapsed - self._previous)
        self._previous = elapsed
        line = f"round {rnd}/{self.last_round}  elapsed {_clock(elapsed)}"
        timed = self.durations[1:] or self.durations
        if timed and rnd < self.last_round:
            line += f"  ETA {_clock(statistics.median(timed) * (self.last_round - rnd))}"
        return line


def _clock(seconds: float) -> str:
    """3.2s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
