"""The same training as a Flower run, in a plain single-process loop (no Flower, no Ray).

It calls the very ``run_round`` the ClientApp calls, with the same mixing rows, seeds and faults,
and delivers through the relay's own ``network.Network`` (same routes, same losses), so it is the
yardstick for the simulation engine's overhead (bench) and a fast way to tune settings.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from flower_p2p.config import ExperimentConfig
from flower_p2p.faults import FaultLog
from flower_p2p.network import Network
from flower_p2p.node import algorithm_for, mixing_inputs, node_runtime, run_round


def run_plain(cfg: ExperimentConfig) -> dict:
    """Run ``cfg`` in-process: per-round (unseen-class) accuracies, faults, final parameters.

    ``round_s`` holds each round's seconds (the last entry is the final evaluation).
    """
    if cfg.mode != "sync":
        raise ValueError(
            f"mode={cfg.mode}: the plain loop runs synchronous rounds only; "
            "async runs go through the relay (python -m sim run, flwr run)"
        )
    algo = algorithm_for(cfg)
    network = Network(cfg, algo)
    nodes = network.nodes
    state = {p: (None, None, None) for p in nodes}
    outbox: dict[int, dict] = {}
    acc: dict[int, list[float]] = {}
    unseen: dict[int, list[float]] = {}
    faults = FaultLog()
    start = time.perf_counter()
    round_s: list[float] = []  # per round, like network.jsonl's wall_s differences
    for rnd in range(1, cfg.num_rounds + 2):
        t0 = time.perf_counter()
        final = rnd == cfg.num_rounds + 1
        evaluate = final or (rnd - 1) % cfg.eval_every == 0
        delivery = network.deliver(rnd, outbox)
        faults.planned(delivery.plan)
        faults.link_drops += delivery.lost
        new_out = {}
        for p, inbox in delivery.inboxes.items():
            params, algo_state, blob = state[p]
            weights, extra = mixing_inputs(cfg, algo, p, rnd)
            try:
                # A copy: combine updates the algorithm state in place, and a node that fails
                # must keep the state it had (as a ClientApp's Context.state does).
                res = run_round(
                    node_runtime(cfg, p), algo, params, copy.deepcopy(algo_state), blob, inbox,
                    weights, rnd, evaluate, train=not final, combine_kwargs=extra,
                    steps_fraction=cfg.straggler_fraction if p in delivery.plan.stragglers else 1.0,
                )  # fmt: skip
            except Exception as err:  # as in the relay: the node counts as dropped
                faults.error(p, rnd, repr(err))
                continue
            state[p] = (res.params, res.state, res.optimizer)
            if res.message:
                new_out[p] = res.message
            if res.accuracy is not None:
                acc.setdefault(rnd - 1, []).append(res.accuracy)
            if res.unseen_accuracy is not None:
                unseen.setdefault(rnd - 1, []).append(res.unseen_accuracy)
        if not final:
            outbox = new_out
        round_s.append(time.perf_counter() - t0)
    last = unseen.get(cfg.num_rounds)
    return {"accuracy": acc, "unseen_accuracy": unseen, "wall_s": time.perf_counter() - start,
            "final_mean": float(np.mean(acc[cfg.num_rounds])),
            "final_min": float(np.min(acc[cfg.num_rounds])),
            "final_unseen_mean": float(np.mean(last)) if last else None,
            "final_unseen_min": float(np.min(last)) if last else None,
            "faults": faults.to_dict(),
            "params": {p: state[p][0] for p in nodes}, "round_s": round_s}  # fmt: skip
