"""Directed and time-varying topologies: per-round weights and connectivity."""

import numpy as np
import pytest

from flower_p2p.config import ExperimentConfig
from flower_p2p.schedules import is_schedule, period_spectral_gap, topology_at


def _cfg(topology, n=8, **kw):
    return ExperimentConfig(topology=topology, num_nodes=n, **kw)


def test_directed_exponential_sends_to_i_plus_powers_of_two():
    topo = topology_at(_cfg("directed-exponential", strategy="push-sum"), 1)
    assert topo.out_neighbours[0] == (1, 2, 4) and topo.in_neighbours[0] == (4, 6, 7)
    w = topo.dense()
    assert np.allclose(w.sum(axis=0), 1) and np.allclose(w.sum(axis=1), 1)  # column (and row)
    assert w[1, 0] == w[0, 0] == pytest.approx(1 / 4)


@pytest.mark.parametrize("n", [8, 16])
def test_one_peer_exponential_averages_exactly_after_one_period(n):
    cfg = _cfg("one-peer-exponential", n=n)
    hops = [topology_at(cfg, t).out_neighbours[0][0] for t in range(4)]
    assert hops[:3] == [1, 2, 4]
    assert all(len(topology_at(cfg, t).out_neighbours[i]) == 1 for t in range(4) for i in range(n))
    assert period_spectral_gap(cfg) == pytest.approx(1.0)


@pytest.mark.parametrize("n", [8, 9])
def test_random_matching_is_a_fresh_reproducible_matching_each_round(n):
    cfg = _cfg("random-matching", n=n)
    rounds = [topology_at(cfg, t) for t in range(1, 6)]
    for topo in rounds:
        degrees = [d for _, d in topo.graph.degree()]
        assert max(degrees) == 1 and degrees.count(0) == n % 2
        assert np.allclose(topo.dense(), topo.dense().T)
        assert np.allclose(topo.dense().sum(axis=1), 1)
    assert len({frozenset(t.graph.edges) for t in rounds}) > 1
    again = topology_at(_cfg("random-matching", n=n), 3)
    assert set(again.graph.edges) == set(rounds[2].graph.edges)
    other_seed = topology_at(_cfg("random-matching", n=n, seed=1), 3)
    assert set(other_seed.graph.edges) != set(rounds[2].graph.edges)
    assert period_spectral_gap(cfg) is None


def test_static_topologies_are_not_schedules_and_keep_their_graph():
    cfg = _cfg("ring")
    assert not is_schedule("ring")
    assert topology_at(cfg, 1) is topology_at(cfg, 7)
