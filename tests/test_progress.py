"""Long runs show progress: round, elapsed and an estimate of the time left."""

from flower_p2p.progress import Progress


def test_the_estimate_is_the_median_round_times_the_rounds_left():
    progress = Progress(last_round=10)
    assert progress.tick(1, 30.0) == "round 1/10  elapsed 30.0s"  # nothing timed yet
    assert progress.tick(2, 32.0).endswith("ETA 16.0s")  # one round of 2 s, 8 left
    progress.tick(3, 34.0)
    progress.tick(4, 60.0)  # a slow round (a checkpoint) does not swing the median
    assert progress.tick(5, 62.0) == "round 5/10  elapsed 1m02s  ETA 10.0s"
    assert "ETA" not in progress.tick(10, 3725.0)
    assert Progress(100).tick(1, 3725.0) == "round 1/100  elapsed 1h02m"
