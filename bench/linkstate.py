"""Where a large simulated round goes: time inside Flower's in-memory LinkState.

``python -m bench.linkstate [--flower-pump] num-nodes=256 [key=value ...]`` runs ``python -m sim
run`` in this process with the message pump's scans timed. Flower's pump
(``vce_api.add_messages_to_queue``, kept with ``--flower-pump``) calls
``InMemoryLinkState.get_message_ins`` once per node per sweep, and each call scans every stored
message: O(nodes x messages) = O(nodes^2) per sweep. Ours (``sim.message_pump``) scans once per
sweep. Prints one JSON line: wall per round, and the seconds spent scanning.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

from flower_p2p.results import read_jsonl
from sim import message_pump
from sim.cli import config_from_args
from sim.engine import run_experiment


class _Timer:
    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self.lock = threading.Lock()

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds += time.perf_counter() - start
                    self.calls += 1

        return timed


def main(argv: list[str]) -> None:
    timer = _Timer()
    flower_pump = "--flower-pump" in argv
    argv = [a for a in argv if a != "--flower-pump"]
    InMemoryLinkState.get_message_ins = timer.wrap(InMemoryLinkState.get_message_ins)
    message_pump._undelivered_once = timer.wrap(message_pump._undelivered_once)
    if flower_pump:
        message_pump.install = lambda: False  # the engine keeps Flower's own pump
    with tempfile.TemporaryDirectory(prefix="bench-linkstate-") as tmp:
        cfg = config_from_args([*argv, f"out-dir={tmp}/run"])
        start = time.perf_counter()
        run_experiment(cfg)
        wall = time.perf_counter() - start
        walls = [r["wall_s"] for r in read_jsonl(Path(tmp) / "run" / "network.jsonl")]
    rounds = [b - a for a, b in zip(walls, walls[1:], strict=False)]
    print(json.dumps({
        "nodes": cfg.num_nodes, "rounds": cfg.num_rounds, "command_s": wall,
        "round_s": rounds, "pump": "flower" if flower_pump else "one-scan",
        "scan_s": timer.seconds, "scan_calls": timer.calls,
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
