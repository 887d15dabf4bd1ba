"""How heterogeneous the nodes' data are, and how that heterogeneity sits on the graph.

Pure functions of the per-node label histograms (nodes x classes) and the graph's edges:

* ``label_entropy``: entropy (bits) of each node's label distribution (log2 C: all classes
  equally; 0: one class);
* ``tv_matrix``: total-variation distance 1/2 sum_c |p_i(c) - p_j(c)| between nodes' label
  distributions (0: identical, 1: no class in common);
* ``edge_tv``: its mean over the graph's edges, ``all_pairs_tv`` over all pairs of nodes, and
  their ratio (< 1: neighbours are more alike than two nodes drawn at random, the data
  heterogeneity is *clustered* on the graph; > 1: neighbours differ more, it is *spread*).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

Edge = tuple[int, int]


def label_distributions(hists: np.ndarray) -> np.ndarray:
    """Rows normalised to sum to 1 (an empty node: all zeros)."""
    hists = np.asarray(hists, dtype=float)
    totals = hists.sum(axis=1, keepdims=True)
    return np.divide(hists, totals, out=np.zeros_like(hists), where=totals > 0)


def tv_matrix(hists: np.ndarray) -> np.ndarray:
    """Total-variation distance between every two nodes' label distributions (n x n)."""
    p = label_distributions(hists)
    return 0.5 * np.abs(p[:, None, :] - p[None, :, :]).sum(axis=2)


def label_entropy(hists: np.ndarray) -> np.ndarray:
    """Entropy in bits of each node's label distribution."""
    p = label_distributions(hists)
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=1) + 0.0  # + 0.0: no -0.0 in the JSON


def undirected_edges(neighbours: Sequence[Iterable[int]]) -> list[Edge]:
    """Unique unordered edges {i, j}, i != j, from per-node neighbour lists (either direction)."""
    return sorted({(min(i, j), max(i, j)) for i, nbrs in enumerate(neighbours)
                   for j in nbrs if i != j})  # fmt: skip


def mean_edge_tv(dist: np.ndarray, edges: Sequence[Edge]) -> float | None:
    """Mean of ``dist`` over ``edges``; None without edges."""
    if not edges:
        return None
    u, v = np.asarray(edges).T
    return float(dist[u, v].mean())


def all_pairs_tv(dist: np.ndarray) -> float | None:
    """Mean of ``dist`` over all unordered pairs of distinct nodes; None for one node."""
    n = len(dist)
    if n < 2:
        return None
    return float(dist[np.triu_indices(n, k=1)].mean())


def heterogeneity(hists: np.ndarray, edges: Sequence[Edge] | None) -> dict:
    """The ``heterogeneity`` object of summary.json (edge figures None without a graph)."""
    hists = np.asarray(hists)
    dist = tv_matrix(hists)
    union = hists.sum(axis=0, keepdims=True)
    edge = mean_edge_tv(dist, edges) if edges is not None else None
    pairs = all_pairs_tv(dist)
    return {
        "size": [int(s) for s in hists.sum(axis=1)],
        "label_entropy": [round(float(h), 6) for h in label_entropy(hists)],
        # each node against the union of all nodes' data: the usual label-skew figure
        "global_tv": float(np.mean(tv_matrix(np.vstack([union, hists]))[0, 1:])),
        "edge_tv": edge,
        "all_pairs_tv": pairs,
        "edge_to_all_pairs": edge / pairs if edge is not None and pairs else None,
        "num_edges": len(edges) if edges is not None else None,
    }
