"""Every strategy on every graph and schedule the config accepts, against a known answer.

The matrices come from the app itself (``topology_at``: the graph that round-t messages travel
over), so these are the very weights a Flower run mixes with. Without training, gossip must keep
the average and reach it exactly (push-sum: its de-biased average); with plain gradient steps on a
heterogeneous least-squares problem, gradient tracking must reach the exact optimum. What the
config refuses is refused here too, with the key that refuses it.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from flower_p2p.config import ExperimentConfig
from flower_p2p.registry import ConfigError
from flower_p2p.schedules import reach_topology, topology_at
from strategies import (
    DSGD,
    KGT,
    Choco,
    FedAvg,
    GradientTracking,
    KGTGradient,
    PushSum,
    QGDSGDm,
    RelaySum,
)
from strategies.base import GossipAlgorithm, Params
from strategies.harness import run_gossip, union_support

N = 8


def _edge_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("edges") / "graph.txt"
    # a path 0-1-...-7 with two chords: irregular degrees, not a named family
    path.write_text("\n".join(f"{i} {i + 1}" for i in range(N - 1)) + "\n0 4\n2 6\n")
    return str(path)


# (topology, mixing): every graph family and schedule, each mixing rule where it applies.
TOPOLOGIES = [
    ("ring", "metropolis-hastings"),
    ("ring", "max-degree"),
    ("ring", "uniform-neighbour"),
    ("torus", "metropolis-hastings"),
    ("complete", "uniform-neighbour"),
    ("star", "metropolis-hastings"),
    ("star", "max-degree"),
    ("erdos-renyi", "metropolis-hastings"),
    ("small-world", "metropolis-hastings"),
    ("random-regular", "uniform-neighbour"),
    ("exponential", "metropolis-hastings"),
    ("edge-list", "metropolis-hastings"),
    ("directed-exponential", "metropolis-hastings"),
    ("one-peer-exponential", "metropolis-hastings"),
    ("random-matching", "metropolis-hastings"),
    ("random-matching", "max-degree"),
]

# (strategy name in the config, the algorithm with the hyperparameters the config would give)
STRATEGIES = [
    ("dsgd", {}, DSGD()),
    ("push-sum", {}, PushSum()),
    ("gradient-tracking", {}, GradientTracking()),
    ("choco", {"compressor": "none", "gamma": 1.0}, Choco(gamma=1.0, compressor="none")),
    ("choco", {"compressor": "8bit", "gamma": 0.5}, Choco(gamma=0.5, compressor="8bit")),
    (
        "choco",
        {"compressor": "top-k", "gamma": 0.2},
        Choco(gamma=0.2, compressor="top-k", compress_fraction=0.1),
    ),  # fmt: skip
    ("fedavg", {}, FedAvg()),
    ("k-gt", {}, KGT()),
    ("k-gt-grad", {}, KGTGradient()),
    ("qg-dsgdm", {"optimizer": "sgd"}, QGDSGDm()),
]


@pytest.fixture(scope="module")
def edge_file(tmp_path_factory) -> str:
    return _edge_file(tmp_path_factory)


def _config(topology: str, mixing: str, strategy: str, extra: dict, edge_file: str):
    """The validated config, refused exactly where a run would refuse it before training."""
    spec = edge_file if topology == "edge-list" else topology
    cfg = ExperimentConfig(
        num_nodes=N, num_rounds=400, topology=spec, mixing=mixing, strategy=strategy, **extra
    )
    cfg.validate()
    topology_at(cfg, 1)  # the graph and its mixing weights, as preflight checks them
    return cfg


def _schedule(cfg: ExperimentConfig):
    # harness round t = the app's round t + 1 (the harness counts from 0, the relay from 1)
    return lambda t: topology_at(cfg, t + 1).dense()


def _no_training(node: int, params: Params, rnd: int, correction: Params | None = None,
                 gradient_correction: Params | None = None):  # fmt: skip
    if gradient_correction is not None:  # a gradient-correcting algorithm: no gradient either
        return params, {k: np.zeros_like(v) for k, v in params.items()}
    return params


def _starts(seed: int = 0) -> list[Params]:
    rng = np.random.default_rng(seed)
    return [{"w": rng.normal(size=(3, 4)), "b": rng.normal(size=5)} for _ in range(N)]


def _max_error(nodes: list[Params], target: Params) -> float:
    return max(max(np.abs(p[k] - target[k]).max() for k in target) for p in nodes) / max(
        np.abs(v).max() for v in target.values()
    )


def _node_kwargs(algo: GossipAlgorithm) -> list[dict] | None:
    # every node the same size: fedavg's sample-weighted average is the plain average
    return [{"num_examples": 10}] * N if algo.needs_num_examples else None


# Rounds and tolerance per algorithm: uncompressed gossip is exact to rounding on every graph
# here within 400 rounds; compressed CHOCO converges linearly but slower.
def _budget(algo: GossipAlgorithm) -> tuple[int, float]:
    if isinstance(algo, Choco) and algo.compressor.name == "top-k":
        return 600, 1e-3  # slowest on the star (measured 2e-4); a broken copy stays at O(1)
    if isinstance(algo, Choco) and algo.compressor.name == "8bit":
        return 400, 1e-6
    return 400, 1e-9


@pytest.mark.parametrize(
    ("topology", "mixing"), TOPOLOGIES, ids=[f"{t}-{m}" for t, m in TOPOLOGIES]
)
@pytest.mark.parametrize(
    ("strategy", "extra", "algo"),
    STRATEGIES,
    ids=[f"{s}{e.get('compressor', '')}" for s, e, _ in STRATEGIES],
)
def test_gossip_without_training_reaches_the_exact_average(
    topology, mixing, strategy, extra, algo, edge_file
):
    cfg = _config(topology, mixing, strategy, extra, edge_file)  # every pairing is accepted
    starts = _starts()
    average = {k: np.mean([p[k] for p in starts], axis=0) for k in starts[0]}
    rounds, tol = _budget(algo)
    out = run_gossip(algo, _schedule(cfg), _no_training, starts, rounds,
                     node_kwargs=_node_kwargs(algo), step_size=lambda t: 1.0)  # fmt: skip
    assert _max_error(out, average) < tol


def test_uniform_neighbour_is_refused_on_irregular_graphs(edge_file):
    with pytest.raises(ConfigError, match="mixing"):
        _config("star", "uniform-neighbour", "dsgd", {}, edge_file)


# ---- gradient tracking: the exact optimum with plain gradient steps, on every schedule --------

ROWS, DIM = 20, 6


def _least_squares(seed: int = 1):
    rng = np.random.default_rng(seed)
    a = [rng.normal(size=(ROWS, DIM)) for _ in range(N)]
    b = [a[i] @ (3.0 * rng.normal(size=DIM)) for i in range(N)]  # far-apart local optima
    gram = sum(ai.T @ ai for ai in a)
    x_star = np.linalg.solve(gram, sum(ai.T @ bi for ai, bi in zip(a, b, strict=True)))
    return a, b, x_star


SCHEDULES_TO_TRACK = ["ring", "star", "directed-exponential", "one-peer-exponential",
                      "random-matching"]  # fmt: skip


@pytest.mark.parametrize("topology", SCHEDULES_TO_TRACK)
@pytest.mark.parametrize(
    ("name", "algo", "local_steps"),
    [
        ("gradient-tracking", GradientTracking(), 1),
        ("k-gt", KGT(), 3),
        ("k-gt-grad", KGTGradient(), 3),
    ],
)
def test_tracking_reaches_the_exact_optimum_on_every_schedule(
    topology, name, algo, local_steps, edge_file
):
    a, b, x_star = _least_squares()
    cfg = _config(topology, "metropolis-hastings", name, {}, edge_file)
    lr = 0.02

    def step(node: int, params: Params, rnd: int, correction: Params | None = None,
             gradient_correction: Params | None = None):  # fmt: skip
        x, total = params["x"], np.zeros(DIM)
        for _ in range(local_steps):
            g = a[node].T @ (a[node] @ x - b[node]) / ROWS
            if gradient_correction is not None:  # K-GT-grad: corrected before the step
                g = g + gradient_correction["x"]
                total += g
            x = x - lr * g
            if correction is not None:
                x = x - lr * correction["x"]
        if gradient_correction is not None:
            return {"x": x}, {"x": total / local_steps}
        return {"x": x}

    def error(alg) -> float:
        out = run_gossip(alg, _schedule(cfg), step, {"x": np.zeros(DIM)}, 3000,
                         step_size=lambda t: local_steps * lr)  # fmt: skip
        return max(np.linalg.norm(p["x"] - x_star) for p in out) / np.linalg.norm(x_star)

    assert error(algo) < 1e-8
    assert error(DSGD()) > 1e-3  # the control: constant-step DSGD keeps its heterogeneity bias


# ---- CHOCO on schedules: the defect this file was written for -------------------------------


@pytest.mark.parametrize("topology", ["one-peer-exponential", "random-matching"])
def test_choco_without_compression_computes_dsgd_on_changing_graphs(topology, edge_file):
    cfg = _config(topology, "metropolis-hastings", "choco",
                  {"compressor": "none", "gamma": 1.0}, edge_file)  # fmt: skip
    a, b, _ = _least_squares()

    def step(node: int, params: Params, rnd: int) -> Params:
        x = params["x"]
        return {"x": x - 0.05 * a[node].T @ (a[node] @ x - b[node]) / ROWS}

    traces: dict[str, list[np.ndarray]] = {"dsgd": [], "choco": []}
    for name, algo in (("dsgd", DSGD()), ("choco", Choco(gamma=1.0, compressor="none"))):

        def record(t: int, nodes: list[Params], name: str = name) -> None:
            traces[name].append(np.stack([p["x"] for p in nodes]))

        run_gossip(algo, _schedule(cfg), step, {"x": np.zeros(DIM)}, 60, on_round=record)
    assert np.ptp(traces["dsgd"][-1], axis=0).max() > 1e-3  # nodes still differ
    for x, y in zip(traces["choco"], traces["dsgd"], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9)


def test_the_app_delivers_choco_increments_to_the_harness_reach(edge_file):
    """The relay's reach for CHOCO is the union of the run's graphs, as in the reference loop."""
    for topology in ("ring", "directed-exponential", "one-peer-exponential", "random-matching"):
        cfg = _config(topology, "metropolis-hastings", "choco", {}, edge_file)
        reach = reach_topology(cfg)
        expected = union_support(_schedule(cfg), cfg.num_rounds)
        got = np.zeros((N, N), dtype=bool)
        for i in range(N):
            got[i, list(reach.in_neighbours[i])] = True
        assert np.array_equal(got, expected), topology


@pytest.mark.parametrize(
    ("key", "value"), [("link_drop", 0.1), ("node_dropout", 0.1), ("fail_every", 3)]
)
def test_choco_is_refused_where_messages_are_lost(key, value):
    # one lost increment desynchronises a public copy for good: refused before training
    with pytest.raises(ConfigError, match="keep copies of their neighbours") as err:
        ExperimentConfig(strategy="choco", **{key: value}).validate()
    assert err.value.key == key.replace("_", "-")
    ExperimentConfig(strategy="choco", straggler=0.5).validate()  # a straggler loses nothing
    ExperimentConfig(strategy="dsgd", **{key: value}).validate()


def test_choco_with_lost_messages_computes_garbage_in_the_reference_loop():
    """Why the refusal above: the same loss leaves DSGD at a consensus, CHOCO at none."""
    cfg = ExperimentConfig(num_nodes=N)
    starts = _starts()

    def lost(t: int, j: int, i: int) -> bool:
        return np.random.default_rng([t, j, i]).random() < 0.1

    def spread(out: list[Params]) -> float:
        return max(np.abs(p["b"] - out[0]["b"]).max() for p in out)

    dsgd = run_gossip(DSGD(), _schedule(cfg), _no_training, starts, 300, lost=lost)
    choco = run_gossip(Choco(gamma=1.0, compressor="none"), _schedule(cfg), _no_training,
                       starts, 300, lost=lost)  # fmt: skip
    assert spread(dsgd) < 1e-9
    assert spread(choco) > 0.1  # measured 1.5: the nodes never agree


STATIC = [t for t, _ in TOPOLOGIES if t not in ("directed-exponential", "one-peer-exponential",
                                                  "random-matching")]  # fmt: skip


@pytest.mark.parametrize("topology", sorted(set(STATIC)))
def test_relay_sum_averages_exactly_over_the_spanning_tree_of_every_static_graph(
    topology, edge_file
):
    cfg = _config(topology, "metropolis-hastings", "relay-sum", {}, edge_file)
    tree = topology_at(cfg, 1)
    assert nx.is_tree(tree.graph)
    starts = _starts(1)
    average = {k: np.mean([p[k] for p in starts], axis=0) for k in starts[0]}

    def fixed(node: int, params: Params, rnd: int) -> Params:  # each node's own, every round
        return {k: v.copy() for k, v in starts[node].items()}

    out = run_gossip(RelaySum(N), _schedule(cfg), fixed, starts, nx.diameter(tree.graph))
    assert _max_error(out, average) < 1e-12


@pytest.mark.parametrize("topology", ["directed-exponential", "one-peer-exponential",
                                      "random-matching"])  # fmt: skip
def test_relay_sum_is_refused_on_directed_and_per_round_graphs(topology, edge_file):
    with pytest.raises(ConfigError, match="spanning tree") as err:
        _config(topology, "metropolis-hastings", "relay-sum", {}, edge_file)
    assert err.value.key == "topology"


def test_qg_dsgdm_is_refused_with_adamw():
    with pytest.raises(ConfigError, match="replaces the optimizer") as err:
        ExperimentConfig(strategy="qg-dsgdm", optimizer="adamw").validate()
    assert err.value.key == "optimizer"
