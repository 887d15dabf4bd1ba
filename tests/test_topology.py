import math

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

from flower_p2p.registry import ConfigError
from flower_p2p.topology import (
    DENSE_EIG_MAX,
    GRAPHS,
    MIXINGS,
    GraphParams,
    build_graph,
    build_topology,
    check_mixing,
    spectral_gap,
)


@pytest.mark.parametrize("name", GRAPHS.names())
@pytest.mark.parametrize("n", [8, 9, 16])
def test_every_topology_is_connected_on_nodes_0_to_n(name, n):
    g = build_graph(name, n, seed=3, params=GraphParams(degree=3 if n % 2 == 0 else 4))
    assert sorted(g.nodes) == list(range(n))
    assert nx.is_connected(g)
    assert nx.number_of_selfloops(g) == 0


@pytest.mark.parametrize(
    ("name", "n", "degrees"),
    [
        ("ring", 8, {2}),
        ("complete", 6, {5}),
        ("torus", 9, {4}),  # 3 x 3 periodic grid
        ("torus", 16, {4}),
        ("exponential", 8, {5}),  # +-1, +-2, 4
        ("exponential", 16, {7}),  # +-1, +-2, +-4, 8
        ("random-regular", 10, {3}),
    ],
)
def test_expected_degrees(name, n, degrees):
    g = build_graph(name, n, seed=0, params=GraphParams(degree=3))
    assert {d for _, d in g.degree()} == degrees


def test_star_degrees_and_small_world_edge_count():
    star = build_graph("star", 7, seed=0)
    assert star.degree(0) == 6 and all(star.degree(i) == 1 for i in range(1, 7))
    sw = build_graph("small-world", 12, seed=1, params=GraphParams(small_world_k=4))
    assert sw.number_of_edges() == 12 * 4 // 2  # rewiring moves edges, never adds any


def test_random_graphs_are_reproducible_from_the_seed():
    a = build_graph("erdos-renyi", 12, seed=5, params=GraphParams(edge_prob=0.25))
    b = build_graph("erdos-renyi", 12, seed=5, params=GraphParams(edge_prob=0.25))
    c = build_graph("erdos-renyi", 12, seed=6, params=GraphParams(edge_prob=0.25))
    assert set(a.edges) == set(b.edges)
    assert set(a.edges) != set(c.edges)


@pytest.mark.parametrize("name", GRAPHS.names())
@pytest.mark.parametrize("mixing", ["metropolis-hastings", "max-degree"])
def test_weights_symmetric_doubly_stochastic_on_edges_only(name, mixing):
    topo = build_topology(name, mixing, 12, seed=2, params=GraphParams(degree=3))
    w = topo.dense()
    assert np.allclose(w, w.T)
    assert np.allclose(w.sum(axis=0), 1) and np.allclose(w.sum(axis=1), 1)
    assert (w >= 0).all()
    adjacency = nx.to_numpy_array(topo.graph, nodelist=range(12)) + np.eye(12)
    assert (w[adjacency == 0] == 0).all()
    assert 0 < topo.spectral_gap <= 1


def test_uniform_neighbour_on_regular_graph_and_refused_on_irregular():
    topo = build_topology("ring", "uniform-neighbour", 8, seed=0)
    assert np.allclose(topo.dense()[0, [7, 0, 1]], 1 / 3)
    with pytest.raises(ConfigError, match="mixing='uniform-neighbour'.*doubly stochastic"):
        build_topology("star", "uniform-neighbour", 8, seed=0)


@pytest.mark.parametrize("n", [3, 5, 8, 12, 33])
def test_ring_spectral_gap_matches_closed_form(n):
    w = MIXINGS.get("metropolis-hastings")(build_graph("ring", n, seed=0))
    # all degrees 2 -> W = I/3 + A/3; eigenvalues 1/3 + 2/3 cos(2 pi k / n)
    assert spectral_gap(w) == pytest.approx(2 / 3 * (1 - math.cos(2 * math.pi / n)))


def test_edge_list_file(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("# a path graph\n0 1\n1 2\n2 3\n")
    g = build_graph(str(path), 4, seed=0)
    assert set(g.edges) == {(0, 1), (1, 2), (2, 3)}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0 1\n2 3\n", r"topology=.*connected graph \(components: \[\[0, 1\], \[2, 3\]\]\)"),
        ("0 1\n1 1\n2 3\n1 2\n", "self-loop"),
        ("0 1\n1 2\n2 9\n", r"node ids in \[0, 3\]"),
        ("0 x\n", "two integer node ids"),
    ],
)
def test_bad_edge_lists_are_refused(tmp_path, text, match):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        build_graph(str(path), 4, seed=0)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError, match="topology='hypercube'.*ring, torus"):
        build_graph("hypercube", 8, seed=0)
    with pytest.raises(ConfigError, match="mixing='laplacian'.*metropolis-hastings"):
        build_topology("ring", "laplacian", 8, seed=0)


@pytest.mark.parametrize("mixing", ["metropolis-hastings", "max-degree"])
def test_mixing_weights_are_stored_in_o_of_edges(mixing):
    # a dense matrix would hold n^2 = 1M entries; the ring has n + 2n
    topo = build_topology("ring", mixing, 1024, seed=0)
    assert sp.issparse(topo.weights) and topo.weights.nnz == 3 * 1024
    assert topo.row(0) == pytest.approx({0: 1 / 3, 1023: 1 / 3, 1: 1 / 3})
    assert list(topo.row(0)) == [0, 1, 1023]  # itself first, then senders ascending
    assert topo.spectral_gap == pytest.approx(2 / 3 * (1 - math.cos(2 * math.pi / 1024)))


@pytest.mark.parametrize("name", ["erdos-renyi", "small-world", "star", "random-regular"])
def test_sparse_rows_equal_the_dense_matrix(name):
    topo = build_topology(name, "metropolis-hastings", 20, seed=4, params=GraphParams(degree=3))
    dense = topo.dense()
    for i in range(20):
        row = topo.row(i)
        assert set(row) == {i, *topo.in_neighbours[i]}
        assert all(row[j] == dense[i, j] for j in row)
        assert sum(row.values()) == pytest.approx(1.0)


def test_check_mixing_refuses_weight_off_the_graph():
    g = build_graph("ring", 6, seed=0)
    w = MIXINGS.get("metropolis-hastings")(g).toarray()
    w[0, 3] = w[3, 0] = 0.1  # 0 and 3 are not neighbours on a 6-ring
    w[0, 0] -= 0.1
    w[3, 3] -= 0.1
    with pytest.raises(ValueError, match="non-neighbours"):
        check_mixing(sp.csr_array(w), g)


def test_spectral_gap_is_not_made_up_past_the_dense_limit():
    big = build_topology("ring", "metropolis-hastings", DENSE_EIG_MAX + 1, seed=0)
    assert big.spectral_gap is None
