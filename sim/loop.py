"""The same training as a Flower run, in a plain single-process loop (no Flower, no Ray).

It calls the very ``run_round`` the ClientApp calls, with the same mixing rows and seeds, so it
is the yardstick for the simulation engine's overhead (bench) and a fast way to tune settings.
"""

from __future__ import annotations

import time

import numpy as np

from flower_p2p.config import ExperimentConfig
from flower_p2p.node import (
    CENTRALIZED_NODE,
    algorithm_for,
    mixing_inputs,
    node_runtime,
    run_round,
    senders,
)


def run_plain(cfg: ExperimentConfig) -> dict:
    """Run ``cfg`` in-process; returns per-round node accuracies, final parameters, wall time.

    ``round_s`` holds each round's seconds (the last entry is the final evaluation).
    """
    algo = algorithm_for(cfg)
    nodes = [CENTRALIZED_NODE] if cfg.strategy == "centralized" else list(range(cfg.num_nodes))
    state = {p: (None, None, None) for p in nodes}
    outbox: dict[int, dict] = {}
    acc: dict[int, list[float]] = {}
    start = time.perf_counter()
    round_s: list[float] = []  # per round, like network.jsonl's wall_s differences
    for rnd in range(1, cfg.num_rounds + 2):
        t0 = time.perf_counter()
        final = rnd == cfg.num_rounds + 1
        evaluate = final or (rnd - 1) % cfg.eval_every == 0
        new_out = {}
        for p in nodes:
            params, algo_state, blob = state[p]
            inbox = {j: outbox[j] for j in senders(cfg, algo, p, rnd - 1) if j in outbox}
            weights, extra = mixing_inputs(cfg, algo, p, rnd)
            res = run_round(
                node_runtime(cfg, p), algo, params, algo_state, blob, inbox, weights, rnd,
                evaluate, train=not final, combine_kwargs=extra,
            )  # fmt: skip
            state[p] = (res.params, res.state, res.optimizer)
            if res.message:
                new_out[p] = res.message
            if res.accuracy is not None:
                acc.setdefault(rnd - 1, []).append(res.accuracy)
        outbox = new_out
        round_s.append(time.perf_counter() - t0)
    return {"accuracy": acc, "wall_s": time.perf_counter() - start,
            "final_mean": float(np.mean(acc[cfg.num_rounds])),
            "final_min": float(np.min(acc[cfg.num_rounds])),
            "params": {p: state[p][0] for p in nodes}, "round_s": round_s}  # fmt: skip
