"""``GossipStrategy`` is a Flower strategy another app can adopt, and what it relays is exact.

A minimal second app (``minimal_gossip_app``: its own least-squares model and ClientApp, our
strategy) runs through Flower's simulation engine; every node's final model must equal what the
pure reference loop (``strategies.harness.run_gossip``) computes for the same algorithm, graph
and local step. RelaySum is used because it is the most demanding of the relay (a different
message to each tree neighbour).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import Strategy
from minimal_gossip_app import DIM, local_step

from flower_p2p.config import ExperimentConfig
from flower_p2p.gossip_strategy import GossipStrategy
from flower_p2p.schedules import topology_at
from sim.engine import run_app
from strategies import create_strategy
from strategies.harness import run_gossip

N, ROUNDS = 6, 25


def test_it_is_a_flower_strategy():
    assert issubclass(GossipStrategy, Strategy)
    strategy = GossipStrategy(ExperimentConfig(num_nodes=4))
    arrays, metrics = strategy.aggregate_train(1, [])
    assert arrays is None  # it aggregates no arrays: there is no global model


@pytest.mark.parametrize("strategy", ["relay-sum"])
def test_another_app_adopts_gossip_and_computes_the_reference(tmp_path, strategy):
    run_config = {"num-nodes": N, "num-rounds": ROUNDS, "strategy": strategy,
                  "topology": "ring", "eval-every": 1000, "out-dir": str(tmp_path)}  # fmt: skip
    cfg = ExperimentConfig.from_run_config(run_config)
    run_app(run_config, N, "minimal_gossip_app:server", "minimal_gossip_app:client")
    flower = [np.load(tmp_path / f"node-{i}.npy") for i in range(N)]

    def step(node: int, params: dict, rnd: int) -> dict:
        return {"x": local_step(node, params["x"], N)}

    reference = run_gossip(create_strategy(strategy, num_nodes=N),
                           lambda t: topology_at(cfg, t + 1).weights, step,
                           {"x": np.zeros(DIM)}, ROUNDS)  # fmt: skip
    for got, want in zip(flower, reference, strict=True):
        np.testing.assert_allclose(got, want["x"], rtol=1e-12, atol=1e-12)
    assert np.ptp(np.stack(flower), axis=0).max() > 1e-6  # nodes still differ: not trivial
