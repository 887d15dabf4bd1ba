"""Communication over time: directed graphs and graphs that change every round.

* ``directed-exponential``: node i sends to i + 2^k (mod n) for every 2^k < n (static, directed);
* ``one-peer-exponential``: in round t node i sends to i + 2^(t mod K) only, K = ceil(log2 n)
  (Ying et al. 2021): one message per node per round, exact averaging after K rounds when n is a
  power of two;
* ``random-matching``: a fresh random maximal matching of the nodes every round, from the seed.

Directed graphs use column-stochastic uniform weights (a sender splits its mass equally between
itself and its out-neighbours): what push-sum needs. All three schedules here are also doubly
stochastic (every node has the same in- and out-degree), so DSGD-style algorithms converge to the
exact average on them too; ``check_schedule`` verifies this for every round it is asked about.
``random-matching`` uses the run's ``mixing`` rule on each round's matching (1/2 per pair).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from flower_p2p.registry import ConfigError
from flower_p2p.topology import (
    DENSE_EIG_MAX,
    GRAPHS,
    MIXINGS,
    GraphParams,
    Topology,
    build_topology,
    graph_params,
    sparse_matrix,
    topology_for,
)

SCHEDULES = ("directed-exponential", "one-peer-exponential", "random-matching")


def _hops(n: int) -> list[int]:
    return [2**k for k in range(max(1, math.ceil(math.log2(n))))]


def column_stochastic_uniform(g: nx.DiGraph) -> sp.csr_array:
    """W[i, j] = 1 / (out_degree(j) + 1) for every edge j -> i and for i = j."""
    rows, cols, values = [], [], []
    for j in range(g.number_of_nodes()):
        share = 1.0 / (g.out_degree(j) + 1)
        for i in (j, *g.successors(j)):
            rows.append(i)
            cols.append(j)
            values.append(share)
    return sparse_matrix(g.number_of_nodes(), rows, cols, values)


def directed_exponential_graph(n: int) -> nx.DiGraph:
    """I -> i + 2^k (mod n) for every 2^k < n."""
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from((i, (i + h) % n) for h in _hops(n) if h < n for i in range(n))
    return g


def one_peer_graph(n: int, rnd: int) -> nx.DiGraph:
    """Round ``rnd``'s one-peer exponential graph: i -> i + 2^(rnd mod K)."""
    hops = _hops(n)
    hop = hops[rnd % len(hops)]
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from((i, (i + hop) % n) for i in range(n) if (i + hop) % n != i)
    return g


def random_matching_graph(n: int, seed: int, rnd: int) -> nx.Graph:
    """A uniformly random maximal matching (one node idle when n is odd), fixed by (seed, rnd)."""
    order = np.random.default_rng([seed, rnd]).permutation(n)
    g = nx.empty_graph(n)
    g.add_edges_from((int(order[k]), int(order[k + 1])) for k in range(0, n - 1, 2))
    return g


def is_schedule(spec: str) -> bool:
    """True for the directed / time-varying topologies of this module."""
    return spec in SCHEDULES


def topology_at(cfg, rnd: int) -> Topology:  # cfg: ExperimentConfig
    """The graph that messages sent in round ``rnd`` travel over (static topologies: always one)."""
    if cfg.strategy == "fedavg":  # the server-average reference: everyone hears everyone
        return _complete(cfg.num_nodes)
    if cfg.strategy == "relay-sum":  # RelaySum relays over a spanning tree of the graph
        return _relay_tree(cfg.topology, cfg.mixing, cfg.num_nodes, cfg.seed, graph_params(cfg))
    if not is_schedule(cfg.topology):
        return topology_for(cfg)
    # random-matching changes every round; the exponential ones repeat with period K
    key = rnd if cfg.topology == "random-matching" else rnd % len(_hops(cfg.num_nodes))
    return _scheduled(cfg.topology, cfg.mixing, cfg.num_nodes, cfg.seed, key)


def spanning_tree(g: nx.Graph) -> nx.Graph:
    """A breadth-first spanning tree of ``g`` from its centre: the shallowest one.

    RelaySum reaches every node in as many rounds as the tree's diameter, at most twice its
    height; a ring's spanning trees are all paths (diameter n - 1).
    """
    tree = nx.Graph(nx.bfs_tree(g, min(nx.center(g))))
    tree.add_nodes_from(g.nodes)
    return tree


@functools.lru_cache(maxsize=8)
def _relay_tree(spec: str, mixing: str, n: int, seed: int, params: GraphParams) -> Topology:
    graph = build_topology(spec, mixing, n, seed, params).graph
    tree = spanning_tree(graph)
    # RelaySum uses no weights; Metropolis-Hastings on the tree only keeps Topology valid
    return Topology(graph=tree, weights=MIXINGS.get("metropolis-hastings")(tree),
                    name=f"{spec} (spanning tree)", mixing="none")  # fmt: skip


@functools.lru_cache(maxsize=8)
def _complete(n: int) -> Topology:
    g = nx.complete_graph(n)
    everyone = np.arange(n)
    w = sparse_matrix(n, np.repeat(everyone, n), np.tile(everyone, n), [1.0 / n] * (n * n))
    return Topology(graph=g, weights=w, name="complete", mixing="uniform")


# Rounds are visited in order; one period of the exponential schedules is at most 32 graphs up to
# 2^32 nodes. Each holds O(edges) weights.
@functools.lru_cache(maxsize=32)
def _scheduled(spec: str, mixing: str, n: int, seed: int, key: int) -> Topology:
    if spec == "directed-exponential":
        g = directed_exponential_graph(n)
        w = column_stochastic_uniform(g)
    elif spec == "one-peer-exponential":
        g = one_peer_graph(n, key)
        w = column_stochastic_uniform(g)
    else:
        g = random_matching_graph(n, seed, key)
        w = MIXINGS.get(mixing)(g)
    return Topology(graph=g, weights=w, name=spec, mixing=mixing)


@dataclass(frozen=True)
class Reach:
    """Who hears whom over a whole run: the union of the graphs of rounds 1 .. num-rounds."""

    in_neighbours: tuple[tuple[int, ...], ...]
    out_neighbours: tuple[tuple[int, ...], ...]


def reach_topology(cfg) -> Reach:  # cfg: ExperimentConfig
    """The union of the graphs that messages travel over in the run's rounds.

    An algorithm that keeps copies of its neighbours' state (CHOCO) must send to every node that
    will ever mix with it, in every round: on a static graph that is the graph, on a schedule the
    union of its graphs (for ``random-matching`` over a long run, nearly every pair).
    """
    return _reach(cfg)


@functools.lru_cache(maxsize=16)
def _reach(cfg) -> Reach:  # cfg: ExperimentConfig (frozen, hashable)
    spec, n, rounds = cfg.topology, cfg.num_nodes, cfg.num_rounds
    if not is_schedule(spec) or cfg.strategy == "fedavg":
        topo = topology_at(cfg, 1)
        return Reach(topo.in_neighbours, topo.out_neighbours)
    # the exponential schedules repeat with their period: no need to walk every round
    last = rounds if spec == "random-matching" else min(rounds, len(_hops(n)))
    ins: list[set[int]] = [set() for _ in range(n)]
    for rnd in range(1, last + 1):
        topo = topology_at(cfg, rnd)
        for i in range(n):
            ins[i].update(topo.in_neighbours[i])
    outs: list[set[int]] = [set() for _ in range(n)]
    for i, senders in enumerate(ins):
        for j in senders:
            outs[j].add(i)
    return Reach(tuple(tuple(sorted(s)) for s in ins), tuple(tuple(sorted(s)) for s in outs))


def check_schedule(cfg, rounds: int | None = None) -> None:  # cfg: ExperimentConfig
    """Validate the weights of the first ``rounds`` rounds and the union graph's connectivity."""
    if not is_schedule(cfg.topology):
        return
    n = cfg.num_nodes
    if n < 2:
        raise ConfigError("num-nodes", n, f"at least 2 for topology={cfg.topology}")
    rounds = rounds or max(len(_hops(n)), min(cfg.num_rounds, 16))
    union = sp.csr_array((n, n))
    for rnd in range(1, rounds + 1):
        topo = topology_at(cfg, rnd)
        w = topo.weights
        columns, rows = (np.asarray(w.sum(axis=a)).ravel() for a in (0, 1))
        if (w.data < 0).any() or not np.allclose(columns, 1.0):
            raise ConfigError("topology", cfg.topology, "column-stochastic weights every round")
        if cfg.strategy != "push-sum" and not np.allclose(rows, 1.0):
            raise ConfigError(
                "strategy",
                cfg.strategy,
                f"push-sum on topology={cfg.topology} (not doubly stochastic)",
            )
        union = union + abs(w)  # W[i, j] != 0: j reaches i (both ways on undirected graphs)
    # O(edges), where a networkx union graph of thousands of nodes took seconds per round
    parts, _ = connected_components(union, directed=True, connection="strong")
    if parts > 1:
        raise ConfigError(
            "topology", cfg.topology, f"a schedule whose first {rounds} rounds connect all nodes"
        )


def period_spectral_gap(cfg) -> float | None:  # cfg: ExperimentConfig
    """1 - |lambda_2| of the product of one period's matrices.

    None for random schedules, and for exponential schedules past ``DENSE_EIG_MAX`` nodes (their
    period's product is a dense n x n matrix).
    """
    if not is_schedule(cfg.topology) or cfg.strategy == "fedavg":
        return topology_at(cfg, 1).spectral_gap
    if cfg.topology == "random-matching" or cfg.num_nodes > DENSE_EIG_MAX:
        return None
    period = 1 if cfg.topology == "directed-exponential" else len(_hops(cfg.num_nodes))
    product = np.eye(cfg.num_nodes)
    for rnd in range(period):
        product = topology_at(cfg, rnd).weights @ product
    mags = np.sort(np.abs(np.linalg.eigvals(product)))[::-1]
    return float(1.0 - mags[1])


__all__ = ["GRAPHS", "SCHEDULES", "Reach", "check_schedule", "is_schedule",
           "period_spectral_gap", "reach_topology", "topology_at"]  # fmt: skip
