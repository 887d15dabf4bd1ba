"""AD-PSGD: pairwise averaging on the simulated clock, checked against known answers.

The schedule of a 2-node run is worked out by hand; on larger graphs the algorithm runs its
schedule here without Flower (the relay's call order, in waves) on scalar problems whose answer
is known: pure averaging keeps the sum of the models and reaches their mean, and least squares
reaches the mean of the targets.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from flower_p2p.clock import Clock, PairwiseSchedule, partner
from flower_p2p.faults import ActivationFaults
from strategies import ADPSGD


def _clock(compute, graph: nx.Graph, latency: float) -> Clock:
    nbrs = tuple(tuple(sorted(graph.neighbors(i))) for i in range(len(compute)))
    lat = {(j, i): latency for j in range(len(compute)) for i in nbrs[j]}
    return Clock(tuple(compute), lat, nbrs, nbrs)


def test_two_nodes_against_a_hand_worked_schedule():
    # compute 1 s and 2 s, 0.25 s each way: activations of 1.5 s and 2.5 s, 5 s in all
    sched = PairwiseSchedule(_clock([1.0, 2.0], nx.path_graph(2), 0.25), 5.0, [0.0, 2.0, 5.0],
                             seed=0)  # fmt: skip
    assert sched.count == [3, 2] and sched.calls == [6, 6]
    rows = {key: (p.event, p.activation.start, p.activation.end, p.inbox, p.age, p.train)
            for key, p in sched.plans.items()}  # fmt: skip
    assert rows == {
        (0, 1): ("start", 0.0, 1.5, {}, {}, True),
        (1, 1): ("start", 0.0, 2.5, {}, {}, True),
        # 1.5 s: node 0 ends, both average the models they started with; 0 starts again
        (0, 2): ("finish", 1.5, 3.0, {1: 1}, {1: 1.5}, True),
        (1, 2): ("pair", 1.5, 1.5, {0: 1}, {0: 1.5}, False),
        # 2.5 s: node 1 ends
        (1, 3): ("finish", 2.5, 5.0, {0: 2}, {0: 1.0}, True),
        (0, 3): ("pair", 2.5, 2.5, {1: 2}, {1: 1.0}, False),
        (0, 4): ("finish", 3.0, 4.5, {1: 3}, {1: 0.5}, True),
        (1, 4): ("pair", 3.0, 3.0, {0: 3}, {0: 0.5}, False),
        # 4.5 s: node 0's third activation ends; a fourth would end after 5 s: none starts
        (0, 5): ("finish", 4.5, 4.5, {1: 4}, {1: 1.5}, False),
        (1, 5): ("pair", 4.5, 4.5, {0: 4}, {0: 1.5}, False),
        (1, 6): ("finish", 5.0, 5.0, {0: 5}, {0: 0.5}, False),
        (0, 6): ("pair", 5.0, 5.0, {1: 5}, {1: 0.5}, False),
    }
    assert {k: p.evals for k, p in sched.plans.items() if p.evals} == {
        (0, 1): [0], (1, 1): [0], (0, 2): [1], (1, 2): [1]}  # fmt: skip
    waves = [sorted((p.activation.node, p.activation.index) for p in w) for w in sched.waves()]
    assert waves == [[(0, k), (1, k)] for k in range(1, 7)]
    assert sched.final_inbox(0) == sched.final_inbox(1) == {}


def test_partner_is_a_neighbour_drawn_from_the_seed():
    nbrs = (2, 5, 7)
    draws = [partner(3, 0, k, nbrs) for k in range(1, 200)]
    assert set(draws) == set(nbrs)
    assert draws == [partner(3, 0, k, nbrs) for k in range(1, 200)]
    assert draws != [partner(4, 0, k, nbrs) for k in range(1, 200)]


def _run(sched: PairwiseSchedule, x0: np.ndarray, targets: np.ndarray, lr: float, check=None):
    """The relay's calls in wave order, each node's work a gradient step on (x - b_i)^2 / 2."""
    algo = ADPSGD()
    n = len(x0)
    params = {i: {"w": np.array([x0[i]])} for i in range(n)}
    state = {i: algo.init_state(params[i]) for i in range(n)}
    sent: dict[tuple[int, int], dict] = {}
    for wave in sched.waves():
        for plan in wave:
            i = plan.activation.node
            inbox = {j: sent[(j, k)] for j, k in plan.inbox.items()}
            x = algo.combine(params[i], state[i], inbox, {}, i, event=plan.event)
            if plan.train:
                trained = {"w": x["w"] - lr * (x["w"] - targets[i])}
                params[i] = trained
                sent[(i, plan.activation.index)] = algo.message(trained, state[i])
            else:
                sent[(i, plan.activation.index)] = algo.resting_message(state[i])
        if check is not None:
            check(state)
    return np.array([algo.combine(params[i], state[i], {}, {}, i, event="final")["w"][0]
                     for i in range(n)])  # fmt: skip


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("faulty", [False, True])
def test_pairwise_averaging_keeps_the_sum_and_reaches_the_mean(seed, faulty):
    # with dropouts and lost messages too: a failed exchange moves nothing, half of one would
    rng = np.random.default_rng(seed)
    g = nx.connected_watts_strogatz_graph(8, 4, 0.3, seed=seed)
    faults = ActivationFaults(seed, node_dropout=0.3, link_drop=0.3) if faulty else None
    sched = PairwiseSchedule(_clock(list(rng.uniform(0.5, 3.0, 8)), g, 0.2), 400.0, [0.0],
                             seed=seed, faults=faults)  # fmt: skip
    assert bool(sched.dropped) == bool(sched.lost) == faulty
    x0 = rng.normal(0.0, 10.0, 8)

    def same_sum(state):  # an exchange moves mass between two nodes, never creates any
        total = sum(float(s["x:w"][0]) for s in state.values())
        assert total == pytest.approx(x0.sum(), abs=1e-9)

    final = _run(sched, x0, np.zeros(8), lr=0.0, check=same_sum)
    assert np.abs(final - x0.mean()).max() < 1e-6


def test_least_squares_reaches_the_mean_of_the_targets_with_slow_nodes():
    # node i's loss (x - b_i)^2 / 2: the network's optimum is mean(b); two nodes 4x slower
    g = nx.cycle_graph(8)
    compute = [4.0 if i in (2, 5) else 1.0 for i in range(8)]
    sched = PairwiseSchedule(_clock(compute, g, 0.1), 600.0, [0.0], seed=1)
    targets = np.arange(8.0)
    final = _run(sched, np.zeros(8), targets, lr=0.02)
    # constant steps leave an O(lr) spread around the optimum; no node stays near its own b_i
    assert np.abs(final.mean() - targets.mean()) < 0.1  # 0.009 here
    assert np.abs(final - targets.mean()).max() < 0.4  # 0.19 here


def test_algorithm_events():
    algo = ADPSGD()
    state = algo.init_state({"w": np.array([1.0, 3.0])})
    x = algo.combine({}, state, {}, {}, 0, event="start")
    assert np.array_equal(x["w"], [1.0, 3.0])
    assert np.array_equal(algo.message({"w": np.array([2.0, 3.0])}, state)["w"], [1.0, 3.0])
    # a neighbour averages with it mid-activation: the pending update waits
    x = algo.combine({}, state, {4: {"w": np.array([3.0, 5.0])}}, {}, 0, event="pair")
    assert np.array_equal(x["w"], [2.0, 4.0]) and np.array_equal(state["delta:w"], [1.0, 0.0])
    # its own end: average with its partner, then the update
    x = algo.combine({}, state, {1: {"w": np.array([0.0, 0.0])}}, {}, 0, event="finish")
    assert np.array_equal(x["w"], [2.0, 2.0]) and not state["delta:w"].any()
    with pytest.raises(ValueError, match="one neighbour"):
        algo.combine({}, state, {1: {"w": x["w"]}, 2: {"w": x["w"]}}, {}, 0, event="pair")
    with pytest.raises(ValueError, match="event"):
        algo.combine({}, state, {}, {}, 0, event="round")
