"""``python -m bench.node_memory [key=value ...] nodes=K``: what each node costs one process.

A ClientApp actor (or the plain loop) serves many nodes one after another and keeps each node's
runtime (model, data) between rounds. This builds K nodes' runtimes in one fresh process, runs one
training round of each (the node's state is dropped, as an actor returns it to the relay), and
prints as JSON the process's resident memory after the first node and after the last: their
difference over K - 1 is what one more node costs the process. Measurement 5 of ``python -m
bench``.
"""

from __future__ import annotations

import gc
import json
import sys

import psutil

from flower_p2p.config import ExperimentConfig
from flower_p2p.node import algorithm_for, node_runtime, run_round
from sim.cli import config_from_args


def rss_bytes() -> int:
    """This process's resident set size after a garbage collection."""
    gc.collect()
    return psutil.Process().memory_info().rss


def measure(cfg: ExperimentConfig, nodes: int) -> dict:
    """Resident memory after 1 and after ``nodes`` nodes have each trained one round here."""
    algo = algorithm_for(cfg)
    rss = []
    for node in range(nodes):
        rt = node_runtime(cfg, node)
        run_round(rt, algo, None, None, None, {}, {node: 1.0}, rnd=1, do_eval=False)
        rss.append(rss_bytes())
    model_bytes = sum(p.numel() * p.element_size() for p in rt.model.parameters())
    trainable = sum(v.nbytes for v in rt.initial_params.values())
    return {
        "nodes": nodes,
        "rss_first_mib": rss[0] / 2**20,
        "rss_last_mib": rss[-1] / 2**20,
        "per_node_mib": (rss[-1] - rss[0]) / max(1, nodes - 1) / 2**20,
        "model_mib": model_bytes / 2**20,
        "trainable_mib": trainable / 2**20,
    }


def main(argv: list[str]) -> int:
    """Parse ``key=value`` run-config overrides and ``nodes=K``; print the figures as JSON."""
    nodes = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("nodes=")), 8)
    cfg = config_from_args([a for a in argv if not a.startswith("nodes=")])
    print(json.dumps(measure(cfg.replace(num_nodes=max(cfg.num_nodes, nodes)), nodes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
