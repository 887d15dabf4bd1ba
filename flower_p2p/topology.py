"""Communication graphs (networkx) and gossip mixing matrices.

The static graphs here are undirected, on nodes ``0..n-1`` (the nodes' ``partition-id``), and
connected. Their mixing matrices are symmetric and doubly stochastic, so plain gossip converges
to the exact average; the spectral gap ``1 - |lambda_2(W)|`` sets how fast. Directed graphs and
graphs that change every round live in ``schedules.py``.

Mixing matrices are sparse (``scipy.sparse.csr_array``): building, checking and reading a row
cost O(edges), not O(nodes^2), so a 1,024-node ring holds 3,072 weights, not a million.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import scipy.sparse as sp

from flower_p2p.registry import ConfigError, Registry

GRAPHS: Registry = Registry("topology")
MIXINGS: Registry = Registry("mixing")

# Resampling random graphs until connected must end; past this many seeds we blame the params.
_MAX_RESAMPLES = 1000
# Up to this many nodes the spectral gap comes from all eigenvalues of the dense matrix (exact,
# about a second at 2,048 nodes); past it the gap is not computed.
DENSE_EIG_MAX = 2048


@dataclass(frozen=True)
class GraphParams:
    """Parameters of the random graph families (ignored by the others)."""

    edge_prob: float = 0.3
    degree: int = 3
    small_world_k: int = 4
    small_world_p: float = 0.2


@GRAPHS.register("ring")
def ring(n: int, seed: int, p: GraphParams) -> nx.Graph:
    """Cycle 0-1-...-(n-1)-0 (a single edge for n = 2)."""
    return nx.cycle_graph(n) if n > 2 else nx.path_graph(n)


def _torus_shape(n: int) -> tuple[int, int]:
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


@GRAPHS.register("torus")
def torus(n: int, seed: int, p: GraphParams) -> nx.Graph:
    """2-D periodic grid of rows x cols = n, as square as n's divisors allow."""
    rows, cols = _torus_shape(n)
    if rows == 1:
        # A 1 x n torus is just a ring; say so rather than silently returning one.
        raise ConfigError("topology", "torus", f"num-nodes with a divisor >= 2 (got prime {n})")
    g = nx.grid_2d_graph(rows, cols, periodic=True)
    return nx.convert_node_labels_to_integers(g, ordering="sorted")


@GRAPHS.register("complete")
def complete(n: int, seed: int, p: GraphParams) -> nx.Graph:
    """Every node linked to every other."""
    return nx.complete_graph(n)


@GRAPHS.register("star")
def star(n: int, seed: int, p: GraphParams) -> nx.Graph:
    """Node 0 linked to all others (still no server: node 0 is a peer that trains)."""
    return nx.star_graph(n - 1)


def _resample_connected(make, key: str, hint: str) -> nx.Graph:
    for attempt in range(_MAX_RESAMPLES):
        g = make(attempt)
        if nx.is_connected(g):
            return g
    raise ConfigError(key, "disconnected", f"parameters giving a connected graph ({hint})")


@GRAPHS.register("erdos-renyi")
def erdos_renyi(n: int, seed: int, p: GraphParams) -> nx.Graph:
    """G(n, edge-prob), resampled from seed, seed+1, ... until connected."""
    if not 0.0 < p.edge_prob <= 1.0:
        raise ConfigError("edge-prob", p.edge_prob, "a probability in (0, 1]")
    return _resample_connected(
        lambda k: nx.gnp_random_graph(n, p.edge_prob, seed=seed + k),
        "edge-prob",
        f"no connected G({n}, {p.edge_prob}) in {_MAX_RESAMPLES} samples; raise edge-prob",
    )


@GRAPHS.register("small-world")
def small_world(n: int, seed: int, p: GraphParams) -> nx.Graph:
    """Watts-Strogatz: ring lattice with small-world-k neighbours, rewired w.p. small-world-p."""
    if not 2 <= p.small_world_k < n:
        raise ConfigError("small-world-k", p.small_world_k, f"an integer in [2, {n - 1}]")
    if not 0.0 <= p.small_world_p <= 1.0:
        raise ConfigError("small-world-p", p.small_world_p, "a probability in [0, 1]")
    return _resample_connected(
        lambda k: nx.watts_strogatz_graph(n, p.small_world_k, p.small_world_p, seed=seed + k),
        "small-world-p",
        "lower small-world-p or raise small-world-k",
    )


@GRAPHS.register("random-regular")
def random_regular(n: int, seed: int, p: GraphParams) -> nx.Graph:
    """Uniform random d-regular graph (d = degree), resampled until connected."""
    d = p.degree
    connectable = d >= 2 or n == 2
    if not (1 <= d < n and (n * d) % 2 == 0 and connectable):
        raise ConfigError(
            "degree", d, f"an integer in [2, {n - 1}] with num-nodes * degree even (num-nodes={n})"
        )
    return _resample_connected(
        lambda k: nx.random_regular_graph(d, n, seed=seed + k), "degree", "raise degree"
    )


@GRAPHS.register("exponential")
def exponential(n: int, seed: int, p: GraphParams) -> nx.Graph:
    """Node i linked to i +- 2^k (mod n) for every 2^k < n: O(log n) degree, large gap."""
    g = nx.empty_graph(n)
    hop = 1
    while hop < n:
        g.add_edges_from((i, (i + hop) % n) for i in range(n) if (i + hop) % n != i)
        hop *= 2
    return g


def read_edge_list(path: Path, n: int) -> nx.Graph:
    """An undirected graph from a whitespace edge-list file ``u v`` per line (``#`` comments)."""
    if not path.is_file():
        raise ConfigError("topology", str(path), "a registered name or an existing edge-list file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            "topology", str(path), f"a readable UTF-8 edge-list file, 'u v' per line ({err})"
        ) from err
    g = nx.empty_graph(n)
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            u, v = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            raise ConfigError(
                "topology", f"{path}:{lineno}: {raw!r}", "lines of two integer node ids 'u v'"
            ) from None
        if u == v:
            raise ConfigError("topology", f"{path}:{lineno}: self-loop {u}-{v}", "no self-loops")
        if not (0 <= u < n and 0 <= v < n):
            raise ConfigError(
                "topology",
                f"{path}:{lineno}: edge {u}-{v}",
                f"node ids in [0, {n - 1}] (num-nodes)",
            )
        g.add_edge(u, v)
    return g


def build_graph(spec: str, n: int, seed: int, params: GraphParams | None = None) -> nx.Graph:
    """The connected communication graph named by ``spec`` (a registered name or a file path)."""
    params = params or GraphParams()
    if n < 2:
        raise ConfigError("num-nodes", n, "at least 2 nodes for a communication graph")
    if spec in GRAPHS:
        g = GRAPHS.get(spec)(n, seed, params)
    elif "/" in spec or spec.endswith((".txt", ".edges", ".edgelist", ".csv")):
        g = read_edge_list(Path(spec).expanduser(), n)
    else:
        GRAPHS.get(spec)  # raises with the list of known names
        raise AssertionError("unreachable")
    if not nx.is_connected(g):
        parts = [sorted(c) for c in nx.connected_components(g)]
        raise ConfigError("topology", spec, f"a connected graph (components: {parts})")
    return g


def sparse_matrix(n: int, rows: list[int], cols: list[int], values: list[float]) -> sp.csr_array:
    """The n x n CSR matrix with ``values`` at (``rows``, ``cols``) (duplicates summed)."""
    return sp.coo_array((np.asarray(values, dtype=np.float64), (rows, cols)), shape=(n, n)).tocsr()


def _with_diagonal_rest(
    n: int, rows: list[int], cols: list[int], values: list[float]
) -> sp.csr_array:
    """Off-diagonal weights plus, on the diagonal, what makes each row sum to 1."""
    off = sparse_matrix(n, rows, cols, values)
    rest = 1.0 - np.asarray(off.sum(axis=1)).ravel()
    return sparse_matrix(n, [*rows, *range(n)], [*cols, *range(n)], [*values, *rest])


@MIXINGS.register("metropolis-hastings")
def metropolis_hastings(g: nx.Graph) -> sp.csr_array:
    """W_ij = 1 / (1 + max(d_i, d_j)) on edges; the rest on the diagonal."""
    deg = dict(g.degree())
    rows, cols, values = [], [], []
    for i, j in g.edges():
        v = 1.0 / (1.0 + max(deg[i], deg[j]))
        rows += [i, j]
        cols += [j, i]
        values += [v, v]
    return _with_diagonal_rest(g.number_of_nodes(), rows, cols, values)


@MIXINGS.register("max-degree")
def max_degree(g: nx.Graph) -> sp.csr_array:
    """W_ij = 1 / (1 + d_max) on edges; the rest on the diagonal."""
    v = 1.0 / (1.0 + max(d for _, d in g.degree()))
    edges = list(g.edges())
    rows = [i for i, j in edges] + [j for i, j in edges]
    cols = [j for i, j in edges] + [i for i, j in edges]
    return _with_diagonal_rest(g.number_of_nodes(), rows, cols, [v] * len(rows))


@MIXINGS.register("uniform-neighbour")
def uniform_neighbour(g: nx.Graph) -> sp.csr_array:
    """W_ij = 1 / (1 + d_i) over the closed neighbourhood: doubly stochastic on regular graphs."""
    rows, cols, values = [], [], []
    for i in range(g.number_of_nodes()):
        share = 1.0 / (1.0 + g.degree(i))
        for j in (i, *g.neighbors(i)):
            rows.append(i)
            cols.append(j)
            values.append(share)
    return sparse_matrix(g.number_of_nodes(), rows, cols, values)


def check_mixing(w: sp.csr_array, g: nx.Graph, mixing: str = "mixing", atol: float = 1e-10) -> None:
    """Raise unless W is symmetric, doubly stochastic, non-negative and supported on g's edges.

    O(edges): every check reads only W's stored entries and g's edge list.
    """
    n = g.number_of_nodes()
    if w.shape != (n, n):
        raise ValueError(f"mixing matrix has shape {w.shape}, expected {(n, n)}")
    w = sp.csr_array(w)
    if (w.data < -atol).any():
        raise ConfigError("mixing", mixing, "a rule giving non-negative weights on this graph")
    asymmetry = abs(w - w.T).max() if w.nnz else 0.0
    if asymmetry > atol or not np.allclose(np.asarray(w.sum(axis=1)).ravel(), 1.0, atol=atol):
        degrees = sorted({d for _, d in g.degree()})
        raise ConfigError(
            "mixing",
            mixing,
            "a rule that is symmetric and doubly stochastic on this graph "
            f"(node degrees {degrees}; uniform-neighbour needs a regular graph: "
            "use metropolis-hastings or max-degree)",
        )
    coo = w.tocoo()
    off = (coo.row != coo.col) & (coo.data != 0)
    pairs = coo.row[off].astype(np.int64) * n + coo.col[off]
    edges = np.asarray(list(g.edges()), dtype=np.int64).reshape(-1, 2)
    allowed = np.concatenate([edges[:, 0] * n + edges[:, 1], edges[:, 1] * n + edges[:, 0]])
    if not np.isin(pairs, allowed).all():
        raise ValueError("mixing matrix has weight between non-neighbours")


def spectral_gap(w: sp.sparray | np.ndarray) -> float | None:
    """1 - |lambda_2(W)|: one minus the second-largest eigenvalue magnitude of W.

    Exact, from every eigenvalue of the dense matrix, up to ``DENSE_EIG_MAX`` nodes; None past
    that: ARPACK took 23 s and 156,000 iterations on a 4,096-node ring, whose gap is tiny, and
    may not converge at all; no figure rather than a slow or wrong one.
    """
    n = w.shape[0]
    if n > DENSE_EIG_MAX:
        return None
    dense = w.toarray() if sp.issparse(w) else np.asarray(w)
    eig = np.linalg.eigvalsh(dense) if np.allclose(dense, dense.T) else np.linalg.eigvals(dense)
    mags = np.sort(np.abs(eig))[::-1]
    return float(1.0 - mags[1])


@dataclass(frozen=True)
class Topology:
    """Who talks to whom in a round, and how much: a graph with its validated mixing matrix.

    ``weights[i, j]`` is the weight receiver i gives sender j (sparse: O(edges) entries). Graphs
    are undirected (networkx ``Graph``) or directed (``DiGraph``, edge j -> i: j sends to i).
    """

    graph: nx.Graph
    weights: sp.csr_array
    name: str
    mixing: str
    in_neighbours: tuple[tuple[int, ...], ...] = field(init=False)
    out_neighbours: tuple[tuple[int, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", sp.csr_array(self.weights))
        g, n = self.graph, self.graph.number_of_nodes()
        if g.is_directed():
            ins = tuple(tuple(sorted(g.predecessors(i))) for i in range(n))
            outs = tuple(tuple(sorted(g.successors(i))) for i in range(n))
        else:
            ins = outs = tuple(tuple(sorted(g.neighbors(i))) for i in range(n))
        object.__setattr__(self, "in_neighbours", ins)
        object.__setattr__(self, "out_neighbours", outs)

    @property
    def neighbours(self) -> tuple[tuple[int, ...], ...]:
        """Neighbours of each node on an undirected graph (out-neighbours on a directed one)."""
        return self.out_neighbours

    @property
    def num_nodes(self) -> int:
        """Number of nodes."""
        return self.graph.number_of_nodes()

    def row(self, i: int) -> dict[int, float]:
        """Receiver i's mixing weights over itself and the nodes it hears from.

        Keys in the order itself, then senders ascending: algorithms sum in this order.
        """
        w = self.weights
        lo, hi = w.indptr[i], w.indptr[i + 1]
        stored = dict(zip(w.indices[lo:hi].tolist(), w.data[lo:hi].tolist(), strict=True))
        return {j: float(stored.get(j, 0.0)) for j in (i, *self.in_neighbours[i])}

    def dense(self) -> np.ndarray:
        """The mixing matrix as a dense array (tests, small graphs)."""
        return self.weights.toarray()

    @property
    def spectral_gap(self) -> float | None:
        """1 - |lambda_2(W)| (None past ``DENSE_EIG_MAX`` nodes)."""
        return spectral_gap(self.weights)


def build_topology(
    spec: str, mixing: str, n: int, seed: int, params: GraphParams | None = None
) -> Topology:
    """Graph plus validated mixing matrix: the whole 'who talks to whom, how much'."""
    rule = MIXINGS.get(mixing)
    g = build_graph(spec, n, seed, params)
    w = rule(g)
    check_mixing(w, g, mixing)
    return Topology(graph=g, weights=w, name=spec, mixing=mixing)


def graph_params(cfg) -> GraphParams:  # cfg: ExperimentConfig
    """The random graph families' parameters of a run config."""
    return GraphParams(cfg.edge_prob, cfg.degree, cfg.small_world_k, cfg.small_world_p)


def topology_for(cfg) -> Topology:  # cfg: ExperimentConfig (not imported: config imports us)
    """The run's static topology, built once per process from the run config."""
    return _topology_cached(cfg.topology, cfg.mixing, cfg.num_nodes, cfg.seed, graph_params(cfg))


@functools.lru_cache(maxsize=16)
def _topology_cached(spec: str, mixing: str, n: int, seed: int, params: GraphParams) -> Topology:
    return build_topology(spec, mixing, n, seed, params)
