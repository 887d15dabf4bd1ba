"""Which partition goes to which graph node (``placement``), for any partitioner and topology.

A partitioner makes ``num-nodes`` partitions; placement decides that node ``i`` holds partition
``perm[i]``:

* ``random``: ``perm[i] = i``, as every partitioner's own order (which is random for the random
  ones, and deliberate for ``unseen``'s layouts);
* ``clustered``: neighbours hold similar label distributions: ``perm`` minimises the mean total
  variation between the label distributions of the two ends of an edge (``edge_tv``);
* ``spread``: neighbours as different as possible: ``perm`` maximises it.

Finding the best ``perm`` is a quadratic assignment problem; ``place`` runs a steepest-descent
search over swaps of two nodes' partitions, from the identity and from a few permutations drawn
from the seed, and keeps the best (never worse than ``random``, deterministic from the seed).

The graph is the union of the graphs messages travel over in the run (``reach_topology``: the
graph itself, RelaySum's spanning tree, the exponential schedules' period). Refused: a graph on
which every node neighbours every other (``complete``, ``fedavg``, 2 or 3 nodes on a ring), where
every placement is the same, and ``random-matching``, whose fresh matching every round gives no
neighbourhood to place on. The centralized reference has no graph: it ignores ``placement``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from flower_p2p.heterogeneity import Edge, mean_edge_tv, tv_matrix, undirected_edges
from flower_p2p.registry import ConfigError, Registry

PLACEMENTS: Registry = Registry("placement")
RANDOM_STARTS = 4  # besides the identity; more rarely helps on graphs of tens of nodes
_STARTS = 3  # the seed's stream for the search's starting permutations


def _search(sign: float) -> Callable[[np.ndarray, Sequence[Edge], int], list[int]]:
    def search(hists: np.ndarray, edges: Sequence[Edge], seed: int) -> list[int]:
        return best_placement(tv_matrix(hists), edges, sign, seed)

    return search


PLACEMENTS.register("random")(lambda hists, edges, seed: list(range(len(hists))))
PLACEMENTS.register("clustered")(_search(1.0))
PLACEMENTS.register("spread")(_search(-1.0))


def place(hists: np.ndarray, edges: Sequence[Edge], mode: str, seed: int) -> list[int]:
    """``perm`` with node ``i`` holding partition ``perm[i]`` (``hists``: partition x class)."""
    return PLACEMENTS.get(mode)(np.asarray(hists), list(edges), seed)


def best_placement(dist: np.ndarray, edges: Sequence[Edge], sign: float, seed: int) -> list[int]:
    """Permutation minimising ``sign`` x the sum of ``dist`` over edges (local search)."""
    n = len(dist)
    adj = np.zeros((n, n))
    for u, v in edges:
        adj[u, v] = adj[v, u] = 1.0
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STARTS]))
    starts = [np.arange(n)] + [rng.permutation(n) for _ in range(RANDOM_STARTS)]
    best, best_cost = starts[0], np.inf
    for start in starts:
        perm = _descend(dist, adj, sign, start.copy())
        cost = sign * mean_edge_tv(dist[np.ix_(perm, perm)], edges)
        if cost < best_cost - 1e-12:
            best, best_cost = perm, cost
    return [int(p) for p in best]


def _descend(dist: np.ndarray, adj: np.ndarray, sign: float, perm: np.ndarray) -> np.ndarray:
    """Swap two nodes' partitions while the best swap lowers ``sign`` x the edge sum."""
    for _ in range(len(perm) ** 2):  # each swap strictly improves: this bound is never reached
        d = dist[np.ix_(perm, perm)]  # distances between the partitions nodes hold now
        m = adj @ d  # m[a, b]: sum over a's neighbours v of d(partition of v, partition of b)
        diag = np.diag(m)
        # change of the edge sum when nodes a and b swap partitions (an edge a-b keeps its length)
        delta = sign * (m + m.T - diag[:, None] - diag[None, :] + 2 * adj * d)
        a, b = np.unravel_index(np.argmin(delta), delta.shape)
        if delta[a, b] >= -1e-12:
            return perm
        perm[[a, b]] = perm[[b, a]]
    return perm


def check_placement_strategy(placement: str, strategy: str, topology: str) -> None:
    """Refuse what ``placement`` cannot mean, from the config alone (no data, no graph)."""
    PLACEMENTS.get(placement)
    if placement == "random" or strategy == "centralized":
        return
    if strategy == "fedavg":
        raise ConfigError(
            "placement", placement,
            "random with strategy=fedavg: every node gets the average of all models, so no "
            "node has neighbours to place",
        )  # fmt: skip
    if topology == "random-matching":
        raise ConfigError(
            "placement", placement,
            "random with topology=random-matching: a fresh random matching every round gives "
            "no fixed neighbours to place partitions next to",
        )  # fmt: skip


def placement_edges(cfg) -> list[Edge] | None:  # cfg: ExperimentConfig
    """Edges that placement and ``edge_tv`` use: the run's reach graph (None: centralized)."""
    from flower_p2p.schedules import reach_topology

    if cfg.strategy == "centralized" or cfg.num_nodes < 2:
        return None
    return undirected_edges(reach_topology(cfg).in_neighbours)


def check_graph(placement: str, edges: Sequence[Edge], num_nodes: int, topology: str) -> None:
    """Refuse clustered/spread on a graph where every placement is the same (complete)."""
    if placement != "random" and len(edges) == num_nodes * (num_nodes - 1) // 2:
        raise ConfigError(
            "placement", placement,
            f"random on topology={topology} with {num_nodes} nodes: every node neighbours every "
            "other, so every placement gives the same neighbours",
        )  # fmt: skip
