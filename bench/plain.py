"""``python -m bench.plain key=value ...``: the plain single-process loop as its own command.

Prints one JSON line (wall time, per-round seconds, accuracies). torch uses every core of the
machine, as any plain script would: the Flower run uses them all too (one per node actor).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> None:
    """Run ``run_plain`` on the run config given as ``key=value`` pairs."""
    start = time.perf_counter()
    import torch

    from sim.cli import config_from_args
    from sim.loop import run_plain

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = config_from_args(argv)
    res = run_plain(cfg)
    print(json.dumps({"wall_s": res["wall_s"], "round_s": res["round_s"],
                      "final_mean": res["final_mean"], "threads": torch.get_num_threads(),
                      "process_s": time.perf_counter() - start}))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
