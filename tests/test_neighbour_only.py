"""What the relay delivers, watched in real Flower runs: neighbours' last messages, and only those.

Each run goes through Flower's simulation engine with the project's own relay
(``server_app.run_experiment``) behind a Grid that records every message (``relay_capture_app``).
Every ``in:<j>`` record a node receives in round r must be the very message node j sent in
round r - 1 (same arrays; RelaySum: the one j addressed to this node), j must be an in-neighbour
of node i on round r - 1's graph (CHOCO: on the run's union graph; RelaySum: on its spanning
tree), and the link j -> i must not be lost in round r; every such message that exists and is
not lost must be there. Dropped nodes get no message at all.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from small_runs import case_config

from flower_p2p.config import ExperimentConfig
from flower_p2p.faults import fault_plan
from flower_p2p.schedules import reach_topology, topology_at
from flower_p2p.topology import build_topology
from strategies import create_strategy

# The small runs (small_runs.CASES) that cover each kind of graph: static, directed, per-round
# with node dropout and lost links, CHOCO's union delivery on a per-round graph, and RelaySum's
# different message to each neighbour of its spanning tree (3 graph nodes per SuperNode there).
WATCHED = ["dsgd", "push-sum-directed", "dsgd-random-matching-faults", "choco-one-peer",
           "relay-sum-unseen"]  # fmt: skip


@pytest.fixture(params=WATCHED)
def watched_run(request, small_runs):
    out = small_runs(request.param)
    return case_config(request.param), json.loads((out / "relay_log.json").read_text())


def _expected_senders(cfg: ExperimentConfig, node: int, rnd: int) -> set[int]:
    if cfg.strategy == "choco":
        return set(reach_topology(cfg).in_neighbours[node])
    return set(topology_at(cfg, rnd - 1).in_neighbours[node])


def test_every_inbox_holds_exactly_the_neighbours_last_messages(watched_run):
    cfg, log = watched_run
    sent_by = {(r["round"], r["node"], r["to"]): r["out"] for r in log["replies"]}
    per_receiver = any(r["to"] is not None for r in log["replies"])
    messages = [m for m in log["sent"] if m["round"] > 1]
    assert messages, "the run relayed nothing"
    delivered = 0
    for msg in messages:
        rnd, i = msg["round"], msg["node"]
        plan = fault_plan(cfg, rnd)
        assert i not in plan.dropped, f"dropped node {i} got a message in round {rnd}"
        inbox = {int(j): h for j, h in msg["inbox"].items()}
        allowed = _expected_senders(cfg, i, rnd)
        expected = {j for j in allowed
                    if (rnd - 1, j, i if per_receiver else None) in sent_by
                    and (j, i) not in plan.lost}  # fmt: skip
        assert set(inbox) == expected, (rnd, i, sorted(inbox), sorted(expected))
        for j, digest in inbox.items():
            key = (rnd - 1, j, i if per_receiver else None)  # RelaySum: j's message *for i*
            assert digest == sent_by[key], f"in:{j} at node {i} is not j's message to it"
        delivered += len(inbox)
        # nothing else travels to a node: its config and its inbox
        assert set(msg["keys"]) == {"config", *(f"in:{j}" for j in inbox)}
    assert delivered > 0


def test_every_node_that_takes_part_gets_a_message(watched_run):
    cfg, log = watched_run
    for rnd in range(1, cfg.num_rounds + 2):
        got = {m["node"] for m in log["sent"] if m["round"] == rnd}
        assert got == set(range(cfg.num_nodes)) - fault_plan(cfg, rnd).dropped, rnd


def test_the_faulty_run_did_lose_and_drop_something():
    # the faulty config must exercise the fault paths, or the tests above prove nothing
    cfg = case_config("dsgd-random-matching-faults")
    plans = [fault_plan(cfg, r) for r in range(2, cfg.num_rounds + 2)]
    assert any(p.dropped for p in plans)
    lost = [(j, i) for r in range(2, cfg.num_rounds + 2) for j, i in fault_plan(cfg, r).lost
            if j in topology_at(cfg, r - 1).in_neighbours[i]]  # fmt: skip
    assert lost


def test_choco_reaches_more_nodes_than_one_round_graph():
    # the point of CHOCO's union delivery: one-peer-exponential has one in-neighbour a round
    cfg = case_config("choco-one-peer")
    assert all(len(topology_at(cfg, 1).in_neighbours[i]) == 1 for i in range(4))
    assert all(len(reach_topology(cfg).in_neighbours[i]) == 2 for i in range(4))


# ---- the mixing a node applies to what it received ------------------------------------------


def test_dsgd_mix_is_the_row_of_w_and_missing_weight_stays_home():
    topo = build_topology("star", "metropolis-hastings", 5, seed=0)
    x = {j: {"p": np.full(2, float(j))} for j in range(5)}
    row = topo.row(0)  # hub: 1/5 for itself and each leaf
    full = create_strategy("dsgd").combine(x[0], {}, {j: x[j] for j in range(1, 5)}, row, 0)
    assert np.allclose(full["p"], sum(row[j] * j for j in row))
    partial = create_strategy("dsgd").combine(x[0], {}, {1: x[1]}, row, 0)
    assert np.allclose(partial["p"], row[1] * 1.0 + (1 - row[1]) * 0.0)


def test_fedavg_reference_is_the_sample_weighted_average_at_every_node():
    algo = create_strategy("fedavg")
    sizes = {0: 10, 1: 30, 2: 60}
    x = {j: {"p": np.full(2, float(j))} for j in sizes}
    msgs = {}
    for j, n in sizes.items():
        state = {}
        algo.combine(x[j], state, {}, {}, j, num_examples=n)
        msgs[j] = algo.message(x[j], state)
    expected = sum(n * j for j, n in sizes.items()) / sum(sizes.values())
    for i, n in sizes.items():
        inbox = {j: m for j, m in msgs.items() if j != i}
        mixed = algo.combine(x[i], {}, inbox, {}, i, num_examples=n)
        np.testing.assert_allclose(mixed["p"], expected)
